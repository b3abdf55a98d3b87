# The two set-up commands of the README. Both work on a fresh machine with python3 >= 3.11.
#   make demo   install, then run the embedded default job (local Ray, loopback S3, tiny model)
#   make test   install everything (dev extras too), then run the CPU test suite
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# no GPU: prefer the CPU build of torch (users' torch stays unpinned in pyproject)
	command -v nvidia-smi >/dev/null 2>&1 || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed
	$(VENV)/bin/hymba-batch demo

test: $(VENV)/.installed
	$(PY) -m pytest -m "not gpu" -q
