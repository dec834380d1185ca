"""Successive halving in model selection (selection.halving): rung budgets and sizes, the runs
of each rung, and the choice against the full selection's (the workflow end to end: tests/test_beyond_workflow.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from spbench.config import (ConfigError, RunSpec, candidates, first_survivors, format_setting, halving_budgets,
                            rung_runs, rung_sizes, selection_runs, validate_config)
from spbench.methods import HParam
from spbench.pipeline import halve, select_setting
from spbench.results import write_record
from test_results import make_record

REPO = Path(__file__).resolve().parents[1]


def tiny(halving: dict | None = None, **selection) -> dict:
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    config["grid"]["methods"] = {"l2": {"alpha": [0.01], "beta": [0.01]},
                                 "l2_sp": {"alpha": [0.001, 0.01, 0.1, 1.0], "beta": [0.01]}}
    config["selection"] = {"folds": 3, "use_folds": 1, "replicates": 1, "lr": [0.005, 0.01, 0.02], **selection}
    if halving:
        config["selection"]["halving"] = halving
    config.pop("figures")
    return validate_config(config)


def test_budgets_grow_by_eta_up_to_the_full_steps():
    config = tiny({"eta": 3, "rungs": 3})
    config["finetune"]["steps"] = 9000
    assert halving_budgets(config) == [1000, 3000, 9000]
    assert halving_budgets(tiny()) is None
    assert rung_sizes(20, 3, 3) == [20, 7, 3]
    assert rung_sizes(12, 3, 3) == [12, 4, 2]
    assert rung_sizes(2, 3, 4) == [2, 1, 1, 1]


def test_rungs_that_do_not_grow_are_refused():
    with pytest.raises(ConfigError, match="selection.halving"):
        tiny({"eta": 10, "rungs": 3})  # 10 steps: rungs of 1, 1 and 10 steps
    with pytest.raises(ConfigError, match="eta"):
        tiny({"eta": 1, "rungs": 3})


def test_rung_runs_say_their_steps_but_the_last():
    config = tiny({"eta": 3, "rungs": 3})  # finetune.steps 10: rungs of 1, 3 and 10 steps
    assert halving_budgets(config) == [1, 3, 10]
    with pytest.raises(ValueError, match="survivors"):
        selection_runs(config)
    runs = [r for r in selection_runs(config, first_survivors(config)) if r.method == "l2_sp"]
    by_steps = {}
    for run in runs:
        by_steps.setdefault(run.steps(10), []).append(run)
    assert {k: len(v) for k, v in by_steps.items()} == {1: 12, 3: 4, 10: 2}
    short = by_steps[1][0]
    assert "steps=1" in short.key and short.hparams == {"alpha": 0.001, "beta": 0.01}
    assert all("steps" not in r.key for r in by_steps[10])
    # the last rung's runs are the full selection's runs of the same settings
    full = selection_runs(tiny())
    assert {r.key for r in by_steps[10]} <= {r.key for r in full}
    # a key with steps reads back
    assert RunSpec.from_wildcards(short.wildcards) == short


def test_steps_is_no_method_hyper_parameter():
    with pytest.raises(ValueError, match="steps"):
        HParam("steps", int, 10)


def write_rung(tmp_path, config, rung, settings, score) -> list[Path]:
    paths = []
    for spec in rung_runs(config, "digits-src", "digits-mod3-k5", "l2_sp", rung, settings):
        steps = spec.steps(config["finetune"]["steps"])
        path = tmp_path / "runs" / spec.key / "record.json"
        write_record(path, make_record(experiment="select", source=spec.source, target=spec.target, method=spec.method,
                                       setting=spec.setting_text, run_key=spec.key, evaluation=spec.evaluation,
                                       replicate=spec.replicate, freeze=0, steps=steps,
                                       test_accuracy=score(spec.hparams["alpha"], spec.lr, steps)))
        paths.append(path)
    return paths


def run_selection(tmp_path, config, score) -> dict:
    """The workflow's selection for one (source, target, method), rung by rung, on records
    whose validation accuracy is ``score(alpha, lr, steps)``."""
    budgets = halving_budgets(config) or [config["finetune"]["steps"]]
    settings, rungs = candidates(config, "l2_sp"), []
    for rung in range(len(budgets)):
        paths = write_rung(tmp_path, config, rung, settings, score)
        if rung == len(budgets) - 1:
            return select_setting(paths, tmp_path / "selection.json", rungs)
        out = tmp_path / f"rung{rung}.json"
        settings = halve(paths, out, rung=rung, eta=config["selection"]["halving"]["eta"])["survivors"]
        rungs.append(out)


def clear(alpha, lr, steps):
    """Higher for smaller alpha and lr near 0.01, at every budget; more steps, higher scores."""
    return 0.5 + 0.1 * steps / 10 - 0.02 * abs(lr - 0.01) * 100 - 0.01 * (alpha * 1000) ** 0.25


def late_bloomer(alpha, lr, steps):
    """alpha=1.0 with lr=0.02 is the worst candidate after a few steps and the best at the end."""
    if (alpha, lr) == (1.0, 0.02):
        return 0.2 if steps < 10 else 0.99
    return clear(alpha, lr, steps)


def test_a_clear_ranking_gives_the_full_selections_choice(tmp_path):
    full = run_selection(tmp_path / "full", tiny(), clear)
    halved = run_selection(tmp_path / "halved", tiny({"eta": 3, "rungs": 3}), clear)
    assert halved["setting"] == full["setting"] == "alpha=0.001_beta=0.01_lr=0.01"
    assert [len(r["survivors"]) for r in halved["rungs"]] == [4, 2]
    assert len(halved["candidates"]) == 2 and len(full["candidates"]) == 12
    # two of twelve full-length runs instead of twelve
    written = sorted(p.parent.parent.parent.parent.name for p in (tmp_path / "halved").rglob("record.json"))
    assert len(written) == 12 + 4 + 2


def test_halving_can_drop_a_late_bloomer(tmp_path):
    """What the cheaper grid gives up: a candidate weak in the short rungs never reaches the
    full steps, where it would have won."""
    full = run_selection(tmp_path / "full", tiny(), late_bloomer)
    halved = run_selection(tmp_path / "halved", tiny({"eta": 3, "rungs": 3}), late_bloomer)
    assert full["setting"] == "alpha=1.0_beta=0.01_lr=0.02"
    assert halved["setting"] == "alpha=0.001_beta=0.01_lr=0.01"


def test_ties_keep_the_report_order(tmp_path):
    """Equal scores: the survivors are the first candidates in report order (smallest values)."""
    config = tiny({"eta": 3, "rungs": 2})
    paths = write_rung(tmp_path, config, 0, candidates(config, "l2_sp"), lambda a, lr, s: 0.5)
    kept = halve(paths, tmp_path / "rung0.json", rung=0, eta=3)["survivors"]
    assert kept == [{"alpha": 0.001, "beta": 0.01, "lr": 0.005}, {"alpha": 0.001, "beta": 0.01, "lr": 0.01},
                    {"alpha": 0.001, "beta": 0.01, "lr": 0.02}, {"alpha": 0.01, "beta": 0.01, "lr": 0.005}]


# The workflow end to end with selection.halving: tests/test_beyond_workflow.py (one snakemake run shared
# with the post-hoc, composed-method and published-numbers checks).
