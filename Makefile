# Two commands: `make demo` runs the default workflow (the embedded demo), `make test` runs
# the tests. Both set up .venv once (re-done when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.spbench-installed

.PHONY: setup demo test lint plan tracking-server clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[workflow,test]'
	touch $@

demo: $(STAMP)
	$(BIN)/snakemake --cores all

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/snakemake --lint

# Job count and GPU-hours of a grid, before launching it: make plan CONFIG=my.yaml
CONFIG ?= config.yaml
plan: $(STAMP)
	$(BIN)/python -m spbench.plan $(CONFIG)

# The shared MLflow server (SQLite store, artifacts under mlflow-server/), on 127.0.0.1:5000;
# e.g. make tracking-server SERVE_ARGS="--host 0.0.0.0 --basic-auth --store postgresql://..."
SERVE_ARGS ?=
tracking-server: $(STAMP)
	$(BIN)/python -m spbench.tracking serve $(SERVE_ARGS)

clean:
	rm -rf results data logs .snakemake
	find reports -maxdepth 1 -type f ! -name README.md -delete
