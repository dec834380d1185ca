"""Every bad config is refused before any job starts, naming the key: one row per kind of
mistake (those refused well already, and those that got through or failed late before), each
applied to config/tiny.yaml; plus duplicate YAML keys through the real snakemake CLI."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spbench.config import ConfigError, read_yaml, validate_config

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
NAN, INF = float("nan"), float("inf")


def _set(path: str, value):
    def edit(c):
        *parents, last = path.split(".")
        node = c
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[last] = value
    return edit


def _del(path: str):
    def edit(c):
        *parents, last = path.split(".")
        node = c
        for p in parents:
            node = node[p]
        del node[last]
    return edit


# (id, edit, the key the message must name, a fragment of the reason)
CASES = [
    ("unknown top-level key", _set("resluts", "x"), "resluts", "Additional properties"),
    ("missing grid", _del("grid"), "<top level>", "'grid' is a required property"),
    ("unknown finetune key", _set("finetune.stpes", 5), "finetune.stpes", "Additional properties"),
    ("steps zero", _set("finetune.steps", 0), "finetune.steps", "less than the minimum"),
    ("steps float", _set("finetune.steps", 10.0), "finetune.steps", "not of type 'integer'"),
    ("steps string", _set("finetune.steps", "10"), "finetune.steps", "not of type 'integer'"),
    ("lr zero", _set("finetune.lr", 0), "finetune.lr", "minimum"),
    ("lr nan", _set("finetune.lr", NAN), "finetune.lr", "not of type 'number'"),
    ("lr infinite", _set("finetune.lr", INF), "finetune.lr", "not of type 'number'"),
    ("momentum above 1", _set("finetune.momentum", 1.5), "finetune.momentum", "maximum"),
    ("unknown schedule", _set("finetune.lr_schedule", "linear"), "finetune.lr_schedule", "is not one of"),
    ("milestone beyond steps", _set("finetune.lr_milestones", [10]), "finetune.lr_milestones[0]", "not before the last step"),
    ("unknown bn mode", _set("finetune.bn_mode", "frozen"), "finetune.bn_mode", "is not one of"),
    ("replicates float", _set("grid.replicates", 2.0), "grid.replicates", "not of type 'integer'"),
    ("replicates zero", _set("grid.replicates", 0), "grid.replicates", "minimum"),
    ("replicates bool", _set("grid.replicates", True), "grid.replicates", "not of type 'integer'"),
    ("duplicate targets", _set("grid.targets", ["digits-mod3-k5", "digits-mod3-k5"]), "grid.targets", "non-unique"),
    ("unknown target", _set("grid.targets", ["digits-mod3-k7"]), "grid.targets[0]", "no task named"),
    ("unknown source", _set("grid.sources", ["imagenet"]), "grid.sources[0]", "no source named"),
    ("empty methods", _set("grid.methods", {}), "grid.methods", "should be non-empty"),
    ("old key grid.penalties", _set("grid.penalties", {"l2": {}}), "grid.penalties", "renamed 'grid.methods'"),
    ("unknown method", _set("grid.methods.l2_spp", {}), "grid.methods.l2_spp", "unknown method"),
    ("unknown hyper-parameter", _set("grid.methods.l2.gamma", [0.1]), "grid.methods.l2.gamma", "no such hyper-parameter"),
    ("alpha nan", _set("grid.methods.l2.alpha", [NAN]), "grid.methods.l2.alpha[0]", "not of type 'number'"),
    ("alpha infinite", _set("grid.methods.l2.alpha", [INF]), "grid.methods.l2.alpha[0]", "not of type 'number'"),
    ("alpha negative", _set("grid.methods.l2.alpha", [-0.1]), "grid.methods.l2.alpha[0]", "minimum"),
    ("alpha duplicate", _set("grid.methods.l2_sp.alpha", [0.01, 0.01]), "grid.methods.l2_sp.alpha", "non-unique"),
    ("alpha not a list", _set("grid.methods.l2.alpha", 0.1), "grid.methods.l2.alpha", "not of type 'array'"),
    ("integer hyper-parameter as float", _set("grid.methods.bss", {"k": [1.5]}), "grid.methods.bss.k[0]", "integer"),
    ("hyper-parameter out of range", _set("grid.methods.bss", {"k": [0]}), "grid.methods.bss.k[0]", "must lie in"),
    ("selection lr duplicate", _set("selection.lr", [0.01, 0.01]), "selection.lr", "non-unique"),
    ("use_folds above folds", _set("selection.use_folds", 5), "selection.use_folds", "more than selection.folds"),
    ("folds above per-class images", _set("selection.folds", 6), "selection.folds", "training images per class"),
    ("folds one", _set("selection.folds", 1), "selection.folds", "minimum"),
    ("task arg string", _set("tasks.digits-mod3-k5.per_class", "5"), "tasks.digits-mod3-k5.per_class", "must be an integer"),
    ("task arg zero", _set("tasks.digits-mod3-k5.per_class", 0), "tasks.digits-mod3-k5.per_class", "at least 1"),
    ("task arg negative", _set("tasks.digits-mod3-k5.per_class", -3), "tasks.digits-mod3-k5.per_class", "at least 1"),
    ("task arg float", _set("tasks.digits-mod3-k5.size", 16.0), "tasks.digits-mod3-k5.size", "must be an integer"),
    ("task seed negative", _set("tasks.digits-src.split_seed", -1), "tasks.digits-src.split_seed", "at least 0"),
    ("task fraction one", _set("tasks.digits-src.test_fraction", 1.0), "tasks.digits-src.test_fraction", "below 1"),
    ("task digits duplicate", _set("tasks.digits-src.digits", [0, 0, 1]), "tasks.digits-src.digits", "duplicate"),
    ("task unknown argument", _set("tasks.digits-mod3-k5.per_klass", 5), "tasks.digits-mod3-k5", "unexpected keyword"),
    ("unknown builder", _set("tasks.digits-mod3-k5.builder", "digits"), "tasks.digits-mod3-k5.builder", "unknown builder"),
    ("unknown architecture", _set("sources.digits-src.arch", "resnet7"), "sources.digits-src.arch", "unknown architecture"),
    ("source task unknown", _set("sources.digits-src.task", "nope"), "sources.digits-src.task", "no task named"),
    ("weights file missing", _set("sources.digits-src", {"task": "digits-src", "arch": "demo_resnet", "weights": "file",
                                                         "path": "nowhere.pt"}), "sources.digits-src.path", "no such file"),
    ("tracking uri scheme", _set("tracking.uri", "ftp://host/x"), "tracking.uri", "not an MLflow store"),
    ("tracking sqlite form", _set("tracking.uri", "sqlite:/results/mlflow.db"), "tracking.uri", "sqlite:///"),
    ("tracking http no host", _set("tracking.uri", "http://"), "tracking.uri", "names no host"),
    ("results absolute", _set("results", "/tmp/elsewhere"), "results", "leaves the working directory"),
    ("data_dir escapes", _set("data_dir", "../data"), "data_dir", "leaves the working directory"),
    ("reports escapes", _set("reports", "a/../../r"), "reports", "leaves the working directory"),
    ("reports empty", _set("reports", ""), "reports", "should be non-empty"),
    ("freeze depth too deep", _set("grid.freeze", [9]), "grid.freeze", "exceeds the 4 freezable units"),
    ("figure freeze depth too deep", _set("figures.freeze.depths", [9]), "figures.freeze.depths", "exceeds"),
    ("figure freeze depth duplicate", _set("figures.freeze.depths", [2, 2]), "figures.freeze.depths", "non-unique"),
    ("figure method not in grid", _set("figures.freeze.methods", ["lwf"]), "figures.freeze", "not in grid.methods"),
    ("published target not in grid", _set("published", {"source": "x", "values": {"nope": {"l2": 50.0}}}),
     "published.values.nope", "not a target of grid.targets"),
    ("published method not in grid", _set("published", {"source": "x", "values": {"digits-mod3-k5": {"lwf": 50.0}}}),
     "published.values.digits-mod3-k5.lwf", "not a method of grid.methods"),
    ("published accuracy above 100", _set("published", {"source": "x", "values": {"digits-mod3-k5": {"l2": 150}}}),
     "published.values.digits-mod3-k5.l2", "maximum"),
    ("composed method with a clash", _set("grid.methods.l2_sp+delta", {}), "grid.methods.l2_sp+delta", "both have"),
    ("figure old key", _set("figures.alpha_beta.penalty", "l2_sp"), "figures.alpha_beta.penalty", "renamed"),
    ("fig1 method without alpha", _set("figures.alpha_beta.method", "bss"), "figures.alpha_beta.method", "no alpha and beta"),
    ("activations target not in grid", _set("figures.activations.target", "digits-src"), "figures.activations.target",
     "must be one of grid.targets"),
    ("fisher estimator", _set("fisher.estimator", "empirical"), "fisher.estimator", "is not one of"),
    ("fisher examples zero", _set("fisher.num_examples", 0), "fisher.num_examples", "minimum"),
]


@pytest.mark.parametrize("case,edit,key,reason", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_refused_naming_the_key(case, edit, key, reason):
    config = copy.deepcopy(TINY)
    edit(config)
    with pytest.raises(ConfigError) as err:
        validate_config(config, base_dir=REPO)
    message = str(err.value)
    assert f"config key '{key}'" in message, message
    assert reason in message, message


def test_there_are_at_least_forty_kinds():
    assert len(CASES) >= 40


def test_outside_the_working_directory_with_the_opt_in():
    config = copy.deepcopy(TINY)
    config.update(results="/tmp/spbench-results", allow_outside_workdir=True)
    assert validate_config(config, base_dir=REPO)["results"] == "/tmp/spbench-results"


def test_duplicate_yaml_keys_are_refused(tmp_path):
    text = (REPO / "config" / "tiny.yaml").read_text() + "\nfinetune: {steps: 3, batch_size: 4, lr: 0.1, momentum: 0.9}\n"
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"config key 'finetune': given twice"):
        read_yaml(path)
    proc = subprocess.run([str(Path(sys.executable).with_name("snakemake")), "-s", str(REPO / "Snakefile"),
                           "--directory", str(tmp_path), "--configfile", str(path), "-n"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "config key 'finetune': given twice" in proc.stdout + proc.stderr
