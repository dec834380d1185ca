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


def checkpoint_path(spec):
    return f"{RESULTS}/checkpoints/{spec.key}/checkpoint.pt"


def all_records():
    return [record_path(spec) for spec in expand_runs(config)]


def final_outputs():
    return [f"{RESULTS}/runs.parquet", *report_files()]


def report_files():
    return [f"{REPORTS}/{name}" for name in ("table2.md", "table3.md", "table2.csv", "table3.csv", "fig2.png")]


def get_cluster_resources():
    """Resources of a heavy job (config `cluster`): GPUs and CPUs, memory and runtime scaled by
    the attempt (a retried job asks for more), Slurm partition and account when given."""
    cluster = config["cluster"]
    resources = {
        "gpu": cluster["gpus"],
        "cpus_per_task": cluster["cpus_per_task"],
        "mem_mb": lambda wildcards, attempt: cluster["mem_mb"] * attempt,
        "runtime": lambda wildcards, attempt: cluster["runtime"] * attempt,
    }
    for key in ("partition", "account"):
        value = cluster[key] or os.environ.get(f"SPBENCH_SLURM_{key.upper()}", "")
        if value:
            resources[f"slurm_{key}"] = value
    return resources
