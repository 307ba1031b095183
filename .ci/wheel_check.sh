#!/usr/bin/env bash
# The package as a user installs it: sdist and wheel built with `python -m build` (the wheel from the sdist), the
# wheel installed NOT editable into a fresh virtual environment, and run from a folder outside the repository.
#   1. core install (+ transformers, the example's model library): `neat-fx --help`, examples/quickstart.py
#      (trains, saves, reloads, folds, merges; the ONNX step must say which extra to install)
#   2. `<wheel>[onnx]`: the same script exports ONNX and verifies it in ONNX Runtime
# Usage: bash .ci/wheel_check.sh [PYTHON]   (TORCH_SPEC=torch==2.13.0 by default; TORCH_SPEC= keeps the index's torch)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${1:-$ROOT/.venv/bin/python}
TORCH_SPEC=${TORCH_SPEC-torch==2.13.0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/neat_fx_wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
step() { echo "== wheel check: $*"; }

step "python -m build (sdist, then the wheel from the sdist)"
"$PY" -m build --outdir "$WORK/dist" "$ROOT" > "$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/neat_fx-*.whl)
ls "$WORK/dist"

step "fresh venv, core install from the wheel"
python3 -m venv "$WORK/venv"
V="$WORK/venv/bin"
"$V/python" -m pip install -q --upgrade pip
if [ -n "$TORCH_SPEC" ]; then "$V/python" -m pip install -q "$TORCH_SPEC"; fi
"$V/python" -m pip install -q "$WHEEL" transformers
mkdir -p "$WORK/user" && cp "$ROOT/examples/quickstart.py" "$WORK/user/"
cd "$WORK/user"  # nothing of the repository beside or on the path
"$V/python" - <<'PY'
import neat_fx, pathlib, sys
where = pathlib.Path(neat_fx.__file__).resolve()
assert "site-packages" in where.parts, f"neat_fx imported from {where}, not from the installed wheel"
print("neat_fx", neat_fx.__version__, "from", where.parent)
from neat_fx import finetune  # the main job's bundled data travels with the wheel
rows = len(finetune.read_tsv(finetune.BUNDLED_SST2 / "train.tsv")), len(finetune.read_tsv(finetune.BUNDLED_SST2 / "test.tsv"))
assert rows == (4000, 872), rows
PY
"$V/neat-fx" --help > help.txt && head -3 help.txt
"$V/python" quickstart.py --steps 20 --out "$WORK/q1" | tee core.txt
grep -q "pip install 'neat-fx\[onnx\]'" core.txt || { echo "core install: the ONNX step did not name the extra"; exit 1; }

step "<wheel>[onnx]: export and verify"
"$V/python" -m pip install -q "$WHEEL[onnx]"
"$V/python" quickstart.py --steps 20 --out "$WORK/q2" | tee onnx.txt
grep -q "verified on cpu" onnx.txt || { echo "[onnx] install: the export was not verified"; exit 1; }
test -f "$WORK/q2/model.onnx"
step "passed"
