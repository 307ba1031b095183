#!/usr/bin/env bash
# Everything GPU-related, on a lent CUDA machine (see DEVELOPERS.md), in stages so that each fits one call:
#   bash benchmarks/gpu_check.sh tests     the `gpu` tests (train/fold/merge on CUDA in fp32/bf16/fp16) and
#                                          benchmarks/gpu_smoke.py (train step vs PEFT on the card, fold parity)
#   bash benchmarks/gpu_check.sh onnx      benchmarks/gpu_onnx.py: ORT CUDA EP (fp32, fp16) vs PyTorch CUDA eager
#   bash benchmarks/gpu_check.sh compile   benchmarks/compile_speed.py --device cuda: backend "neat" (+ CUDA
#                                          graphs) vs eager NEAT and PEFT LoRA, fp32 then bf16
# Results land in benchmarks/results/ and, when $OUT is set, are copied there too.
# The ONNX stage needs onnxruntime-gpu built for the machine's CUDA (1.31 is CUDA 13): put it first on
# PYTHONPATH. neat_fx is installed without dependencies into /tmp/neatfx .
set -uo pipefail
stage=${1:-all}
cd "$(dirname "$0")/.."
RES=benchmarks/results
py=python3
export PYTHONUNBUFFERED=1
if [ ! -d /tmp/neatfx/neat_fx ]; then
  $py -m pip install -q --no-deps --no-build-isolation --target /tmp/neatfx . || exit 1
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/neatfx
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
keep() { [ -n "${OUT:-}" ] && cp "$@" "$OUT"/ ; true; }

if [ "$stage" = tests ] || [ "$stage" = all ]; then
  $py -m pytest -q -p no:cacheprovider -m gpu tests/test_dtypes_devices.py 2>&1 | tee $RES/gpu_tests.log | tail -15
  $py benchmarks/gpu_smoke.py 2>&1 | tee $RES/gpu_smoke.log | grep -v Warning | tail -40
  keep $RES/gpu_tests.log $RES/gpu_smoke.log
fi
if [ "$stage" = onnx ] || [ "$stage" = all ]; then
  $py -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.__file__, o.get_available_providers())"
  $py benchmarks/gpu_onnx.py --runs 100 2>&1 | grep -v "Warning\|round/s" | tail -60
  keep $RES/gpu_onnx_*
fi
if [ "$stage" = compile ] || [ "$stage" = all ]; then
  for dt in ${DTYPES:-fp32 bf16}; do
    $py benchmarks/compile_speed.py --device cuda --dtype $dt --random-init --steps 30 --warmup 5 --runs 50 2>&1 \
      | grep -v "Warning\|round/s\|warn" | tail -30
    keep $RES/compile_speed_cuda_$dt.*
  done
fi
