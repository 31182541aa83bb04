# Two commands do everything on a fresh machine: `make run` and `make test`.
# The first use creates .venv; torch is installed first and pinned (a CPU build on this machine),
# so nothing that depends on it pulls in another build.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
ARGS ?=

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[torch,ray,grpc,plot,data,secagg,privacy,tune,dev]'
	touch $@

.PHONY: setup run test lint bench
setup: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/fedloom run $(ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check kernel transports protocols perf tests
	$(BIN)/mypy

bench: $(VENV)/.installed
	$(BIN)/fedloom perf micro
