# `make test` and `make train` set up .venv on first use (and again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pytest processes: the end-to-end tests wait on subprocesses, so two workers keep two cores busy.
JOBS ?= 2

.PHONY: setup train test test-gpu clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

train: setup
	$(BIN)/python train.py $(ARGS)

test: setup
	$(BIN)/python -m pytest -n $(JOBS) $(ARGS)

test-gpu: setup
	$(BIN)/python -m pytest -m gpu $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
