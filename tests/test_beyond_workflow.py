"""End to end, the real `snakemake` CLI on a config beyond the paper's: WiSE-FT's a chosen by
model selection from one training per fold (post hoc), a composed method (`lp_ft+l2_sp`) in
the run paths, and published numbers printed beside Table 2's cells."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spbench.results import read_parquet, read_record

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("beyond")
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config.pop("figures")
    config["grid"]["methods"] = {"none": {}, "wise_ft": {"mix": [0.0, 1.0]}, "lp_ft+l2_sp": {"alpha": [0.01]}}
    config["published"] = {"source": "A. Nother (2099)", "note": "selected on the test set",
                           "values": {"digits-mod3-k5": {"none": 42.0, "wise_ft": 43.5}}}
    (workdir / "beyond.yaml").write_text(yaml.safe_dump(config))
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile", "beyond.yaml",
           "--cores", "2"]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return workdir


def test_post_hoc_values_are_selected_from_one_training_per_fold(workflow):
    runs = read_parquet(workflow / "results" / "runs.parquet")
    val = runs[(runs["method"] == "wise_ft") & (runs["experiment"] == "select")]
    assert sorted(val["setting"]) == ["lr=0.01_mix=0.0", "lr=0.01_mix=1.0"]
    trained = list((workflow / "results" / "runs" / "select").rglob("wise_ft/*/freeze0/val0/rep0/record.json"))
    assert [p.parent.parent.parent.parent.name for p in trained] == ["lr=0.01"]  # one training, no a in its path
    record = read_record(trained[0])
    assert [v["setting"] for v in record["variants"]] == sorted(val["setting"])
    chosen = json.loads(next((workflow / "results" / "selection").rglob("wise_ft.json")).read_text())
    assert chosen["setting"] in set(val["setting"])
    best = val.sort_values(["test_accuracy", "setting"], ascending=[False, True]).iloc[0]
    assert chosen["setting"] == best["setting"]
    main = runs[(runs["method"] == "wise_ft") & (runs["experiment"] == "main")]
    assert set(main["setting"]) == {chosen["setting"]} and len(main) == 2


def test_a_composed_method_runs_under_its_name(workflow):
    runs = read_parquet(workflow / "results" / "runs.parquet")
    main = runs[(runs["method"] == "lp_ft+l2_sp") & (runs["experiment"] == "main")]
    assert len(main) == 2 and set(main["setting"]) == {"alpha=0.01_beta=0.01_lr=0.01_probe_decay=0.0001"}
    for key in main["run_key"]:
        assert (workflow / "results" / "runs" / key / "record.json").is_file()


def test_published_numbers_are_reported(workflow):
    text = (workflow / "reports" / "published.md").read_text()
    assert "A. Nother (2099) (selected on the test set)" in text
    runs = read_parquet(workflow / "results" / "runs.parquet")
    none = 100 * runs[(runs["method"] == "none") & (runs["experiment"] == "main")]["test_accuracy"]
    assert f"{none.mean():.1f} ± {none.std():.1f}" in text and "42.0" in text and "43.5" in text
    assert (workflow / "reports" / "published.csv").is_file()
