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

# The test modules run in parallel, one module per worker at a time (its fixtures are set up
# once): one worker per physical core by default, at most 8 (each holds about 1 GB; the longest
# module bounds the run beyond that); make test TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --maxprocesses 8 --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(BIN)/snakemake --lint

# Job count and device-hours of a grid, before launching it: make plan CONFIG=my.yaml, or with
# overlays and measured throughput: make plan CONFIG="config/paper.yaml config/halving.yaml"
# THROUGHPUT=bench.json (a benchmarks/train_throughput.py --json output; several allowed);
# BUDGET=50: also the images/s a job must average to fit in 50 device-hours
CONFIG ?= config.yaml
THROUGHPUT ?=
BUDGET ?=
plan: $(STAMP)
	$(BIN)/python -m spbench.plan $(CONFIG) $(addprefix --throughput ,$(THROUGHPUT)) $(addprefix --budget ,$(BUDGET))

# The shared MLflow server (SQLite store, artifacts under mlflow-server/), on 127.0.0.1:5000;
# e.g. make tracking-server SERVE_ARGS="--host 0.0.0.0 --basic-auth --store postgresql://..."
SERVE_ARGS ?=
tracking-server: $(STAMP)
	$(BIN)/python -m spbench.tracking serve $(SERVE_ARGS)

clean:
	rm -rf results data logs .snakemake
	find reports -maxdepth 1 -type f ! -name README.md -delete
