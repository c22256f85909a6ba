# `make test` and `make train` set up .venv on first use (and again when pyproject.toml or requirements.lock
# changes), with the versions pinned in requirements.lock (`make lock` pins them anew from pyproject.toml).
# uv installs them: it fetches and unpacks torch's ~3 GB of wheels in parallel, in 1 minute where pip took 3.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pytest processes: the end-to-end tests wait on subprocesses, so two workers keep two cores busy.
JOBS ?= 2

.PHONY: setup lock train test test-gpu clean

setup: $(VENV)/.installed

$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet 'uv>=0.13,<0.14'

$(VENV)/.installed: pyproject.toml requirements.lock | $(BIN)/uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode -r requirements.lock -e '.[dev]'
	touch $@

# Not after setup: a pyproject.toml that the old pins no longer satisfy would stop it.
lock: | $(BIN)/uv
	$(BIN)/uv pip compile --quiet --universal --extra dev --custom-compile-command 'make lock' pyproject.toml \
		-o requirements.lock

train: setup
	$(BIN)/python train.py $(ARGS)

test: setup
	$(BIN)/python -m pytest -n $(JOBS) $(ARGS)

test-gpu: setup
	$(BIN)/python -m pytest -m gpu $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
