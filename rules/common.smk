# Config validation and small path helpers; the logic lives in the spbench library.
import json
import os
import sys
from pathlib import Path

# Jobs import spbench from this checkout, also inside a conda env (envs/spbench.yaml).
_SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, _SRC)
# (PYTHONPATH is optional, so it is extended, not asserted with `envvars:`.)
os.environ.update(PYTHONPATH=os.pathsep.join(p for p in (_SRC, os.environ.get("PYTHONPATH")) if p))

from spbench.config import (ConfigError, RunSpec, candidates, expand_runs, group_members, halving_budgets, main_runs,
                            parse_setting, read_yaml, run_groups, rung_runs, validate_config)
from spbench.methods import method_class
from spbench.penalties import PENALTIES
from spbench.report_items import item_title

try:
    # Snakemake's YAML reader keeps the last of a repeated key; read the files again, strictly
    for _path in [*workflow.overwrite_configfiles, *workflow.configfiles]:
        read_yaml(_path)
    _validated = validate_config(config, base_dir=Path.cwd())
except ConfigError as err:
    raise WorkflowError(f"invalid configuration: {err}") from None
config.clear()
config.update(_validated)

RESULTS = config["results"]
DATA = config["data_dir"]
REPORTS = config["reports"]
# A run's folder spells its identity; pattern and wildcards are spbench.config.RunSpec's.
RUN_PATTERN = RunSpec.PATTERN


wildcard_constraints:
    task=r"[A-Za-z0-9][A-Za-z0-9_-]*",
    **RunSpec.WILDCARDS,


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


def canonical(value):
    """``value`` with the keys of every mapping in it sorted, recursively; lists keep their
    order. Snakemake compares a job's params by their repr, and a dict's repr follows the
    order of its keys in the config file: a param made of a config section goes through this,
    so that writing the same section with its keys in another order reruns nothing."""
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value, key=lambda k: (str(k), type(k).__name__))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def report_options():
    """The options passed to the report builders, as a param of the report (a change reruns it)."""
    figures = config.get("figures", {})
    out = {}
    if "alpha_beta" in figures:
        out["fig1"] = {"method": figures["alpha_beta"]["method"], "target": figures["alpha_beta"]["target"]}
    if "freeze" in figures:
        out["fig3"] = {"methods": list(figures["freeze"]["methods"])}
    if "published" in config:
        out["published"] = config["published"]
    return json.dumps(out, sort_keys=True)


def choose_setting(source, target, method):
    """The setting chosen by model selection (waits for the select_setting checkpoint)."""
    path = checkpoints.select_setting.get(source=source, target=target, method=method).output.selection
    return json.loads(Path(path).read_text())["selected"]


def rung_settings(source, target, method, rung):
    """Successive halving: the candidates that reach ``rung`` (all at rung 0; later, those the
    halve checkpoint of the rung before kept)."""
    if rung == 0:
        return candidates(config, method)
    path = checkpoints.halve.get(source=source, target=target, method=method, rung=str(rung - 1)).output.survivors
    return json.loads(Path(path).read_text())["survivors"]


def _rung_records(source, target, method, rung):
    settings = rung_settings(source, target, method, rung)
    return [record_path(spec) for spec in rung_runs(config, source, target, method, rung, settings)]


def get_rung_records(wildcards):
    return _rung_records(wildcards.source, wildcards.target, wildcards.method, int(wildcards.rung))


def get_selection_inputs(wildcards):
    """select_setting's inputs: the validation records of every candidate (with halving, of
    the last rung's) and each earlier rung's outcome."""
    budgets = halving_budgets(config)
    last = 0 if budgets is None else len(budgets) - 1
    out = {"records": _rung_records(wildcards.source, wildcards.target, wildcards.method, last)}
    if last:
        out["rungs"] = [f"{RESULTS}/selection/{wildcards.source}/{wildcards.target}/{wildcards.method}/rung{r}.json"
                        for r in range(last)]
    return out


def get_finetuned_models(wildcards):
    """Fig. 4: the fine-tuned classifiers of replicate 0 of the main grid, per method."""
    fig = config["figures"]["activations"]
    out = {}
    for method in fig["methods"]:
        runs = [s for s in main_runs(config, choose_setting) if (s.source, s.target, s.method, s.freeze, s.replicate)
                == (wildcards.source, fig["target"], method, 0, 0)]
        for spec in runs:
            out[f"{method}:{spec.setting_text}"] = f"{RESULTS}/runs/{spec.key}/model.pt"
    return out


def get_fisher_input(wildcards):
    if method_class(wildcards.method).needs.fisher:
        return f"{RESULTS}/sources/{wildcards.source}/fisher.pt"
    return []


def record_path(spec):
    return f"{RESULTS}/runs/{spec.key}/record.json"


def checkpoint_path(spec):
    return f"{RESULTS}/checkpoints/{spec.key}/checkpoint.pt"


def all_records(wildcards):
    return [record_path(spec) for spec in expand_runs(config, choose_setting, rung_settings)]


def analysis_tables():
    figures = config.get("figures", {})
    out = {}
    if "activations" in figures:
        out["r2"] = f"{RESULTS}/activations.parquet"
    if "overhead" in figures:
        out["overhead"] = f"{RESULTS}/overhead.parquet"
    return out


def report_names():
    """(tables, figures) that the config asks for; each table comes as .md, .tex, .html and
    .csv, each figure as .png and .pdf."""
    figures = config.get("figures", {})
    tables = ["table2", "table3"]
    if "l2" in config["grid"]["methods"] and len(config["grid"]["methods"]) > 1:
        tables.append("paired")  # every setting against l2, paired by replicate
    # every method across tasks: needs two (source, target) tasks and three methods
    across = len(config["grid"]["sources"]) * len(config["grid"]["targets"]) >= 2 and len(config["grid"]["methods"]) >= 3
    if across:
        tables.append("ranks")
    if "selection" in config:
        tables.append("selection")
    if "overhead" in figures:
        tables.append("overhead")
    if "published" in config:
        tables.append("published")  # Table 2's cells beside numbers published elsewhere
    figs = ["fig2"]
    figs += [name for key, name in (("alpha_beta", "fig1"), ("freeze", "fig3"), ("activations", "fig4")) if key in figures]
    if across:
        figs.append("cd")  # the critical-difference diagram of the ranks
    return tables, figs


def report_files():
    tables, figs = report_names()
    return [f"{REPORTS}/{t}.{ext}" for t in tables for ext in ("md", "tex", "html", "csv")] + [
        f"{REPORTS}/{f}.{ext}" for f in figs for ext in ("png", "pdf")
    ] + [f"{REPORTS}/report.html"]


def final_outputs():
    logged = [f"{RESULTS}/tracking_logged.json"] if config["tracking"]["log_from"] == "end" else []
    return [f"{RESULTS}/runs.parquet", *analysis_tables().values(), *report_files(), *logged]


_FORKSERVER = []


def start_forkserver():
    """Start the fork server of a local run (config ``forkserver``), and name its socket to
    the jobs (their environment); on a cluster, in a dry run or with it off, nothing."""
    if not (config["forkserver"] and workflow.local_exec and not workflow.dryrun):
        return
    from spbench import forkserver

    try:
        # and what the preamble of a job's script imports; MLflow where the fine-tunes log
        preload = (*forkserver.PRELOAD, "snakemake.iocontainers", "snakemake.logging", "snakemake.shell")
        if config["tracking"]["log_from"] == "jobs":
            preload += ("mlflow", "spbench.tracking")
        proc, path = forkserver.start(Path(".snakemake") / "spbench", preload=preload, wait=False)
    except (OSError, RuntimeError) as err:
        print(f"spbench: no fork server ({err}); each job starts its own interpreter", file=sys.stderr)
        return
    _FORKSERVER[:] = [proc, path]
    os.environ[forkserver.ENV] = path


def stop_forkserver():
    if _FORKSERVER:
        from spbench import forkserver

        os.environ.pop(forkserver.ENV, None)
        forkserver.stop(*_FORKSERVER)
        _FORKSERVER.clear()


def print_summary():
    """After a successful run: where the tables and figures are, their headline, and how to
    open the MLflow runs (spbench.reports.summary)."""
    parquet = Path(RESULTS) / "runs.parquet"
    if not parquet.exists() or not (Path(REPORTS) / "table2.md").exists():
        return
    from spbench.reports import summary
    from spbench.results import read_parquet

    marker = Path(RESULTS) / "tracking.json"
    experiment_id = json.loads(marker.read_text()).get("experiment_id") if marker.exists() else None
    print(summary(read_parquet(parquet), REPORTS, tracking_uri=config["tracking"]["uri"], experiment_id=experiment_id),
          file=sys.stderr)


def category(path):
    if Path(path).name == "report.html":
        return "Report"
    return "Figures" if path.endswith(".png") else "Tables"


def get_cluster_resources(runs=1):
    """Resources of a heavy job (config `cluster`): GPUs and CPUs, memory and runtime scaled by
    the attempt (a retried job asks for more), the runtime also by the fine-tunes the job runs
    (``runs``: a run group's), Slurm partition and account when given."""
    cluster = config["cluster"]
    resources = {
        "gpu": cluster["gpus"],
        "cpus_per_task": cluster["cpus_per_task"],
        "mem_mb": lambda wildcards, attempt: cluster["mem_mb"] * attempt,
        "runtime": lambda wildcards, attempt: cluster["runtime"] * attempt * runs,
    }
    for key in ("partition", "account"):
        value = cluster[key] or os.environ.get(f"SPBENCH_SLURM_{key.upper()}", "")
        if value:
            resources[f"slurm_{key}"] = value
    return resources


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
