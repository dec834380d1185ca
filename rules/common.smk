# Config validation and small path helpers; the logic lives in the spbench library.
import os
import sys
from pathlib import Path

# Jobs import spbench from this checkout, also inside a conda env (envs/spbench.yaml).
_SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, _SRC)
# (PYTHONPATH is optional, so it is extended, not asserted with `envvars:`.)
os.environ.update(PYTHONPATH=os.pathsep.join(p for p in (_SRC, os.environ.get("PYTHONPATH")) if p))

from spbench.config import ConfigError, RunSpec, expand_runs, fmt_num, validate_config
from spbench.penalties import PENALTIES

try:
    _validated = validate_config(config, base_dir=Path.cwd())
except ConfigError as err:
    raise WorkflowError(f"invalid configuration: {err}") from None
config.clear()
config.update(_validated)

RESULTS = config["results"]
DATA = config["data_dir"]
REPORTS = config["reports"]
RUN_PATTERN = "{source}/{target}/{penalty}/a{alpha}_b{beta}/freeze{freeze}/rep{replicate}"


wildcard_constraints:
    task=r"[A-Za-z0-9][A-Za-z0-9_-]*",
    source=r"[A-Za-z0-9][A-Za-z0-9_-]*",
    target=r"[A-Za-z0-9][A-Za-z0-9_-]*",
    penalty=r"[A-Za-z0-9_]+",
    alpha=r"[0-9][0-9.e+-]*",
    beta=r"[0-9][0-9.e+-]*",
    freeze=r"\d+",
    replicate=r"\d+",


def task_files(task):
    return {
        "images": f"{DATA}/{task}/images.npy",
        "split": f"{DATA}/{task}/split.parquet",
        "meta": f"{DATA}/{task}/meta.json",
    }


def sources_with_weights(kind):
    """Regex alternation of the sources whose weights are made by `kind`."""
    names = [n for n, s in config["sources"].items() if s["weights"] == kind]
    return "|".join(names) if names else "(?!)"


def get_source_task_files(wildcards):
    return task_files(config["sources"][wildcards.source]["task"])


def get_run_spec(wildcards):
    spec = RunSpec(
        wildcards.source,
        wildcards.target,
        wildcards.penalty,
        float(wildcards.alpha),
        float(wildcards.beta),
        int(wildcards.freeze),
        int(wildcards.replicate),
    )
    if spec.penalty not in PENALTIES:
        raise WorkflowError(f"unknown penalty {spec.penalty!r} in a requested path")
    return spec


def get_fisher_input(wildcards):
    if PENALTIES[wildcards.penalty].uses_fisher:
        return f"{RESULTS}/sources/{wildcards.source}/fisher.pt"
    return []


def record_path(spec):
    return f"{RESULTS}/runs/{spec.key}/record.json"


def all_records():
    return [record_path(spec) for spec in expand_runs(config)]


def final_outputs():
    return [f"{RESULTS}/runs.parquet", *report_files()]


def report_files():
    return [f"{REPORTS}/{name}" for name in ("table2.md", "table3.md", "table2.csv", "table3.csv", "fig2.png")]


# -- raw inputs (rules/download.smk) --------------------------------------------------------------
from spbench.datasets import RAW_INPUTS
from spbench.download import input_path, is_archive, raw_path


def downloads_of_kind(kind):
    """Regex alternation of the downloads fetched from a `url` or given as a `manual` file."""
    names = [n for n, s in config.get("downloads", {}).items() if kind in s]
    return "|".join(names) if names else "(?!)"


def archive_downloads():
    names = [n for n, s in config.get("downloads", {}).items() if is_archive(s)]
    return "|".join(names) if names else "(?!)"


def tasks_with_raw_inputs():
    names = [n for n, t in config["tasks"].items() if t["builder"] in RAW_INPUTS]
    return "|".join(names) if names else "(?!)"


def get_raw_file(name):
    return raw_path(DATA, name, config["downloads"][name])


def get_task_raw_inputs(wildcards):
    """The extracted folders and files a real task's builder reads."""
    task = config["tasks"][wildcards.task]
    names = [task[key] for key in RAW_INPUTS.get(task["builder"], ()) if key in task]
    return [input_path(DATA, n, config["downloads"][n]) for n in names]
