"""Config validation and grid expansion."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from spbench.methods import METHODS
from spbench.config import (
    ConfigError,
    RunSpec,
    candidates,
    derive_seed,
    expand_runs,
    fmt_num,
    format_setting,
    load_config,
    parse_setting,
    validate_config,
)

from spbench.methods import method_class

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def demo() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_default_config_is_valid_and_gets_defaults(demo):
    """config.yaml validates; keys it leaves out get DEFAULTS."""
    config = validate_config(demo)
    assert config["fisher"]["samples"] == 1
    assert config["finetune"]["eval_batch_size"] == 512
    assert config["forkserver"] is True
    assert load_config(REPO / "config" / "tiny.yaml")["grid"]["freeze"] == [0]


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda c: c.update(resultz="x"), "resultz"),
        (lambda c: c.update(forkserver="false"), "forkserver"),  # what `--config forkserver=false` passes
        (lambda c: c["finetune"].update(lr=-0.1), "finetune.lr"),
        (lambda c: c["finetune"].update(bn_mode="frozen"), "finetune.bn_mode"),
        (lambda c: c["grid"]["methods"].update(l3={"alpha": [1.0], "beta": [0.0]}), "grid.methods.l3"),
        (lambda c: c["grid"]["methods"]["l2_sp"].update(gamma=[0.1]), "grid.methods.l2_sp.gamma"),
        (lambda c: c["grid"]["methods"].update(none={"alpha": [0.1]}), "grid.methods.none.alpha"),
        (lambda c: c["grid"]["methods"].update(bss={"k": [1.5]}), "grid.methods.bss.k[0]"),
        (lambda c: c["grid"]["methods"].update(bss={"eta": [0.001], "k": [1, 0]}), "grid.methods.bss.k[1]"),
        (lambda c: c["grid"]["methods"].update(lwf={"temperature": [0.0]}), "grid.methods.lwf.temperature[0]"),
        (lambda c: c["grid"]["methods"]["l2"].update(alpha=[0.01, 0.01]), "grid.methods.l2.alpha"),
        (lambda c: c["grid"].update(penalties=c["grid"].pop("methods")), "grid.penalties"),
        (lambda c: c["figures"]["alpha_beta"].update(penalty=c["figures"]["alpha_beta"].pop("method")),
         "figures.alpha_beta.penalty"),
        (lambda c: c["figures"]["freeze"].update(penalties=c["figures"]["freeze"].pop("methods")),
         "figures.freeze.penalties"),
        (lambda c: c["figures"]["activations"].update(penalties=c["figures"]["activations"].pop("methods")),
         "figures.activations.penalties"),
        (lambda c: c["figures"]["alpha_beta"].update(method="bss"), "figures.alpha_beta.method"),
        (lambda c: c["grid"]["methods"].pop("lwf") and c["figures"]["freeze"].update(methods=["lwf"]), "figures.freeze"),
        (lambda c: c["grid"]["targets"].append("caltech"), "grid.targets[3]"),
        (lambda c: c["grid"].update(freeze=[9]), "grid.freeze"),
        (lambda c: c["sources"]["digits-src"].update(arch="resnet9000"), "sources.digits-src.arch"),
        (lambda c: c["tasks"]["digits-mod3-k5"].update(per_clas=5), "tasks.digits-mod3-k5"),
        (lambda c: c["tasks"]["digits-mod3-k5"].update(builder="nope"), "tasks.digits-mod3-k5.builder"),
        (lambda c: c["sources"]["digits-src"].update(weights="file"), "sources.digits-src.path"),
        (lambda c: c["sources"]["digits-src"].update(weights="file", path="/no/such.pt"), "sources.digits-src.path"),
    ],
)
def test_bad_config_names_the_key(demo, edit, key):
    """Every kind of mistake raises ConfigError whose message names the offending key."""
    config = copy.deepcopy(demo)
    edit(config)
    with pytest.raises(ConfigError) as err:
        validate_config(config)
    assert f"'{key}'" in str(err.value)


@pytest.mark.parametrize("old, new", [("grid.penalties", "grid.methods"), ("figures.alpha_beta.penalty", "figures.alpha_beta.method"),
                                      ("figures.freeze.penalties", "figures.freeze.methods"),
                                      ("figures.activations.penalties", "figures.activations.methods")])
def test_renamed_keys_name_the_rename(demo, old, new):
    """A config written for the penalty-only suite is refused with the key's new name."""
    *where, leaf = old.split(".")
    section = demo
    for part in where:
        section = section[part]
    section[leaf] = section.pop(new.rsplit(".", 1)[1])
    with pytest.raises(ConfigError, match="renamed") as err:
        validate_config(demo)
    assert f"'{old}'" in str(err.value) and f"'{new}'" in str(err.value)


def test_unlisted_hyper_parameters_take_their_defaults(demo):
    """alpha and beta are no longer required: a penalty listed without them gets 0.01 each,
    and a method listed with nothing (or null) gets all its defaults."""
    demo["grid"]["methods"]["l2_sp"].pop("alpha")
    demo["grid"]["methods"].update(bss=None, lwf={})
    config = validate_config(demo)
    assert candidates(config, "l2_sp") == [{"alpha": 0.01, "beta": 0.01, "lr": 0.05}]
    assert candidates(config, "none") == [{"lr": 0.05}]
    assert candidates(config, "bss") == [{"eta": 0.001, "k": 1, "lr": 0.05}]
    assert candidates(config, "lwf") == [{"lambda": 1.0, "temperature": 2.0, "lr": 0.05}]
    assert candidates(config, "l2") == [{"alpha": 0.001, "beta": 0.01, "lr": 0.05}, {"alpha": 0.01, "beta": 0.01, "lr": 0.05}]


def test_expand_runs_covers_the_study(demo):
    """Selection runs for every candidate of the tuned methods, one test-set setting per
    method in the grid, and the figures' runs; keys are unique; `none` has no α or β."""
    config = validate_config(demo)
    with pytest.raises(ValueError, match="selection"):
        expand_runs(config)
    runs = expand_runs(config, lambda s, t, m: candidates(config, m)[-1])
    assert len({r.key for r in runs}) == len(runs)
    select = [r for r in runs if r.experiment == "select"]
    assert {r.method for r in select} == {"l2", "l2_sp", "l2_sp_fisher", "wise_ft"}
    # 3 targets × 2 of 5 folds × (2 candidates of each penalty; WiSE-FT's 4 values of a, post hoc: one training)
    assert len(select) == 3 * 2 * (3 * 2 + 1) and {r.evaluation for r in select} == {"val0", "val1"}
    assert {r.setting_text for r in select if r.method == "wise_ft"} == {"lr=0.05"}
    main = [r for r in runs if r.experiment == "main"]
    # every registered method, each at one setting × 3 targets × 5 replicates
    assert {r.method for r in main} == set(METHODS)
    assert len(main) == len(METHODS) * 3 * 5
    assert {r.setting_text for r in main if r.method == "wise_ft"} == {"lr=0.05_mix=1.0"}  # the chosen a
    assert {r.setting_text for r in main if r.method == "bss"} == {"eta=0.001_k=1_lr=0.05"}
    assert {r.hparams["alpha"] for r in main if r.method == "l2_sp"} == {0.1}
    assert all(r.hparams == {} and r.setting_text == "lr=0.05" for r in runs if r.method == "none")
    fig1 = [r for r in runs if r.experiment == "alpha_beta"]
    assert len(fig1) == 4 * 2
    assert {(r.hparams["alpha"], r.hparams["beta"]) for r in fig1} == {(a, b) for a in (0.0, 0.01, 0.1, 1.0) for b in (0.0, 0.01)}
    assert sorted({r.freeze for r in runs if r.experiment == "freeze"}) == [1, 2, 3, 4]


def test_without_selection_every_candidate_is_a_test_run(demo):
    demo.pop("selection")
    config = validate_config(demo)
    runs = expand_runs(config)
    assert not [r for r in runs if r.experiment == "select"]
    assert {r.hparams["alpha"] for r in runs if r.experiment == "main" and r.method == "l2_sp"} == {0.01, 0.1}


def test_run_key_and_seed():
    """The key spells the identity with canonical numbers; the seed depends on (source,
    target, evaluation, replicate) only, so methods are compared on paired seeds."""
    setting = {"alpha": 0.1, "beta": 1e-5, "lr": 0.05}
    a = RunSpec("s", "t", "l2_sp", setting, 0, 3)
    assert a.key == "main/s/t/l2_sp/alpha=0.1_beta=1e-05_lr=0.05/freeze0/test/rep3"
    assert a.setting_text == "alpha=0.1_beta=1e-05_lr=0.05"
    assert a.hparams == {"alpha": 0.1, "beta": 1e-5} and a.lr == 0.05
    assert RunSpec("s", "t", "l2_sp", {"lr": 0.05, "beta": 1e-5, "alpha": 0.1}, 0, 3) == a  # order-free
    assert fmt_num(float("0.10")) == "0.1"
    b = RunSpec("s", "t", "l2", {"alpha": 0.01, "beta": 0.01, "lr": 0.01}, 2, 3, experiment="freeze")
    assert a.seed == b.seed
    assert a.seed == RunSpec("s", "t", "lwf", {"lambda": 1.0, "temperature": 2.0, "lr": 0.01}, 0, 3).seed
    assert a.seed != RunSpec("s", "t", "l2_sp", setting, 0, 4).seed
    assert a.seed != RunSpec("s", "u", "l2_sp", setting, 0, 3).seed
    assert a.seed != RunSpec("s", "t", "l2_sp", setting, 0, 3, evaluation="val0").seed
    with pytest.raises(ValueError):
        RunSpec("s", "t", "l2_sp", setting, 0, 3, evaluation="train")
    with pytest.raises(ValueError):
        RunSpec("s", "t", "l2_sp", setting, 0, 3, experiment="fig9")
    with pytest.raises(ValueError, match="lr"):
        RunSpec("s", "t", "l2_sp", {"alpha": 0.1, "beta": 1e-5}, 0, 3)
    assert derive_seed("x", 1) == derive_seed("x", 1) != derive_seed("x", 2)


def test_run_path_roundtrip():
    """A run's key is RunSpec.PATTERN filled with its wildcards; from_wildcards reads it back,
    and refuses a setting that is not in canonical form (two paths for one run)."""
    a = RunSpec("s", "t", "bss", {"eta": 0.001, "k": 2, "lr": 0.05}, 1, 0, evaluation="val2", experiment="select")
    assert a.key == "select/s/t/bss/eta=0.001_k=2_lr=0.05/freeze1/val2/rep0"
    assert a.key == RunSpec.PATTERN.format(**a.wildcards)
    assert set(a.wildcards) == set(RunSpec.WILDCARDS)
    for name, value in a.wildcards.items():
        assert re.fullmatch(RunSpec.WILDCARDS[name], value), name
    assert RunSpec.from_wildcards(a.wildcards) == a
    for bad in ("k=2_eta=0.001_lr=0.05", "eta=1e-3_k=2_lr=0.05", "eta=0.001_k=2,lr=.05", "eta=0.001_k=2_lr=0.05,"):
        with pytest.raises(ValueError):
            RunSpec.from_wildcards({**a.wildcards, "setting": bad})
    # k=2.0 is the canonical text of a float: the path parses, and the method refuses it
    # (the workflow's get_run_spec resolves the hyper-parameters of every requested path)
    spec = RunSpec.from_wildcards({**a.wildcards, "setting": "eta=0.001_k=2.0_lr=0.05"})
    with pytest.raises(ValueError, match="integer"):
        method_class("bss").resolve_hparams(spec.hparams)


def test_setting_text():
    """Sorted name=value pairs; floats in repr form, ints as integers; parse is its inverse
    and refuses anything but the canonical text."""
    setting = {"lr": 0.05, "k": 3, "eta": 1e-05, "beta": 0.0}
    text = format_setting(setting)
    assert text == "beta=0.0_eta=1e-05_k=3_lr=0.05"
    assert parse_setting(text) == setting
    assert type(parse_setting(text)["k"]) is int and type(parse_setting(text)["beta"]) is float
    assert format_setting({"alpha": 1}) == "alpha=1" and format_setting({"alpha": 1.0}) == "alpha=1.0"
    for bad in ("lr=0.05_alpha=0.1", "alpha", "alpha=0.10", "alpha=0.1,,lr=0.05", "1x=0.1"):
        with pytest.raises(ValueError):
            parse_setting(bad)


def test_run_groups_cover_every_run_once():
    """Every run belongs to exactly one run group (one job), whose members are its evaluations ×
    replicates; the demo's 283 fine-tunes are 82 jobs."""
    from collections import Counter

    from spbench.config import candidates, expand_runs, group_members, load_config, run_groups

    config = load_config(REPO / "config.yaml")
    assert run_groups(config)["main"] == (["test"], 5)
    assert run_groups(config)["select"] == (["val0", "val1"], 1)
    runs = expand_runs(config, lambda s, t, m: candidates(config, m)[0])
    groups = Counter((r.experiment, r.source, r.target, r.method, r.setting_text, r.freeze) for r in runs)
    assert len(runs) == 283 and len(groups) == 82
    members = set()
    for e, s, t, m, setting, f in groups:
        group = group_members(config, e, s, t, m, dict(next(r for r in runs if r.setting_text == setting).setting), f)
        assert all(r.experiment == e and r.setting_text == setting for r in group)
        members |= {r.key for r in group}
    assert members == {r.key for r in runs}


def test_a_run_key_reads_back():
    from spbench.config import RunSpec

    spec = RunSpec("src", "tgt", "l2_sp", {"alpha": 0.1, "beta": 0.01, "lr": 0.01, "steps": 5}, 2, 1,
                   evaluation="val0", experiment="select")
    assert RunSpec.from_key(spec.key) == spec
    for bad in ("main/src", spec.key + "/x", spec.key.replace("alpha=0.1", "alpha=0.10")):
        with pytest.raises(ValueError):
            RunSpec.from_key(bad)
