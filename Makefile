# trimformer: `make demo` and `make test` are all a newcomer needs.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
# On a GPU machine the system python already carries a CUDA torch; tests and benches run with it.
GPU_PY  ?= $(if $(wildcard $(PY)),$(PY),python3)
PYTEST_WORKERS ?= 2

.PHONY: install demo test lint test-gpu bench bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
ifeq ($(HAS_GPU),)
	@echo "no nvidia-smi: installing the CPU build of torch first"
	$(PY) -m pip install -q torch==2.13.0
endif
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

demo: install
	$(PY) -m trimformer embed --output demo-embeddings.npy

lint: install
	$(VENV)/bin/ruff check trimformer tests
	$(VENV)/bin/ruff format --check trimformer tests

# TRITON_INTERPRET=1 is exported before Python starts, so every @triton.jit sees it.
test: install lint
	TRITON_INTERPRET=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 \
		$(PY) -m pytest -q -m "not gpu" -n $(PYTEST_WORKERS) --durations=15

test-gpu:
	TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 $(GPU_PY) -m pytest -q -m gpu -p no:cacheprovider --durations=15

bench: install
	$(PY) -m trimformer bench embed-cpu

bench-gpu:
	HF_HUB_OFFLINE=1 $(GPU_PY) -m trimformer bench encoder
	HF_HUB_OFFLINE=1 $(GPU_PY) -m trimformer bench attention

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
