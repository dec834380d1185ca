"""Real inputs through the workflow and the pipeline: config checks of downloads, published
weights converted (and loaded without running code), and — end to end with the real
`snakemake` CLI against a local HTTP server — download, extract, prepare, source, Fisher; then a
fine-tune with the paper's augmentation on the prepared caches."""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from spbench.integrity import load_sealed
import yaml

from fake_sources import FileServer, Served, caltech_entries, make_tar
from spbench.config import ConfigError, RunSpec, validate_config
from spbench.datasets import convert_weights
from spbench.models import build_model

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def demo_weights(num_classes: int) -> dict:
    """A demo_resnet source in torchvision's naming (backbone at the top, ``fc`` the head)."""
    torch.manual_seed(0)
    state = build_model("demo_resnet", num_classes, 3).state_dict()
    return {(f"fc.{k[5:]}" if k.startswith("head.") else k.removeprefix("backbone.")): v for k, v in state.items()}


def workflow_config(server: FileServer, tmp_path: Path) -> dict:
    tar = make_tar(caltech_entries(per_class=(6, 7, 8)), tmp_path / "c.tar").read_bytes()
    buf = tmp_path / "w.pth"
    torch.save(demo_weights(3), buf)
    server.files["/256_ObjectCategories.tar"] = Served(tar)
    server.files["/demo-src.pth"] = Served(buf.read_bytes())
    return {
        "results": "results",
        "data_dir": "data",
        "reports": "reports",
        "tracking": {"uri": "sqlite:///results/mlflow.db", "experiment": "real-inputs"},
        "downloads": {
            "cal": {"url": server.url("/256_ObjectCategories.tar"), "checksum": sha(tar)},
            "weights": {"url": server.url("/demo-src.pth"), "checksum": sha(buf.read_bytes())},
        },
        "tasks": {
            "cal-src": {"builder": "caltech256", "images": "cal", "per_class": 3, "test_per_class": 2, "size": 20},
            "cal-tgt": {"builder": "caltech256", "images": "cal", "per_class": 2, "test_per_class": 3, "split_seed": 1,
                        "size": 20},
        },
        "sources": {"src": {"task": "cal-src", "arch": "demo_resnet", "weights": "download", "download": "weights",
                            "convert": "torchvision"}},
        "fisher": {"estimator": "exact", "num_examples": 5, "normalize": "mean"},
        "finetune": {"steps": 3, "batch_size": 4, "lr": 0.01, "momentum": 0.9, "augment": "paper", "crop": 16},
        "grid": {"sources": ["src"], "targets": ["cal-tgt"], "replicates": 1,
                 "methods": {"l2_sp_fisher": {"alpha": [0.1], "beta": [0.01]}}},
    }


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile", "c.yaml", *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def server():
    srv = FileServer().start()
    yield srv
    srv.stop()


@pytest.mark.e2e
def test_workflow_downloads_prepares_and_builds_the_source(server, tmp_path):
    config = workflow_config(server, tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    targets = ["results/sources/src/fisher.pt", "data/cal-tgt/meta.json"]
    proc = snakemake(tmp_path, "--cores", "2", *targets)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "data" / "extracted" / "cal" / "256_ObjectCategories" / "003.clutter").is_dir()
    split = pd.read_parquet(tmp_path / "data" / "cal-src" / "split.parquet")
    assert split.groupby(["label", "split"]).size().to_dict() == {(c, s): n for c in range(3)
                                                                  for s, n in (("test", 2), ("train", 3))}
    info = json.loads((tmp_path / "results" / "sources" / "src" / "info.json").read_text())
    assert info["weights"] == "download" and info["checksum"] == config["downloads"]["weights"]["checksum"]
    assert 0.0 <= info["test_accuracy"] <= 1.0
    blob = load_sealed(tmp_path / "results" / "sources" / "src" / "model.pt")  # sealed with its digest
    torch.testing.assert_close(blob["state_dict"]["head.weight"], demo_weights(3)["fc.weight"])
    assert len(server.requests) == 2  # one request per file

    # A fine-tune on the prepared caches with the paper's augmentation (in process: no tracking).
    from spbench.pipeline import finetune_run

    resolved = validate_config(config)
    spec = RunSpec("src", "cal-tgt", "l2_sp_fisher", {"alpha": 0.1, "beta": 0.01, "lr": resolved["finetune"]["lr"]}, 0, 0)
    src = tmp_path / "results" / "sources" / "src"
    kwargs = dict(source_model=src / "model.pt", source_info=src / "info.json", target_dir=tmp_path / "data" / "cal-tgt",
                  source_dir=tmp_path / "data" / "cal-src", fisher_path=src / "fisher.pt")
    rec1, _ = finetune_run(resolved, spec, record_out=tmp_path / "r1.json", **kwargs)
    rec2, _ = finetune_run(resolved, spec, record_out=tmp_path / "r2.json", **kwargs)
    assert rec1["n_train"] == 6 and rec1["n_test"] == 9 and rec1["num_classes"] == 3
    assert rec1["train_loss"] == rec2["train_loss"]  # augmentation is seeded by the run


def test_config_checks_downloads_by_key(server, tmp_path):
    base = workflow_config(server, tmp_path)
    validate_config(base)
    cases = [
        (lambda c: c["tasks"]["cal-src"].update(images="nope"), "tasks.cal-src.images"),
        (lambda c: c["sources"]["src"].update(download="nope"), "sources.src.download"),
        (lambda c: c["sources"]["src"].pop("convert"), "sources.src.convert"),
        (lambda c: c["downloads"]["cal"].update(checksum="sha1:abcdef0123"), "downloads.cal.checksum"),
        (lambda c: c["downloads"]["cal"].update(checksum="sha256:1234567"), "downloads.cal.checksum"),
        (lambda c: c["downloads"]["cal"].update(manual="x.tar"), "downloads.cal"),
        (lambda c: c["downloads"]["cal"].update(url="ftp://x"), "downloads.cal.url"),
        (lambda c: c["finetune"].update(augment="heavy"), "finetune.augment"),
    ]
    for edit, key in cases:
        config = copy.deepcopy(base)
        edit(config)
        with pytest.raises(ConfigError, match=f"'{key}'"):
            validate_config(config)


def test_places365_checkpoint_is_converted(tmp_path):
    """The Places365 release: {'state_dict': {'module.<torchvision name>': …}} with a 365-way fc."""
    torch.manual_seed(0)
    net = build_model("resnet18", 365, 3)
    tv = {(f"fc.{k[5:]}" if k.startswith("head.") else k.removeprefix("backbone.")): v for k, v in net.state_dict().items()}
    torch.save({"epoch": 90, "arch": "resnet18", "best_prec1": 54.7, "state_dict": {f"module.{k}": v for k, v in tv.items()}},
               tmp_path / "places.pth.tar")
    state = convert_weights(tmp_path / "places.pth.tar", "places365")
    model = build_model("resnet18", 365, 3)
    model.load_state_dict(state)  # strict: every name maps
    assert state["head.weight"].shape == (365, 512)
    torch.testing.assert_close(state["backbone.layer4.1.bn2.running_var"], tv["layer4.1.bn2.running_var"])
    with pytest.raises(ValueError, match="no 'fc.weight'"):
        torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "x.pth")
        convert_weights(tmp_path / "x.pth", "torchvision")


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_checkpoints_that_run_code_are_refused(tmp_path):
    """Weights are read with weights_only=True: a pickle that would call a function fails."""
    with open(tmp_path / "evil.pth", "wb") as fh:
        pickle.dump({"fc.weight": _Payload()}, fh, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        convert_weights(tmp_path / "evil.pth", "torchvision")
