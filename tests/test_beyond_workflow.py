"""End to end, the real `snakemake` CLI on one config beyond the paper's, run once for all these
checks: successive halving in model selection; WiSE-FT's a chosen from one training per fold and
rung (post hoc), also under halving; a composed method (`lp_ft+l2_sp`) in the run paths; and
published numbers printed beside Table 2's cells."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spbench.config import format_setting
from spbench.results import read_parquet, read_record

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("beyond")
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config.pop("figures")
    config["grid"]["replicates"] = 1
    config["grid"]["methods"] = {"none": {}, "l2_sp": {"alpha": [0.001, 0.01, 0.1, 1.0], "beta": [0.01]},
                                 "wise_ft": {"mix": [0.0, 1.0]}, "lp_ft+l2_sp": {"alpha": [0.01]}}
    config["selection"]["halving"] = {"eta": 2, "rungs": 2}
    config["published"] = {"source": "A. Nother (2099)", "note": "selected on the test set",
                           "values": {"digits-mod3-k5": {"none": 42.0, "wise_ft": 43.5}}}
    (workdir / "beyond.yaml").write_text(yaml.safe_dump(config))
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile", "beyond.yaml",
           "--cores", "2"]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return workdir


def test_the_workflow_halves_then_selects(workflow):
    """selection.halving: each rung's runs, its survivors file, the selection among the last
    rung's, and the test-set runs at the chosen setting."""
    sel = workflow / "results" / "selection" / "digits-src" / "digits-mod3-k5"
    rung0 = json.loads((sel / "l2_sp" / "rung0.json").read_text())
    assert rung0["steps"] == 5 and len(rung0["candidates"]) == 4 and len(rung0["survivors"]) == 2
    chosen = json.loads((sel / "l2_sp.json").read_text())
    assert {c["setting"] for c in chosen["candidates"]} == {format_setting(s) for s in rung0["survivors"]}
    assert chosen["rungs"] == [rung0]
    runs = read_parquet(workflow / "results" / "runs.parquet")
    runs = runs[runs["method"] == "l2_sp"]
    select = runs[runs["experiment"] == "select"]
    assert sorted(select["steps"].tolist()) == [5, 5, 5, 5, 10, 10]
    main = runs[runs["experiment"] == "main"]
    assert main["setting"].tolist() == [chosen["setting"]] and main["steps"].tolist() == [10]


def test_post_hoc_values_are_selected_from_one_training_per_fold_and_rung(workflow):
    """WiSE-FT: one training per rung (5, then 10 steps), no a in its path, scoring both values
    of a; the choice is the last rung's best row, and the test run interpolates at it."""
    runs = read_parquet(workflow / "results" / "runs.parquet")
    val = runs[(runs["method"] == "wise_ft") & (runs["experiment"] == "select")]
    assert sorted(val["setting"]) == ["lr=0.01_mix=0.0", "lr=0.01_mix=0.0_steps=5", "lr=0.01_mix=1.0",
                                      "lr=0.01_mix=1.0_steps=5"]
    trained = sorted((workflow / "results" / "runs" / "select").rglob("wise_ft/*/freeze0/val0/rep0/record.json"))
    assert [p.parents[3].name for p in trained] == ["lr=0.01", "lr=0.01_steps=5"]  # a training each, no a
    record = read_record(trained[0])
    assert [v["setting"] for v in record["variants"]] == ["lr=0.01_mix=0.0", "lr=0.01_mix=1.0"]
    chosen = json.loads(next((workflow / "results" / "selection").rglob("wise_ft.json")).read_text())
    last = val[val["steps"] == 10].sort_values(["test_accuracy", "setting"], ascending=[False, True])
    assert chosen["setting"] == last["setting"].iloc[0]
    main = runs[(runs["method"] == "wise_ft") & (runs["experiment"] == "main")]
    assert main["setting"].tolist() == [chosen["setting"]]


def test_a_composed_method_runs_under_its_name(workflow):
    runs = read_parquet(workflow / "results" / "runs.parquet")
    main = runs[(runs["method"] == "lp_ft+l2_sp") & (runs["experiment"] == "main")]
    assert main["setting"].tolist() == ["alpha=0.01_beta=0.01_lr=0.01_probe_decay=0.0001"]
    assert (workflow / "results" / "runs" / main["run_key"].iloc[0] / "record.json").is_file()


def test_published_numbers_are_reported(workflow):
    text = (workflow / "reports" / "published.md").read_text()
    assert "A. Nother (2099) (selected on the test set)" in text
    runs = read_parquet(workflow / "results" / "runs.parquet")
    none = 100 * runs[(runs["method"] == "none") & (runs["experiment"] == "main")]["test_accuracy"]
    delta = re.escape(f"{none.mean() - 42.0:+.1f}")
    assert re.search(rf"\| none +\| +{none.mean():.1f} \| +1 \| +42.0 \| +{delta} \|", text)
    assert re.search(r"\| wise_ft +\|.*\| +43.5 \|", text)
    assert (workflow / "reports" / "published.csv").is_file()
