#!/usr/bin/env bash
# Everything GPU-related for the core pass, in one run on a lent CUDA machine (see DEVELOPERS.md):
#   the `gpu` tests (train/fold/merge on CUDA in fp32/bf16/fp16, captured on CPU and on CUDA),
#   and benchmarks/gpu_smoke.py (train-step timing vs PEFT on the same card, fold parity).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -c "import peft; print('peft', peft.__version__, 'PeanutConfig' if hasattr(peft, 'PeanutConfig') else 'no PeanutConfig')" || true
PYTHONPATH=$PWD python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_dtypes_devices.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python3 benchmarks/gpu_smoke.py 2>&1 | tee "$OUT/gpu_smoke.log" | grep -v Warning | tail -40
# ONNX on CUDA needs onnxruntime-gpu (the lent image's onnxruntime 1.30 has no CUDA EP, 2026-11-26) and
# neat_fx.export importable: export/ is mapped into the package by the install, so install it first.
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" || true
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/neatfx . && export PYTHONPATH=/tmp/neatfx
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_onnx.py 2>&1 | tee "$OUT/gpu_onnx.log" | grep -v Warning | tail -30
