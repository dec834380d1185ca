"""Config validation and grid expansion."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from spbench.config import (
    ConfigError,
    RunSpec,
    candidates,
    derive_seed,
    expand_runs,
    fmt_num,
    load_config,
    validate_config,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def demo() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_default_config_is_valid_and_gets_defaults(demo):
    """config.yaml validates; keys it leaves out get DEFAULTS."""
    config = validate_config(demo)
    assert config["fisher"]["samples"] == 1
    assert config["finetune"]["eval_batch_size"] == 512
    assert load_config(REPO / "config" / "tiny.yaml")["grid"]["freeze"] == [0]


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda c: c.update(resultz="x"), "resultz"),
        (lambda c: c["finetune"].update(lr=-0.1), "finetune.lr"),
        (lambda c: c["finetune"].update(bn_mode="frozen"), "finetune.bn_mode"),
        (lambda c: c["grid"]["penalties"].update(l3={"alpha": [1.0], "beta": [0.0]}), "grid.penalties.l3"),
        (lambda c: c["grid"]["penalties"]["l2_sp"].pop("alpha"), "grid.penalties.l2_sp.alpha"),
        (lambda c: c["grid"]["penalties"].update(none={"alpha": [0.1]}), "grid.penalties.none"),
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


def test_expand_runs_covers_the_study(demo):
    """Selection runs for every candidate of the tuned penalties, one test-set setting per
    penalty in the grid, and the figures' runs; keys are unique; `none` has α=β=0."""
    config = validate_config(demo)
    with pytest.raises(ValueError, match="selection"):
        expand_runs(config)
    runs = expand_runs(config, lambda s, t, p: candidates(config, p)[-1])
    assert len({r.key for r in runs}) == len(runs)
    select = [r for r in runs if r.experiment == "select"]
    assert {r.penalty for r in select} == {"l2", "l2_sp", "l2_sp_fisher"}
    assert len(select) == 3 * 2 * 3 and {r.evaluation for r in select} == {"val0"}
    main = [r for r in runs if r.experiment == "main"]
    assert len(main) == 7 * 3 * 3
    assert {r.alpha for r in main if r.penalty == "l2_sp"} == {0.1}
    assert all(r.alpha == r.beta == 0 for r in runs if r.penalty == "none")
    assert len([r for r in runs if r.experiment == "alpha_beta"]) == 4 * 2
    assert sorted({r.freeze for r in runs if r.experiment == "freeze"}) == [1, 2, 3, 4]


def test_without_selection_every_candidate_is_a_test_run(demo):
    demo.pop("selection")
    config = validate_config(demo)
    runs = expand_runs(config)
    assert not [r for r in runs if r.experiment == "select"]
    assert {r.alpha for r in runs if r.experiment == "main" and r.penalty == "l2_sp"} == {0.01, 0.1}


def test_run_key_and_seed():
    """The key spells the identity with canonical numbers; the seed depends on (source,
    target, replicate) only, so penalties are compared on paired seeds."""
    a = RunSpec("s", "t", "l2_sp", 0.1, 1e-5, 0, 3, lr=0.05)
    assert a.key == "main/s/t/l2_sp/a0.1_b1e-05_lr0.05/freeze0/test/rep3"
    assert fmt_num(float("0.10")) == "0.1"
    b = RunSpec("s", "t", "l2", 0.01, 0.01, 2, 3, lr=0.01, experiment="freeze")
    assert a.seed == b.seed
    assert a.seed != RunSpec("s", "t", "l2_sp", 0.1, 1e-5, 0, 4, lr=0.05).seed
    assert a.seed != RunSpec("s", "u", "l2_sp", 0.1, 1e-5, 0, 3, lr=0.05).seed
    assert a.seed != RunSpec("s", "t", "l2_sp", 0.1, 1e-5, 0, 3, lr=0.05, evaluation="val0").seed
    with pytest.raises(ValueError):
        RunSpec("s", "t", "l2_sp", 0.1, 1e-5, 0, 3, lr=0.05, evaluation="train")
    with pytest.raises(ValueError):
        RunSpec("s", "t", "l2_sp", 0.1, 1e-5, 0, 3, lr=0.05, experiment="fig9")
    assert derive_seed("x", 1) == derive_seed("x", 1) != derive_seed("x", 2)
