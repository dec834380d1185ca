"""The config you pass is the config that runs, and a config change reruns what it changes:
the real `snakemake` CLI, from the checkout root as a user types it and on a finished tiny
workflow in a temporary directory."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

pytestmark = pytest.mark.e2e


def _run(args, cwd, check=True):
    proc = subprocess.run([SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def _planned(text: str) -> dict[str, int]:
    """The job counts of a dry run's summary table (rule -> count)."""
    counts = {}
    table = text.split("Job stats:", 1)[-1] if "Job stats:" in text else ""
    for line in table.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


@pytest.mark.parametrize("configfile", ["config/tiny.yaml", "config/paper.yaml"])
def test_configfile_from_the_checkout_root_is_the_config_that_runs(configfile):
    """From the checkout root, `--configfile X` runs X alone: none of the demo's methods or
    options leak in (the demo's config.yaml is not merged under it)."""
    out = _run(["-n", "--configfile", configfile], REPO)
    config = yaml.safe_load((REPO / configfile).read_text())
    methods_in_plan = set(re.findall(r"method=(\w+)", out))
    assert methods_in_plan, out[-2000:]
    assert methods_in_plan <= set(config["grid"]["methods"]), methods_in_plan
    if "l1_sp" not in config["grid"]["methods"]:
        assert "/l1_sp/" not in out


def test_no_configfile_runs_the_demo():
    """Without --configfile the demo's config.yaml runs: a run only the demo defines (target
    k20, LwF) can be asked for; with --configfile config/tiny.yaml, which lacks both, it cannot."""
    out = _run(["-n"], REPO)
    demo = yaml.safe_load((REPO / "config.yaml").read_text())
    assert set(re.findall(r"method=(\w+)", out)) <= set(demo["grid"]["methods"])
    run = "results/runs/main/digits-src/digits-mod3-k20/lwf/lambda=1.0_lr=0.05_temperature=2.0/freeze0/test/rep0/record.json"
    planned = _run(["-n", run], REPO)
    assert "digits-mod3-k20" in planned and "finetune" in planned
    refused = subprocess.run([SNAKEMAKE, "-n", "--configfile", "config/tiny.yaml", run], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("reruns")
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config["grid"]["methods"] = {"none": {}, "l2": {"alpha": [0.01]}, "l2_sp": {"alpha": [0.01, 0.1]},
                                 "l2_sp_fisher": {"alpha": [0.1]}}
    config["figures"] = {"activations": {"target": "digits-mod3-k5", "methods": ["l2", "l2_sp"], "max_images": 64},
                         "overhead": {"batch_size": 8, "repeats": 2}}
    # no model selection: a dry run cannot see past a checkpoint that must rerun, and every
    # run should be visible to these checks
    del config["selection"]
    config["tracking"]["log_from"] = "end"  # one job logs every run at the end
    (work / "c.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    _run(["-s", str(REPO / "Snakefile"), "--directory", str(work), "--configfile", "c.yaml", "--cores", "2"], work)
    return work


def _dry(work: Path, config: dict) -> dict[str, int]:
    (work / "changed.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    out = _run(["-s", str(REPO / "Snakefile"), "--directory", str(work), "--configfile", "changed.yaml", "-n"], work)
    return _planned(out)


def test_unchanged_config_has_nothing_to_do(finished):
    config = yaml.safe_load((finished / "c.yaml").read_text())
    assert _dry(finished, config) == {}


# The mappings whose order means something: the order of the methods, tasks and sources is
# the order of the tables' rows and columns.
_ORDERED = {("grid", "methods"), ("tasks",), ("sources",)}


def _keys_reversed(value, path=()):
    """The config with the keys of every other mapping in it, at every depth, in reverse order."""
    if not isinstance(value, dict):
        return value
    items = list(value.items()) if path in _ORDERED else list(value.items())[::-1]
    return {k: _keys_reversed(v, (*path, k)) for k, v in items}


def test_the_same_config_with_its_keys_in_another_order_has_nothing_to_do(finished):
    """Snakemake compares params by repr, which for a dict follows the file's key order: the
    rules pass config sections (a task's spec, a source's, the Fisher's, an analysis's options)
    with their keys sorted, so that rewriting the file so reruns no job."""
    config = yaml.safe_load((finished / "c.yaml").read_text())
    reordered = _keys_reversed(config)
    assert list(reordered) == list(config)[::-1] and list(reordered["fisher"]) == list(config["fisher"])[::-1]
    assert reordered == config
    assert _dry(finished, reordered) == {}


def test_the_order_of_the_methods_is_kept(finished):
    """The order of grid.methods is the order of the overhead table's penalties: changing it
    reruns that analysis (and the report), and nothing trains again."""
    config = yaml.safe_load((finished / "c.yaml").read_text())
    config["grid"]["methods"] = dict(reversed(list(config["grid"]["methods"].items())))
    planned = _dry(finished, config)
    assert planned.get("overhead") == 1 and "report" in planned, planned
    assert "finetune_main" not in planned and "estimate_fisher" not in planned and "prepare_task" not in planned


def test_a_finetune_key_reruns_every_finetune_and_what_follows(finished):
    config = yaml.safe_load((finished / "c.yaml").read_text())
    config["finetune"]["steps"] += 1
    planned = _dry(finished, config)
    # none, l2, l2_sp at two settings, l2_sp_fisher: five run groups (each job trains its two
    # replicates)
    assert planned.get("finetune_main") == 5, planned
    assert {"aggregate", "report", "activations"} <= set(planned)
    assert "prepare_task" not in planned and "pretrain_source" not in planned and "estimate_fisher" not in planned


def test_a_new_method_adds_its_runs_only(finished):
    """gl_sp_fisher reads the Fisher that l2_sp_fisher already made: its group (two replicates)
    is the one new job, and the Fisher is not estimated again."""
    config = yaml.safe_load((finished / "c.yaml").read_text())
    config["grid"]["methods"]["gl_sp_fisher"] = {"alpha": [0.001]}
    planned = _dry(finished, config)
    assert planned.get("finetune_main") == 1, planned
    assert "estimate_fisher" not in planned and "prepare_task" not in planned


def test_a_fisher_key_reruns_the_fisher_and_its_methods_only(finished):
    config = yaml.safe_load((finished / "c.yaml").read_text())
    config["fisher"]["num_examples"] = 32
    planned = _dry(finished, config)
    assert planned.get("estimate_fisher") == 1, planned
    assert planned.get("finetune_main") == 1, planned  # l2_sp_fisher's group only
    assert "prepare_task" not in planned and "pretrain_source" not in planned


def test_a_figure_option_reruns_its_analysis_only(finished):
    """Fig. 4's option reruns Fig. 4's analysis and the report; the analysis reads the
    classifiers of replicate 0 of l2 and l2_sp (two settings), which are temporary files, so
    the three run groups that make them train again (with the same records) and no other."""
    config = yaml.safe_load((finished / "c.yaml").read_text())
    config["figures"]["activations"]["max_images"] = 32
    planned = _dry(finished, config)
    assert planned.get("finetune_main") == 3, planned
    assert planned.get("activations") == 1 and "report" in planned
    assert "pretrain_source" not in planned and "prepare_task" not in planned


def test_a_deleted_record_is_made_again(finished):
    """A deleted record is made again by its run group's job, and nothing else trains. (Had the
    group been one whose replicate 0 feeds Fig. 4, its remade classifier would rerun Fig. 4's
    analysis, and with it the other groups whose temporary classifiers that analysis reads.)"""
    config = yaml.safe_load((finished / "c.yaml").read_text())
    record = next((finished / "results" / "runs" / "main").rglob("none/*/freeze0/test/rep1/record.json"))
    backup = record.read_bytes()
    record.unlink()
    try:
        planned = _dry(finished, config)
        assert planned.get("finetune_main") == 1 and "aggregate" in planned, planned  # its group
    finally:
        record.write_bytes(backup)


def test_runs_logged_at_the_end_once_each(finished):
    """tracking.log_from: end: the log_runs job logged every record once, and found none logged
    before it (no fine-tune logged its own)."""
    import json

    from mlflow.tracking import MlflowClient

    counts = json.loads((finished / "results" / "tracking_logged.json").read_text())
    records = list((finished / "results" / "runs").rglob("record.json"))
    assert counts == {"records": len(records), "already": 0, "logged": len(records), "failed": 0}
    client = MlflowClient(tracking_uri=f"sqlite:///{finished / 'results' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("spbench-tiny")
    keys = [r.data.tags["spbench.run_key"] for r in client.search_runs([exp.experiment_id], max_results=1000)]
    assert sorted(keys) == sorted(str(p.parent.relative_to(finished / "results" / "runs")) for p in records)
