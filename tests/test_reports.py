"""Tables and figures from the run table (spbench.reports), on small committed fixtures.

The fixtures (tests/fixtures/*.parquet) are written by tests/fixtures/make_runs_small.py. The
golden files live in tests/fixtures/expected/. After an intended change to the tables,
rewrite them with

    SPBENCH_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_reports.py

and review the diff before committing.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import statistics
import subprocess
import sys
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from spbench import reports
from spbench.config import format_setting, parse_setting
from spbench.results import OVERHEAD_SCHEMA, R2_SCHEMA, SchemaError, read_parquet, records_to_frame

FIXTURES = Path(__file__).resolve().parent / "fixtures"
RUNS_SMALL = FIXTURES / "runs_small.parquet"
R2_SMALL = FIXTURES / "r2_small.parquet"
OVERHEAD_SMALL = FIXTURES / "overhead_small.parquet"
EXPECTED = FIXTURES / "expected"
REGEN = os.environ.get("SPBENCH_REGEN_GOLDEN") == "1"
REGEN_HINT = (
    "if the change is intended, regenerate the golden files with "
    "`SPBENCH_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_reports.py` and review the diff"
)
PENALTIES = ["none", "l2", "l2_sp", "l2_sp_fisher", "l1_sp", "gl_sp", "gl_sp_fisher"]
K5, K10 = "digits-mod3-k5", "digits-mod3-k10"
SETTING = ("method", "setting")
KEY = ("source", "target", *SETTING)
#: LwF's setting in the tests that add a method beyond the penalties
LWF = "lambda=1.0_lr=0.05_temperature=2.0"


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_runs_small", FIXTURES / "make_runs_small.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen():
    return _load_generator()


@pytest.fixture(scope="module")
def runs() -> pd.DataFrame:
    return read_parquet(RUNS_SMALL)


@pytest.fixture(scope="module")
def r2() -> pd.DataFrame:
    return pq.read_table(R2_SMALL).to_pandas()


@pytest.fixture(scope="module")
def overhead() -> pd.DataFrame:
    return pq.read_table(OVERHEAD_SMALL).to_pandas()


def _key(row: dict) -> tuple:
    return tuple(row[c] for c in KEY)


def _by_cell(frame: pd.DataFrame) -> dict[tuple, dict]:
    return {_key(r): r for r in frame.to_dict("records")}


def _values(text: str) -> dict[str, float]:
    """A setting's hyper-parameter values, read by hand from its text (``name=value`` pairs
    joined by underscores; a value holds no underscore)."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"([A-Za-z][A-Za-z0-9_]*?)=([^_=]+)(?:_|$)", text)}


def _respell(frame: pd.DataFrame, method: str | None = None, hparams: dict | None = None, **values) -> pd.DataFrame:
    """The rows with another method and/or setting, as the workflow would write them: ``hparams``
    replaces the hyper-parameters (the learning rate kept), ``values`` changes single ones
    (``lr`` among them); the setting text, typed columns and run key follow."""
    out = frame.copy()
    if method is not None:
        out["method"] = method
    settings = []
    for text in out["setting"]:
        setting = parse_setting(text)
        if hparams is not None:
            setting = {**hparams, "lr": setting["lr"]}
        settings.append({**setting, **values})
    out["setting"] = [format_setting(v) for v in settings]
    out["hparams_json"] = [json.dumps({k: x for k, x in v.items() if k != "lr"}, sort_keys=True) for v in settings]
    for name in ("alpha", "beta", "lr"):
        out[name] = [float(v.get(name, math.nan)) for v in settings]
    out["run_key"] = [f"{r.experiment}/{r.source}/{r.target}/{r.method}/{r.setting}/freeze{r.freeze}/"
                      f"{r.evaluation}/rep{r.replicate}" for r in out.itertuples(index=False)]
    return out


def _runs_of(gen, method: str, hparams: dict, accuracy: dict, *, lr: float = 0.05, drop: float = -0.02,
             evaluation: str = "test", experiment: str = "main", replicates: int = 3, seed: int = 7,
             correct: dict | None = None) -> pd.DataFrame:
    """Runs of ``method`` in the fixture's schema (:func:`make_runs_small.record`): ``accuracy``
    per target, freeze 0; ``correct`` fixes the counts per (target, replicate)."""
    rng = np.random.default_rng(seed)
    records = [gen.record(target, method, hparams, 0, rep, acc, drop, rng, lr=lr, evaluation=evaluation,
                          experiment=experiment, n_method_parameters=195, retention_head="method",
                          correct=(correct or {}).get((target, rep)))
               for target, acc in accuracy.items() for rep in range(replicates)]
    return records_to_frame(records)


# --------------------------------------------------------------------------- brute force


def _brute_selected(runs: pd.DataFrame) -> dict[tuple, tuple]:
    """(source, target, method) -> selected (method, setting), by plain loops: the highest mean,
    ties to the smallest value of each hyper-parameter in the order of their names."""
    scores: dict[tuple, list[float]] = defaultdict(list)
    for row in runs.to_dict("records"):
        if row["evaluation"].startswith("val") and row["freeze"] == 0:
            scores[_key(row)].append(100 * row["test_accuracy"])
    best: dict[tuple, tuple] = {}
    for key, values in scores.items():
        source, target, method, setting = key
        hparams = _values(setting)
        rank = (round(statistics.mean(values), 9), *(-hparams[name] for name in sorted(hparams)))
        group = (source, target, method)
        if group not in best or rank > best[group][0]:
            best[group] = (rank, (method, setting))
    return {group: setting for group, (_, setting) in best.items()}


def _unique_test_runs(runs: pd.DataFrame, freeze=0) -> list[dict]:
    """Test runs, each run once (rows differing only in experiment are one run)."""
    seen, out = set(), []
    for row in sorted(runs.to_dict("records"), key=lambda r: r.get("experiment") != "main"):
        if row["evaluation"] != "test" or (freeze is not None and row["freeze"] != freeze):
            continue
        ident = (*_key(row), row["freeze"], row["replicate"])
        if ident not in seen:
            seen.add(ident)
            out.append(row)
    return out


def _brute_cells(runs: pd.DataFrame, column: str) -> dict[tuple, list[float]]:
    """Values of ``column`` per reported cell: main test runs, freeze 0, the selected setting."""
    chosen = _brute_selected(runs)
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in _unique_test_runs(runs):
        if row.get("experiment", "main") != "main":
            continue
        setting = chosen.get((row["source"], row["target"], row["method"]))
        if setting is not None and setting != tuple(row[c] for c in SETTING):
            continue
        groups[_key(row)].append(row[column])
    return groups


def _brute_paired(runs: pd.DataFrame) -> dict[tuple, dict]:
    """Paired differences to the selected l2 setting, with statistics and scipy."""
    chosen = _brute_selected(runs)
    acc: dict[tuple, dict[int, float]] = defaultdict(dict)
    for row in _unique_test_runs(runs):
        acc[_key(row)][row["replicate"]] = row["test_accuracy"]
    out = {}
    for key, values in acc.items():
        source, target = key[:2]
        base = (source, target, *chosen[(source, target, "l2")])
        if key == base:
            continue
        common = sorted(set(values) & set(acc[base]))
        d = [100 * (values[r] - acc[base][r]) for r in common]
        n = len(d)
        sd = statistics.stdev(d) if n > 1 else math.nan
        half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
        out[key] = {"n": n, "delta": statistics.mean(d), "sd": sd, "low": statistics.mean(d) - half,
                    "high": statistics.mean(d) + half, "base": base[2:]}
    return out


# --------------------------------------------------------------------------- fixtures


def test_fixtures_are_what_the_generator_writes(gen, runs, r2, overhead):
    pd.testing.assert_frame_equal(runs, gen.make_runs())
    pd.testing.assert_frame_equal(r2, gen.make_r2())
    pd.testing.assert_frame_equal(overhead, gen.make_overhead())
    test = runs[runs["evaluation"] == "test"]
    assert sorted(test["method"].unique()) == sorted(PENALTIES)
    assert {"val0", "val1"} <= set(runs["evaluation"])
    assert sorted(test.loc[test["freeze"] > 0, "method"].unique()) == ["l2", "l2_sp"]
    grid = test[(test["method"] == "l2_sp") & (test["target"] == K5) & (test["freeze"] == 0)]
    assert grid["alpha"].nunique() == 3 and grid["beta"].nunique() == 3
    assert list(r2.columns) == R2_SCHEMA.names and list(overhead.columns) == OVERHEAD_SCHEMA.names
    # settings in canonical text, the typed columns and the JSON agreeing with it (NaN where a
    # method has no such hyper-parameter: none has neither alpha nor beta)
    for frame in (runs, r2):
        assert all(format_setting(parse_setting(t)) == t for t in frame["setting"])
    for row in runs.to_dict("records"):
        values = _values(row["setting"])
        assert row["lr"] == values["lr"]
        assert json.loads(row["hparams_json"]) == {k: v for k, v in values.items() if k != "lr"}
        for name in ("alpha", "beta"):
            assert row[name] == values[name] if name in values else math.isnan(row[name])
        assert row["run_key"] == (f"{row['experiment']}/{row['source']}/{row['target']}/{row['method']}/"
                                  f"{row['setting']}/freeze{row['freeze']}/{row['evaluation']}/rep{row['replicate']}")
    assert set(runs.loc[runs["method"] == "none", "setting"]) == {"lr=0.01"}
    assert set(runs.loc[runs["method"] == "l2", "setting"]) >= {"alpha=0.01_beta=0.01_lr=0.01"}
    assert set(runs["retention_head"]) == {"original"} and set(runs["n_method_parameters"]) == {0}


# --------------------------------------------------------------------------- selection


def test_selection_matches_brute_force(runs, gen):
    table = reports.selection_table(runs)
    scores: dict[tuple, list[float]] = defaultdict(list)
    folds: dict[tuple, set] = defaultdict(set)
    for row in runs.to_dict("records"):
        if row["evaluation"].startswith("val"):
            scores[_key(row)].append(row["test_accuracy"])
            folds[_key(row)].add(row["evaluation"])
    got = _by_cell(table)
    assert set(got) == set(scores)
    for key, values in scores.items():
        assert got[key]["n"] == len(values) == 4 and got[key]["folds"] == len(folds[key]) == 2
        assert got[key]["mean"] == pytest.approx(100 * statistics.mean(values), rel=1e-12)
        assert got[key]["std"] == pytest.approx(100 * statistics.stdev(values), rel=1e-9, abs=1e-12)
    chosen = _brute_selected(runs)
    selected = table.loc[table["selected"], list(KEY)].itertuples(index=False)
    marked = {(s, t, m): (m, text) for s, t, m, text in selected}
    assert marked == chosen
    assert table.groupby(["source", "target", "method"])["selected"].sum().eq(1).all()
    # the designed outcome, including the exact tie on k = 10 won by the smaller alpha
    assert set(chosen.values()) == {gen.penalty_setting(p, a, b, lr) for p, a, b, lr in gen.SELECTED}
    tie = table[(table["target"] == gen.TIE_TARGET) & (table["method"] == "l2_sp_fisher")]
    assert tie["mean"].nunique() == 1 and len(tie) == 2
    assert tie.loc[tie["selected"], "setting"].tolist() == ["alpha=0.1_beta=0.01_lr=0.01"]
    chosen_frame = reports.selected_settings(runs)
    assert list(chosen_frame.columns) == list(KEY)
    assert {tuple(r) for r in chosen_frame.itertuples(index=False)} == {(*g[:2], *s) for g, s in chosen.items()}


def test_selection_ties_go_to_smallest_alpha_then_beta_then_lr(runs):
    val = runs["evaluation"].str.startswith("val")
    flat = runs.assign(test_accuracy=np.where(val, 0.5, runs["test_accuracy"]))
    extra = _respell(flat[val & (flat["method"] == "l2") & (flat["alpha"] == 0.001)], beta=0.001)
    chosen = reports.selected_settings(pd.concat([flat, extra], ignore_index=True))
    l2 = chosen[chosen["method"] == "l2"]
    assert l2["setting"].drop_duplicates().tolist() == ["alpha=0.001_beta=0.001_lr=0.005"]
    assert len(l2) == 2  # one per target


def test_ties_compare_values_not_setting_text(runs):
    """1e-05 < 0.001 though "alpha=1e-05" sorts after "alpha=0.001" as text: selection, the
    report order and the paired baseline compare hyper-parameters as numbers."""
    val = runs["evaluation"].str.startswith("val")
    flat = runs.assign(test_accuracy=np.where(val, 0.5, runs["test_accuracy"]))
    tiny = _respell(flat[val & (flat["method"] == "l2") & (flat["alpha"] == 0.001)], alpha=1e-05)
    chosen = reports.selected_settings(pd.concat([flat, tiny], ignore_index=True))
    assert chosen.loc[chosen["method"] == "l2", "setting"].tolist() == ["alpha=1e-05_beta=0.01_lr=0.005"] * 2
    main = runs[runs["experiment"] == "main"]
    l2_sp = main[(main["method"] == "l2_sp") & (main["alpha"] == 0.1)]
    spread = pd.concat([main, _respell(l2_sp, alpha=10.0), _respell(l2_sp, alpha=1e-05)], ignore_index=True)
    t2 = reports.table2(spread)
    alphas = [_values(t)["alpha"] for t in t2.loc[(t2["target"] == K5) & (t2["method"] == "l2_sp"), "setting"]]
    assert alphas == [1e-05, 0.01, 0.1, 10.0]
    test = runs[(runs["evaluation"] == "test") & (runs["experiment"] == "main")]
    l2 = test[test["method"] == "l2"]
    paired = reports.paired_differences(pd.concat([test, _respell(l2, alpha=1e-05)], ignore_index=True))
    assert set(paired["baseline_setting"]) == {"alpha=1e-05_beta=0.01_lr=0.01"}


def test_selection_never_looks_at_test_runs(runs):
    test = runs["evaluation"] == "test"
    scrambled = runs.assign(test_accuracy=np.where(test, 1.0 - runs["test_accuracy"], runs["test_accuracy"]))
    pd.testing.assert_frame_equal(reports.selection_table(scrambled), reports.selection_table(runs))


def test_selection_needs_validation_runs(runs):
    only_test = runs[runs["evaluation"] == "test"]
    for build in (reports.selection_table, reports.selected_settings):
        with pytest.raises(reports.InsufficientDataError, match=r"no validation runs \(evaluation 'val<fold>'"):
            build(only_test)


# --------------------------------------------------------------------------- tables


def test_table2_matches_brute_force(runs):
    t2 = reports.table2(runs)
    expected = _brute_cells(runs, "test_accuracy")
    assert {"source", "target", "method", "setting", "n", "mean", "std"} <= set(t2.columns)
    got = _by_cell(t2)
    assert set(got) == set(expected)
    for key, values in expected.items():
        assert got[key]["n"] == len(values) == 3
        assert got[key]["mean"] == pytest.approx(100 * statistics.mean(values), rel=1e-12)
        assert got[key]["std"] == pytest.approx(100 * statistics.stdev(values), rel=1e-9)
    # one column per penalty: l2_sp's unselected main setting and Fig. 1's grid are left out
    assert t2.groupby("target")["method"].apply(list).map(sorted).tolist() == [sorted(PENALTIES)] * 2
    # neither validation runs nor frozen runs (all scoring > 85 %) slip in
    assert t2["mean"].max() < 80


def test_table2_paired_columns_match_brute_force(runs):
    t2 = reports.table2(runs)
    paired = _brute_paired(runs)
    for row in t2.to_dict("records"):
        if row["is_baseline"]:
            assert row["method"] == "l2" and math.isnan(row["delta"])
            continue
        want = paired[_key(row)]
        assert row["delta_n"] == want["n"] == 3
        assert row["delta"] == pytest.approx(want["delta"], rel=1e-12)
        assert row["delta_sd"] == pytest.approx(want["sd"], rel=1e-9)
        assert (row["delta_low"], row["delta_high"]) == pytest.approx((want["low"], want["high"]), rel=1e-9)
    assert t2["is_baseline"].sum() == 2


def test_table3_matches_brute_force(runs):
    t3 = reports.table3(runs)
    drops = _brute_cells(runs, "source_accuracy_drop")
    source = _brute_cells(runs, "source_accuracy")
    pretrained = _brute_cells(runs, "source_accuracy_pretrained")
    got = _by_cell(t3)
    assert set(got) == set(drops)
    for key, values in drops.items():
        assert got[key]["n"] == len(values) == 3
        assert got[key]["mean"] == pytest.approx(100 * statistics.mean(values), rel=1e-12)
        assert got[key]["std"] == pytest.approx(100 * statistics.stdev(values), rel=1e-9)
        assert got[key]["source_accuracy"] == pytest.approx(100 * statistics.mean(source[key]), rel=1e-12)
        assert got[key]["source_accuracy_pretrained"] == pytest.approx(100 * statistics.mean(pretrained[key]))
    assert (t3["mean"] < 0).all()


def test_runs_shared_by_two_experiments_count_once(runs):
    shared = runs[(runs["experiment"] == "alpha_beta") & (runs["alpha"] == 0.1) & (runs["beta"] == 0.01)]
    assert len(shared) == 3  # the fixture holds these runs twice: main and alpha_beta
    t2 = reports.table2(runs)
    assert t2.loc[(t2["method"] == "l2_sp") & (t2["target"] == K5), "n"].tolist() == [3]
    paired = reports.paired_differences(runs)
    assert (paired["n"] == 3).all()
    # without the experiment column (and without the second copy) the tables are the same
    plain = runs[runs["experiment"] != "alpha_beta"].drop(columns=["experiment"])
    pd.testing.assert_frame_equal(reports.table2(plain), t2)


def test_without_selection_every_setting_is_a_column(runs):
    main = runs[(runs["experiment"] == "main")]
    t2 = reports.table2(main)
    l2_sp = t2[(t2["method"] == "l2_sp") & (t2["target"] == K5)]
    assert l2_sp["setting"].tolist() == ["alpha=0.01_beta=0.01_lr=0.01", "alpha=0.1_beta=0.01_lr=0.01"]
    labels = list(reports.setting_labels(t2).values())
    assert labels == ["none", "l2", "l2_sp (α=0.01, β=0.01)", "l2_sp (α=0.1, β=0.01)", "l2_sp_fisher",
                      "l1_sp", "gl_sp", "gl_sp_fisher"]
    text = reports.render_table2(t2)
    assert "(Δ reference)" not in text  # one l2 column: the reference needs no mark


def test_lr_shows_in_labels_only_when_a_method_has_several(runs):
    main = runs[(runs["experiment"] == "main")]
    faster = _respell(main[main["method"] == "l2"], lr=0.02)
    t2 = reports.table2(pd.concat([main, faster], ignore_index=True))
    labels = list(reports.setting_labels(t2).values())
    assert labels[1:3] == ["l2 (α=0.01, β=0.01, lr=0.01)", "l2 (α=0.01, β=0.01, lr=0.02)"]
    assert labels[3] == "l2_sp (α=0.01, β=0.01)"
    # the l2 reference is the setting with most replicates, ties to the first in report order
    # (smallest alpha, then beta, then lr): both have 3, same alpha and beta, so the smaller lr
    base = t2[t2["is_baseline"]]
    assert base["setting"].tolist() == ["alpha=0.01_beta=0.01_lr=0.01"] * 2
    assert "(Δ reference)" in reports.render_table2(t2)


def test_table_order_methods_then_others_alphabetically(runs):
    assert reports.METHOD_ORDER[:7] == tuple(PENALTIES)
    assert reports.METHOD_ORDER[7:] == ("lwf", "delta", "bss", "co_tuning")
    main = runs[runs["experiment"] == "main"]
    l2 = main[main["method"] == "l2"]
    extra = _respell(l2, "delta", {"alpha": 0.01})
    extra2 = _respell(l2, "bss", {"eta": 0.001, "k": 1})
    extra3 = _respell(l2, "zz_custom", {"gamma": 0.5})
    extra4 = _respell(l2, "my_custom", {"gamma": 0.5})
    t2 = reports.table2(pd.concat([extra3, extra, main, extra2, extra4], ignore_index=True))
    first_target = t2[t2["target"] == t2["target"].iloc[0]]
    assert first_target["method"].tolist() == [
        "none", "l2", "l2_sp", "l2_sp", "l2_sp_fisher", "l1_sp", "gl_sp", "gl_sp_fisher", "delta", "bss",
        "my_custom", "zz_custom",
    ]
    assert [_values(t)["alpha"] for t in first_target["setting"].tolist()[2:4]] == [0.01, 0.1]
    # natural order of targets: k5 before k10
    assert t2["target"].drop_duplicates().tolist() == [K5, K10]


def test_single_replicate_has_nan_std_and_is_marked(runs):
    keep = ~((runs["method"] == "none") & (runs["target"] == K5) & (runs["replicate"] > 0))
    t2 = reports.table2(runs[keep])
    cell = t2[(t2["method"] == "none") & (t2["target"] == K5)].iloc[0]
    assert cell["n"] == 1 and math.isnan(cell["std"])
    assert cell["delta_n"] == 1 and math.isnan(cell["delta_low"])
    text = reports.render_table2_markdown(t2)
    assert f"{cell['mean']:.2f} ± n/a (n=1)  (Δ {cell['delta']:+.2f})" in text
    assert "up to 3 replicates" in text


def test_missing_cell_renders_as_dash(runs):
    keep = ~((runs["method"] == "gl_sp_fisher") & (runs["target"] == K10))
    text = reports.render_table2_markdown(reports.table2(runs[keep]))
    k10 = next(line for line in text.splitlines() if K10 in line)
    assert k10.rstrip(" |").endswith("—")


def test_selected_setting_without_test_runs_leaves_the_cell_empty(runs, caplog):
    keep = ~((runs["method"] == "l2_sp") & (runs["alpha"] == 0.1) & (runs["evaluation"] == "test"))
    with caplog.at_level(logging.WARNING, logger="spbench.reports"):
        t2 = reports.table2(runs[keep])
    assert "l2_sp" not in set(t2["method"])
    assert "no test runs of the selected setting" in caplog.text


# --------------------------------------------------------------------------- paired differences


def test_paired_differences_match_brute_force(runs):
    paired = reports.paired_differences(runs)
    expected = _brute_paired(runs)
    got = _by_cell(paired)
    assert set(got) == set(expected)
    # every other setting: l2_sp's whole grid on k = 5 included
    assert len(paired[(paired["target"] == K5) & (paired["method"] == "l2_sp")]) == 9
    for key, want in expected.items():
        row = got[key]
        assert row["n"] == want["n"]
        assert row["delta"] == pytest.approx(want["delta"], rel=1e-12)
        assert row["sd"] == pytest.approx(want["sd"], rel=1e-9)
        assert row["ci_low"] == pytest.approx(want["low"], rel=1e-9)
        assert row["ci_high"] == pytest.approx(want["high"], rel=1e-9)
        assert (row["baseline_method"], row["baseline_setting"]) == want["base"]
    assert set(paired["baseline_rule"]) == {"selected on validation folds"}


def test_paired_baseline_without_validation_is_the_l2_setting_with_most_replicates(runs):
    test = runs[runs["evaluation"] == "test"]
    l2 = test[(test["method"] == "l2") & (test["freeze"] == 0)]
    fewer = _respell(l2[l2["replicate"] < 2], alpha=0.001)  # 2 replicates, smaller alpha
    more = _respell(l2, alpha=0.1)  # 3 replicates, like the original; ties go to the smaller alpha (0.01)
    paired = reports.paired_differences(pd.concat([test, fewer, more], ignore_index=True))
    assert set(paired["baseline_setting"]) == {"alpha=0.01_beta=0.01_lr=0.01"}
    assert set(paired["baseline_method"]) == {"l2"} and set(paired["baseline_rule"]) == {"most replicates"}
    against_fewer = paired[(paired["method"] == "l2") & (paired["setting"] == "alpha=0.001_beta=0.01_lr=0.01")]
    assert against_fewer["n"].tolist() == [2, 2]


def test_paired_single_common_replicate_has_no_interval(runs):
    test = runs[runs["evaluation"] == "test"]
    keep = ~((test["method"] == "none") & (test["replicate"] > 0))
    paired = reports.paired_differences(test[keep])
    row = paired[paired["method"] == "none"].iloc[0]
    assert row["n"] == 1 and math.isnan(row["sd"]) and math.isnan(row["ci_low"]) and math.isnan(row["ci_high"])
    assert "| n/a |" in reports.render_paired(paired).replace("  ", " ").replace("  ", " ")


def test_paired_needs_the_baseline(runs):
    with pytest.raises(reports.InsufficientDataError, match=r"baseline method 'l2'"):
        reports.paired_differences(runs[runs["method"] != "l2"])
    t2 = reports.table2(runs[runs["method"] != "l2"])
    assert "delta" not in t2.columns
    assert "Δ" not in reports.render_table2(t2)


# --------------------------------------------------------------------------- methods beyond the penalties


def _md_rows(text: str) -> list[list[str]]:
    """The cells of a Markdown table's rows (header first, the rule left out)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]
    return [rows[0], *rows[2:]]


def _with_lwf(runs: pd.DataFrame, gen) -> tuple[pd.DataFrame, pd.DataFrame]:
    lwf = _runs_of(gen, "lwf", {"lambda": 1.0, "temperature": 2.0}, {K5: 0.65, K10: 0.72})
    return lwf, pd.concat([runs, lwf], ignore_index=True)


def test_a_method_beyond_the_penalties_is_its_own_column(runs, gen):
    lwf, both = _with_lwf(runs, gen)
    assert set(lwf["setting"]) == {LWF} and lwf["alpha"].isna().all() and lwf["beta"].isna().all()
    assert set(lwf["retention_head"]) == {"method"}
    t2 = reports.table2(both)
    # after the seven penalties, in METHOD_ORDER, on every target
    assert t2.groupby("target", sort=False)["method"].apply(list).tolist() == [[*PENALTIES, "lwf"]] * 2
    expected = _brute_cells(both, "test_accuracy")
    got = _by_cell(t2)
    assert set(got) == set(expected) and {k for k in got if k[2] == "lwf"} == {
        ("digits-src", K5, "lwf", LWF), ("digits-src", K10, "lwf", LWF)}
    for key, values in expected.items():
        assert got[key]["n"] == len(values) == 3
        assert got[key]["mean"] == pytest.approx(100 * statistics.mean(values), rel=1e-12)
        assert got[key]["std"] == pytest.approx(100 * statistics.stdev(values), rel=1e-9)
    paired = _brute_paired(both)
    for target in (K5, K10):
        row, want = got[("digits-src", target, "lwf", LWF)], paired[("digits-src", target, "lwf", LWF)]
        assert not row["is_baseline"] and row["delta_n"] == want["n"] == 3
        assert row["delta"] == pytest.approx(want["delta"], rel=1e-12)
        assert (row["delta_low"], row["delta_high"]) == pytest.approx((want["low"], want["high"]), rel=1e-9)
    # the penalties' cells are the fixture's own
    pd.testing.assert_frame_equal(t2[t2["method"] != "lwf"].reset_index(drop=True), reports.table2(runs))
    assert reports.setting_labels(t2)[("lwf", LWF)] == "lwf"
    header, *body = _md_rows(reports.render_table2(t2))
    assert header == ["source", "target", *PENALTIES, "lwf"]
    lwf_k5 = got[("digits-src", K5, "lwf", LWF)]
    assert body[0][-1].startswith(f"{lwf_k5['mean']:.2f} ± {lwf_k5['std']:.2f}  (Δ {lwf_k5['delta']:+.2f} [")

    t3 = reports.table3(both)
    assert t3.groupby("target", sort=False)["method"].apply(list).tolist() == [[*PENALTIES, "lwf"]] * 2
    drops = _brute_cells(both, "source_accuracy_drop")
    got3 = _by_cell(t3)
    assert set(got3) == set(drops)
    for key in [k for k in drops if k[2] == "lwf"]:
        assert got3[key]["n"] == 3
        assert got3[key]["mean"] == pytest.approx(100 * statistics.mean(drops[key]), rel=1e-12)
        assert got3[key]["std"] == pytest.approx(100 * statistics.stdev(drops[key]), rel=1e-9)
    pd.testing.assert_frame_equal(t3[t3["method"] != "lwf"].reset_index(drop=True), reports.table3(runs))
    header3 = _md_rows(reports.render_table3(t3))[0]
    assert header3[-len(PENALTIES) - 1:] == [*PENALTIES, "lwf"]

    fig = reports.fig2(both)
    assert _legend(fig) == ("method", [*PENALTIES, "lwf"])
    bars = {(round(m - s, 6), round(m + s, 6)) for m, s in zip(t2["mean"], t2["std"])}
    assert _errorbar_extents(fig.axes[0]) == bars


def _lwf_selection(gen) -> pd.DataFrame:
    """LwF candidates λ ∈ {2, 10} (T = 2, lr = 0.05) on validation folds, 2 replicates: on k = 5
    λ = 10 scores higher; on k = 10 the two score exactly alike (λ = 10 copies λ = 2's counts);
    and test runs of both."""
    hp = {lam: {"lambda": lam, "temperature": 2.0} for lam in (2.0, 10.0)}
    frames = []
    for i, fold in enumerate(("val0", "val1")):
        low = _runs_of(gen, "lwf", hp[2.0], {K5: 0.86, K10: 0.90}, evaluation=fold, experiment="select",
                       replicates=2, seed=100 + i)
        tied = {(r.target, r.replicate): round(r.test_accuracy * r.n_test) for r in low.itertuples() if r.target == K10}
        high = _runs_of(gen, "lwf", hp[10.0], {K5: 0.97, K10: 0.90}, evaluation=fold, experiment="select",
                        replicates=2, seed=200 + i, correct=tied)
        frames += [low, high]
    frames += [_runs_of(gen, "lwf", hp[2.0], {K5: 0.64, K10: 0.70}, seed=300),
               _runs_of(gen, "lwf", hp[10.0], {K5: 0.66, K10: 0.73}, seed=301)]
    return pd.concat(frames, ignore_index=True)


def test_selection_over_a_non_alpha_hyper_parameter(runs, gen):
    lam2, lam10 = "lambda=2.0_lr=0.05_temperature=2.0", "lambda=10.0_lr=0.05_temperature=2.0"
    lwf = _lwf_selection(gen)
    both = pd.concat([runs, lwf], ignore_index=True)
    table = reports.selection_table(both)
    rows = table[table["method"] == "lwf"]
    # after the penalties; within LwF by the value of λ (2 before 10, unlike their text)
    methods = table.groupby("target", sort=False)["method"].apply(lambda m: list(dict.fromkeys(m)))
    assert methods.tolist() == [["l2", "l2_sp", "l2_sp_fisher", "lwf"]] * 2
    assert rows["setting"].tolist() == [lam2, lam10, lam2, lam10]
    assert (rows["n"] == 4).all() and (rows["folds"] == 2).all() and (rows["replicates"] == 2).all()
    # the brute force over every method: highest mean, ties to the smallest value in name order
    chosen = _brute_selected(both)
    marked = {(s, t, m): (m, text) for s, t, m, text in table.loc[table["selected"], list(KEY)].itertuples(index=False)}
    assert marked == chosen
    assert table.groupby(["source", "target", "method"])["selected"].sum().eq(1).all()
    # the designed outcome: the best mean on k = 5 (not the smaller λ), the exact tie on k = 10 to λ = 2
    k5, k10 = rows[rows["target"] == K5], rows[rows["target"] == K10]
    assert k5.set_index("setting")["mean"][lam10] > k5.set_index("setting")["mean"][lam2]
    assert k5.loc[k5["selected"], "setting"].tolist() == [lam10]
    assert k10["mean"].nunique() == 1 and k10.loc[k10["selected"], "setting"].tolist() == [lam2]
    picked = reports.selected_settings(both)
    assert picked[picked["method"] == "lwf"].values.tolist() == [
        ["digits-src", K5, "lwf", lam10], ["digits-src", K10, "lwf", lam2]]
    # the penalties' selection is the fixture's own
    pd.testing.assert_frame_equal(table[table["method"] != "lwf"].reset_index(drop=True), reports.selection_table(runs))
    # Table 2 reports the chosen λ only
    t2 = reports.table2(both)
    assert t2.loc[t2["method"] == "lwf", ["target", "setting"]].values.tolist() == [[K5, lam10], [K10, lam2]]
    expected = _brute_cells(both, "test_accuracy")
    got = _by_cell(t2)
    assert set(got) == set(expected)
    for key in [k for k in expected if k[2] == "lwf"]:
        assert got[key]["mean"] == pytest.approx(100 * statistics.mean(expected[key]), rel=1e-12)
    # rendered: one setting column, hyper-parameters by their symbols, lr last
    body = _md_rows(reports.render_selection(table))
    assert body[0] == ["source", "target", "method", "setting", "runs", "folds", "validation accuracy (%)",
                       "selected"]
    lwf_rows = [r for r in body[1:] if r[2] == "lwf"]
    assert [(r[1], r[3], r[-1]) for r in lwf_rows] == [
        (K5, "λ=2, T=2, lr=0.05", ""), (K5, "λ=10, T=2, lr=0.05", "yes"),
        (K10, "λ=2, T=2, lr=0.05", "yes"), (K10, "λ=10, T=2, lr=0.05", ""),
    ]
    # without selection both λ are columns, labelled by all their hyper-parameters (one lr: not shown)
    main = both[both["experiment"] == "main"]
    labels = reports.setting_labels(reports.table2(main))
    assert [v for (m, _), v in labels.items() if m == "lwf"] == ["lwf (λ=2, T=2)", "lwf (λ=10, T=2)"]


def test_a_method_selected_differently_per_target_is_one_column_and_one_legend_entry(runs, gen):
    """Selection chose λ = 10 on k5 and λ = 2 on k10: Tables 2 and 3 keep one `lwf` column,
    each cell naming its setting; Fig. 2 has one legend entry for LwF."""
    both = pd.concat([runs, _lwf_selection(gen)], ignore_index=True)
    t2, t3 = reports.table2(both), reports.table3(both)
    assert reports.method_columns(t2)[("lwf", "lambda=10.0_lr=0.05_temperature=2.0")] == "lwf"
    for table in (reports.render_table2(t2), reports.render_table3(t3)):
        body = _md_rows(table)
        assert body[0].count("lwf") == 1 and not any(h.startswith("lwf (") for h in body[0])
        column = body[0].index("lwf")
        cells = {row[1]: row[column] for row in body[1:]}
        assert "(λ=10, T=2)" in cells[K5] and "(λ=2, T=2)" in cells[K10]
        assert "differs between rows" in table.splitlines()[0]
    # the penalties, each one setting throughout, show none
    assert "(α=" not in reports.render_table2(reports.table2(runs))
    assert _legend(reports.fig2(both)) == ("method", [*PENALTIES, "lwf"])


# --------------------------------------------------------------------------- paper numbers


def test_paper_numbers_are_the_specification(runs):
    spec = {"indoor67": (79.6, 84.2, 84.0), "dogs120": (81.4, 85.1, 85.1),
            "caltech256-30": (81.5, 83.5, 83.3), "caltech256-60": (85.3, 86.4, 86.0)}
    got = {t: tuple(v[p][0] for p in ("l2", "l2_sp", "l2_sp_fisher")) for (_, t), v in reports.PAPER_TABLE2.items()}
    assert got == spec
    # the paper's caption: Places 365 for MIT Indoors, ImageNet for the others
    assert {s for (s, t) in reports.PAPER_TABLE2 if t == "indoor67"} == {"places365"}
    assert set(reports.PAPER_TABLE2) == set(reports.PAPER_TABLE3)
    ranges = {p: (min(v[p] for v in reports.PAPER_TABLE3.values()), max(v[p] for v in reports.PAPER_TABLE3.values()))
              for p in ("l2", "l2_sp", "l2_sp_fisher")}
    assert ranges == {"l2": (-24.1, -14.1), "l2_sp": (-5.3, -3.6), "l2_sp_fisher": (-4.9, -3.2)}


def _as_paper_target(runs: pd.DataFrame) -> pd.DataFrame:
    return runs.assign(source="imagenet", target=runs["target"].replace({K5: "dogs120"}))


def test_digits_tables_say_nothing_about_the_paper(runs):
    for fmt in reports.FORMATS:
        t2, t3 = reports.render_table2(reports.table2(runs), fmt), reports.render_table3(reports.table3(runs), fmt)
        for text in (t2, t3):
            assert "paper" not in text and "Li et al." not in text


def test_paper_rows_stand_beside_ours(runs):
    text = reports.render_table2(reports.table2(_as_paper_target(runs)))
    lines = text.splitlines()
    paper = [i for i, line in enumerate(lines) if line.startswith("|") and "(paper)" in line]
    assert len(paper) == 1 and "dogs120" in lines[paper[0] - 1]
    cells = [c.strip() for c in lines[paper[0]].strip("|").split("|")]
    assert cells[1:5] == ["dogs120 (paper)", "", "81.4 ± 0.2", "85.1 ± 0.2"]
    assert "Li et al. (2018), Table 2" in lines[0]
    # the pair the paper does not report (ImageNet -> digits k10) has no paper row
    assert not any("digits-mod3-k10 (paper)" in line for line in lines)
    t3 = reports.render_table3(reports.table3(_as_paper_target(runs)))
    row = next(line for line in t3.splitlines() if line.startswith("|") and "(paper)" in line)
    assert [c.strip() for c in row.strip("|").split("|")][2:5] == ["76.7", "", "-14.1"]


# --------------------------------------------------------------------------- golden


def _golden(name: str, text: str) -> None:
    path = EXPECTED / name
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"golden file {path} is missing; {REGEN_HINT}"
    expected = path.read_text(encoding="utf-8")
    assert text == expected, f"rendered {name} differs from {path}; {REGEN_HINT}\n--- got:\n{text}"


GOLDEN = [
    ("table2.md", lambda r, o: reports.render_table2(reports.table2(r), "markdown")),
    ("table2.tex", lambda r, o: reports.render_table2(reports.table2(r), "latex")),
    ("table2.html", lambda r, o: reports.render_table2(reports.table2(r), "html")),
    ("table3.md", lambda r, o: reports.render_table3(reports.table3(r))),
    ("selection.md", lambda r, o: reports.render_selection(reports.selection_table(r))),
    ("paired.md", lambda r, o: reports.render_paired(reports.paired_differences(r))),
    ("overhead.md", lambda r, o: reports.render_overhead(reports.overhead_table(o))),
    ("table2_paper.md", lambda r, o: reports.render_table2(reports.table2(_as_paper_target(r)))),
    ("table3_paper.md", lambda r, o: reports.render_table3(reports.table3(_as_paper_target(r)))),
    ("ranks.md", lambda r, o: reports.render_ranks(reports.rank_table(r))),
]


@pytest.mark.parametrize("name, build", [pytest.param(name, build, id=name) for name, build in GOLDEN])
def test_tables_match_golden(runs, overhead, name, build):
    _golden(name, build(runs, overhead))


def test_markdown_layout(runs):
    t2 = reports.table2(runs)
    text = reports.render_table2_markdown(t2)
    lines = text.splitlines()
    assert lines[0].startswith("**Table 2.**") and lines[1] == ""
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["source", "target", *PENALTIES]
    assert len(lines) == 4 + 2  # caption, blank, header, rule, one row per target
    assert all(line.count("|") == lines[2].count("|") for line in lines[2:])
    assert all(set(c.strip()) <= {"-", ":"} and len(c.strip()) >= 3 for c in lines[3].strip("|").split("|"))


def test_latex_is_a_booktabs_tabular(runs, overhead):
    for text, ncols in [
        (reports.render_table2(reports.table2(runs), "latex"), 2 + len(PENALTIES)),
        (reports.render_selection(reports.selection_table(runs), "latex"), 8),
        (reports.render_overhead(reports.overhead_table(overhead), "latex"), 11),
    ]:
        lines = text.splitlines()
        assert lines[0] == r"\begin{table}[htbp]" and lines[-1] == r"\end{table}"
        assert r"\caption{" in text and r"\label{tab:" in text
        spec = next(line for line in lines if line.startswith(r"\begin{tabular}{"))
        assert len(spec[len(r"\begin{tabular}{"):-1]) == ncols
        top, mid, bottom = (lines.index(rule) for rule in (r"\toprule", r"\midrule", r"\bottomrule"))
        assert top < mid < bottom
        for line in lines[top + 1:bottom]:
            if line != r"\midrule":
                assert line.endswith(r" \\") and line.count(" & ") == ncols - 1, line
        # specials escaped, symbols in math mode: the file compiles with booktabs alone
        assert not re.search(r"(?<!\\)[%_#]", text)
        assert not any(ch in text for ch in "±αβΔ—“”")
        assert r"\_" in text and r"\%" in text


class _TableParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.rows: list[list[str]] = []
        self.caption = ""
        self._in: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in.append(tag)
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        assert self._in and self._in[-1] == tag, (self._in, tag)
        self._in.pop()

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)  # <br>

    def handle_data(self, data):
        if "caption" in self._in:
            self.caption += data
        elif self._in and self._in[-1] in ("td", "th"):
            self.rows[-1][-1] += data


def test_html_is_a_table_with_a_caption(runs):
    text = reports.render_table2(reports.table2(runs), "html")
    parser = _TableParser()
    parser.feed(text.replace("<br>", "<br/>"))
    # pandas' Styler puts the column alignment in a <style> block just before the table
    assert parser.tags[:3] == ["style", "table", "caption"] and not parser._in
    assert re.search(r"#T_table2 \.col0 \{\s*text-align: left;", text)
    assert re.search(r"#T_table2 \.col2 \{\s*text-align: right;", text)
    assert parser.caption.startswith("Table 2. Target test accuracy (%)")
    assert parser.rows[0] == ["source", "target", *PENALTIES]
    assert len(parser.rows) == 3 and all(len(r) == 2 + len(PENALTIES) for r in parser.rows)
    assert parser.rows[1][4].startswith("68.82 ± 0.77(Δ +8.72 [")  # two lines joined by <br>


def test_unknown_format_is_refused(runs):
    with pytest.raises(ValueError, match=r"unknown format 'rst'"):
        reports.render_table2(reports.table2(runs), "rst")


def test_overhead_rows_in_penalty_order(overhead):
    table = reports.overhead_table(overhead)
    assert table["penalty"].tolist() == PENALTIES[1:]
    shuffled = reports.overhead_table(overhead.iloc[::-1])
    assert shuffled["penalty"].tolist() == PENALTIES[1:]


def test_overhead_table(overhead):
    table = reports.overhead_table(overhead)
    assert sorted(table["penalty"]) == sorted(PENALTIES[1:])
    table = table.set_index("penalty").loc[overhead["penalty"]].reset_index()
    assert np.allclose(table["flops_percent"], 100 * overhead["flops_ratio"])
    assert np.allclose(table["time_percent"], 100 * overhead["penalty_seconds"] / overhead["step_seconds"])
    text = reports.render_overhead(table)
    assert "torch.utils.flop_counter" in text and "counted analytically" in text
    assert "ResNet-101" not in text  # the paper's figure only beside a ResNet-101
    assert "ResNet-101" in reports.render_overhead(reports.overhead_table(overhead.assign(arch="resnet101")))


# --------------------------------------------------------------------------- figures


def _errorbar_extents(ax) -> set[tuple[float, float]]:
    """(low, high) of every error bar that seaborn drew (lines broken by NaN into bar + caps)."""
    out = set()
    for line in ax.lines:
        y = np.asarray(line.get_ydata(), dtype=float)
        if np.isnan(y).any():
            out.add((round(float(np.nanmin(y)), 6), round(float(np.nanmax(y)), 6)))
    return out


def _legend(fig) -> tuple[str, list[str]]:
    (legend,) = fig.legends
    return legend.get_title().get_text(), [t.get_text() for t in legend.get_texts()]


def test_fig1_draws_the_alpha_beta_grid(runs, gen):
    fig = reports.fig1(runs)
    (ax,) = fig.axes
    assert ax.get_title() == f"l2_sp: digits-src → {K5}"
    assert ax.get_xlabel() == "β" and ax.get_ylabel() == "test accuracy (%)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "$10^{-3}$", "$10^{-2}$"]
    title, entries = _legend(fig)
    assert title == "α" and entries == ["α = $10^{-2}$", "α = $10^{-1}$", "α = 1"]
    means: dict[float, list[float]] = {}
    for alpha in gen.GRID_ALPHAS:
        row = []
        for beta in gen.GRID_BETAS:
            cell = [r["test_accuracy"] for r in _unique_test_runs(runs)
                    if r["method"] == "l2_sp" and r["target"] == K5 and r["alpha"] == alpha and r["beta"] == beta]
            assert len(cell) == 3
            row.append(round(100 * statistics.mean(cell), 6))
        means[alpha] = row
    drawn = [tuple(np.round(line.get_ydata(), 6)) for line in ax.lines
             if len(line.get_ydata()) == 3 and not np.isnan(np.asarray(line.get_ydata(), float)).any()]
    assert sorted(drawn) == sorted(tuple(v) for v in means.values())
    assert len(_errorbar_extents(ax)) == 9  # mean ± sd at every grid point


def test_fig1_options_and_errors(runs):
    fig = reports.fig1(runs, x="alpha")
    assert fig.axes[0].get_xlabel() == "α" and _legend(fig)[0] == "β"
    with pytest.raises(reports.InsufficientDataError, match=r"method 'l2' with several alpha and several beta"):
        reports.fig1(runs, method="l2")
    with pytest.raises(reports.InsufficientDataError, match=r"method 'none' with several alpha"):
        reports.fig1(runs, "none")  # no alpha, no beta (NaN): no grid
    with pytest.raises(reports.InsufficientDataError, match=r"target = 'digits-mod3-k10'"):
        reports.fig1(runs, target=K10)
    with pytest.raises(ValueError, match="x must be 'alpha' or 'beta'"):
        reports.fig1(runs, x="lr")


def test_fig2_on_fixture(runs):
    fig = reports.fig2(runs)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert ax.get_xlabel() == "target"
    assert ax.get_ylabel() == "test accuracy (%)"
    assert [t.get_text() for t in ax.get_xticklabels()] == [K5, K10]
    title, entries = _legend(fig)
    assert title == "method" and entries == PENALTIES
    # error bars are mean ± sample std of the replicates, as in Table 2
    t2 = reports.table2(runs)
    expected = {(round(m - s, 6), round(m + s, 6)) for m, s in zip(t2["mean"], t2["std"])}
    assert _errorbar_extents(ax) == expected


def test_fig2_one_target_several_sources(runs):
    one = runs[runs["target"] == K5]
    two = pd.concat([one, one.assign(source="other-src")], ignore_index=True)
    fig = reports.fig2(two)
    assert len(fig.axes) == 2
    assert [ax.get_title() for ax in fig.axes] == ["source: digits-src", "source: other-src"]
    for ax in fig.axes:
        assert ax.get_xlabel() == "target"
        assert [t.get_text() for t in ax.get_xticklabels()] == [K5]
    assert fig.axes[0].get_ylabel() == "test accuracy (%)"
    assert len(fig.legends[0].get_texts()) == len(PENALTIES)


def _fig3_lines(ax):
    solid = [line for line in ax.lines if line.get_linestyle() == "-" and len(line.get_xdata()) > 1]
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    return solid, dashed


def test_fig3_freeze_depth_with_dashed_unfrozen_levels(runs, gen):
    fig = reports.fig3(runs)
    (ax,) = fig.axes
    assert ax.get_title() == f"digits-src → {K5}"
    assert ax.get_xlabel() == "frozen up to layer (freeze depth)" and ax.get_ylabel() == "test accuracy (%)"
    assert list(ax.get_xticks()) == [1, 2, 3]
    title, entries = _legend(fig)
    assert title == "method" and entries == ["l2", "l2_sp", "no freezing"]
    solid, dashed = _fig3_lines(ax)
    assert len(solid) == 2 and len(dashed) == 2
    t2 = reports.table2(runs)
    for line, dash, (penalty, alpha, beta) in zip(solid, dashed, gen.FROZEN):
        assert line.get_color() == dash.get_color()
        level = t2[(t2["target"] == K5) & (t2["method"] == penalty)]
        assert [(penalty, s) for s in level["setting"]] == [gen.penalty_setting(penalty, alpha, beta)]
        assert dash.get_ydata()[0] == pytest.approx(level["mean"].iloc[0])
        for depth, y in zip(line.get_xdata(), line.get_ydata()):
            values = [r["test_accuracy"] for r in _unique_test_runs(runs, freeze=int(depth))
                      if r["method"] == penalty and r["target"] == K5]
            assert y == pytest.approx(100 * statistics.mean(values))


def test_fig3_without_validation_uses_the_frozen_setting(runs):
    test = runs[runs["evaluation"] == "test"]
    fig = reports.fig3(test)
    solid, dashed = _fig3_lines(fig.axes[0])
    assert len(solid) == 2 and len(dashed) == 2
    levels = sorted(d.get_ydata()[0] for d in dashed)
    t2 = reports.table2(runs)
    assert levels == pytest.approx(sorted(t2.loc[(t2["target"] == K5) & t2["method"].isin(["l2", "l2_sp"]), "mean"]))


def test_fig3_needs_frozen_runs(runs):
    message = r"no test runs with freeze > 0 for the methods \['l2', 'l2_sp'\]"
    with pytest.raises(reports.InsufficientDataError, match=message):
        reports.fig3(runs[runs["freeze"] == 0])
    with pytest.raises(reports.InsufficientDataError, match=r"for the methods \['lwf'\]"):
        reports.fig3(runs, methods=["lwf"])


def test_fig3_draws_the_methods_asked_for(runs):
    fig = reports.fig3(runs, methods=["l2_sp"])
    solid, dashed = _fig3_lines(fig.axes[0])
    assert len(solid) == 1 and len(dashed) == 1
    assert _legend(fig) == ("method", ["l2_sp", "no freezing"])


def test_fig4_boxes_per_layer_and_method(r2):
    fig = reports.fig4(r2)
    (ax,) = fig.axes
    boxes = sum(len(c.boxes) for c in ax.containers)
    assert boxes == r2["layer_index"].nunique() * r2["method"].nunique() == 12
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3", "4"]
    assert ax.get_xlabel() == "layer (forward order)"
    low, high = ax.get_ylim()
    assert low <= r2["r2"].min() < 0 and 1.0 <= high <= 1.05
    title, entries = _legend(fig)
    assert title == "method" and entries == ["l2", "l2_sp", "l2_sp_fisher"]


def test_fig4_labels_a_method_with_several_settings_by_its_hyper_parameters(r2):
    l2_sp = r2[r2["method"] == "l2_sp"]
    lwf = r2[r2["method"] == "l2"].assign(method="lwf", setting=LWF)
    more = pd.concat([r2, l2_sp.assign(setting="alpha=1.0_beta=0.01_lr=0.01"), lwf], ignore_index=True)
    fig = reports.fig4(more)
    boxes = sum(len(c.boxes) for c in fig.axes[0].containers)
    assert boxes == 4 * 5
    assert _legend(fig) == ("method", ["l2", "l2_sp (α=0.1, β=0.01)", "l2_sp (α=1, β=0.01)", "l2_sp_fisher", "lwf"])
    with pytest.raises(ValueError, match="several R² rows share one"):
        reports.fig4(pd.concat([r2, r2.iloc[:1]], ignore_index=True))


def test_figures_are_not_managed_by_pyplot(runs):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    reports.fig2(runs)
    assert plt.get_fignums() == before


# --------------------------------------------------------------------------- writing, CLI

TABLES = ["table2", "table3", "selection", "paired", "ranks", "overhead"]
FIGURES = ["fig1", "fig2", "fig3", "fig4", "cd"]
ALL_FILES = [f"{t}.{e}" for t in TABLES for e in ("md", "tex", "html", "csv")] + [
    f"{f}.{e}" for f in FIGURES for e in ("png", "pdf")
] + ["report.html"]


@pytest.fixture(scope="module")
def cli_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "reports"
    rc = reports.main([str(RUNS_SMALL), str(out), "--r2", str(R2_SMALL), "--overhead", str(OVERHEAD_SMALL)])
    assert rc == 0
    return out


def test_cli_writes_every_table_and_figure(cli_out, runs, capsys):
    assert sorted(p.name for p in cli_out.iterdir()) == sorted(ALL_FILES)
    for name in ALL_FILES:
        assert (cli_out / name).stat().st_size > 0, name
    for fig in FIGURES:
        assert (cli_out / f"{fig}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (cli_out / f"{fig}.pdf").read_bytes()[:5] == b"%PDF-"
    assert (cli_out / "table2.md").read_text(encoding="utf-8") == reports.render_table2(reports.table2(runs))
    assert (cli_out / "table2.tex").read_text(encoding="utf-8") == (EXPECTED / "table2.tex").read_text(encoding="utf-8")
    back = pd.read_csv(cli_out / "table2.csv")
    pd.testing.assert_frame_equal(back, reports.table2(runs), check_dtype=False)
    back = pd.read_csv(cli_out / "selection.csv")
    pd.testing.assert_frame_equal(back, reports.selection_table(runs), check_dtype=False)


def test_cli_help_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "spbench.reports", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0
    assert "RUNS_PARQUET" in done.stdout and "OUT_DIR" in done.stdout
    assert "--r2" in done.stdout and "--overhead" in done.stdout
    assert "--fig1-method" in done.stdout and "--fig3-methods" in done.stdout
    assert "--fig1-penalty" not in done.stdout and "--fig3-penalties" not in done.stdout


def test_cli_figure_methods(tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="spbench.reports"):
        rc = reports.main([str(RUNS_SMALL), str(out), "--fig1-method", "l2", "--fig3-methods", "l2_sp"])
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert "fig1.png" not in names and {"fig2.png", "fig3.png", "fig3.pdf"} <= names
    assert "skipping fig1: fig1: no (source, target) has test runs (freeze == 0) of method 'l2'" in caplog.text


def test_cli_refuses_a_table_of_the_wrong_schema(tmp_path, r2):
    bad = tmp_path / "r2.parquet"
    pq.write_table(pa.Table.from_pandas(r2.drop(columns=["layer_index"]), preserve_index=False), bad)
    with pytest.raises(SchemaError, match=r"missing \['layer_index'\]"):
        reports.main([str(RUNS_SMALL), str(tmp_path / "out"), "--r2", str(bad)])
    assert not (tmp_path / "out").exists()


def test_write_reports_skips_what_the_data_cannot_support(runs, tmp_path, caplog):
    main = runs[(runs["experiment"] == "main")]
    with caplog.at_level(logging.INFO, logger="spbench.reports"):
        paths = reports.write_reports(main, tmp_path / "out")
    names = [p.name for p in paths]
    assert names == [f"{t}.{e}" for t in ("table2", "table3", "paired", "ranks") for e in ("md", "tex", "html", "csv")] + [
        "fig2.png", "fig2.pdf", "cd.png", "cd.pdf", "report.html"
    ]
    assert all(p.parent == tmp_path / "out" for p in paths)
    for needle in ("skipping selection: selection_table: no validation runs",
                   "skipping fig1: fig1: no (source, target)",
                   "skipping fig3: fig3: no test runs with freeze > 0",
                   "skipping overhead", "skipping fig4"):
        assert needle in caplog.text, needle


def test_write_reports_refuses_empty_and_writes_nothing(runs, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        reports.write_reports(runs.iloc[0:0], tmp_path / "out")
    with pytest.raises(reports.InsufficientDataError, match="support no table and no figure"):
        reports.write_reports(runs.iloc[:1].assign(evaluation="nope"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- errors


RUN_BUILDERS = [reports.table2, reports.table3, reports.fig2, reports.paired_differences, reports.fig1]


@pytest.mark.parametrize("build", [*RUN_BUILDERS, reports.selection_table, reports.fig3], ids=lambda f: f.__name__)
def test_empty_table_is_refused(runs, build):
    with pytest.raises(ValueError, match="empty"):
        build(runs.iloc[0:0])


@pytest.mark.parametrize("build, column", [
    (reports.table2, "test_accuracy"),
    (reports.table2, "freeze"),
    (reports.table2, "method"),
    (reports.table2, "setting"),
    (reports.table2, "evaluation"),
    (reports.table3, "source_accuracy_drop"),
    (reports.table3, "source_accuracy_pretrained"),
    (reports.fig2, "method"),
    (reports.fig3, "setting"),
    (reports.fig1, "alpha"),
    (reports.fig1, "beta"),
    (reports.fig1, "lr"),
    (reports.selection_table, "evaluation"),
    (reports.paired_differences, "replicate"),
], ids=lambda x: getattr(x, "__name__", x))
def test_missing_column_is_named(runs, build, column):
    with pytest.raises(ValueError, match=rf"lacks the columns \['{column}'\]"):
        build(runs.drop(columns=[column]))


@pytest.mark.parametrize("build, frame, column", [
    (reports.fig4, "r2", "layer_index"),
    (reports.overhead_table, "overhead", "step_flops"),
], ids=["fig4", "overhead_table"])
def test_analysis_tables_name_missing_columns(request, build, frame, column):
    data = request.getfixturevalue(frame)
    with pytest.raises(ValueError, match=rf"lacks the columns \['{column}'\]"):
        build(data.drop(columns=[column]))


@pytest.mark.parametrize("build", RUN_BUILDERS, ids=lambda f: f.__name__)
def test_no_unfrozen_test_runs_is_refused(runs, build):
    message = r"no test runs with freeze == 0 \(freeze depths present: \[1, 2, 3\]\)"
    with pytest.raises(reports.InsufficientDataError, match=message):
        build(runs[runs["freeze"] > 0])


@pytest.mark.parametrize("build", [*RUN_BUILDERS, reports.fig3], ids=lambda f: f.__name__)
def test_no_test_runs_is_refused(runs, build):
    message = r"no runs with evaluation == 'test' \(evaluations present: \['val0', 'val1'\]\)"
    with pytest.raises(reports.InsufficientDataError, match=message):
        build(runs[runs["evaluation"] != "test"])


def test_duplicate_runs_are_refused(runs):
    with pytest.raises(ValueError, match="share one identity"):
        reports.table2(pd.concat([runs, runs.iloc[:1]], ignore_index=True))


def test_not_a_frame_is_refused(runs):
    with pytest.raises(TypeError, match="DataFrame"):
        reports.table2(runs.to_dict("records"))


def test_render_needs_table_columns(runs):
    with pytest.raises(ValueError, match=r"lacks the columns \['n', 'mean', 'std'\]"):
        reports.render_table2_markdown(runs)
    with pytest.raises(ValueError, match=r"lacks the columns \['n', 'folds', 'mean', 'std', 'selected'\]"):
        reports.render_selection(runs)


def test_public_api_is_explicit():
    assert len(reports.__all__) == len(set(reports.__all__))
    for name in reports.__all__:
        obj = getattr(reports, name)
        if callable(obj) and not isinstance(obj, type):
            assert obj.__doc__, name


def test_summary_says_where_and_the_headline(runs, tmp_path):
    (tmp_path / "fig2.png").write_bytes(b"")
    text = reports.summary(runs, tmp_path, tracking_uri="sqlite:///results/mlflow.db")
    assert f"{tmp_path / 'table2.md'}" in text and f"{tmp_path / 'table3.md'}" in text
    assert f"{tmp_path / 'fig2.png'}" in text
    assert "ui --backend-store-uri sqlite:///results/mlflow.db" in text
    t2 = reports.table2(runs)
    cells = t2[~t2["is_baseline"] & t2["delta"].notna()]
    for method, d in cells.groupby("method"):
        above = int((d["delta_low"] > 0).sum())
        assert f"{method} {d['delta'].mean():+.2f} ({above}↑" in text
    assert "then open http://127.0.0.1:5000/#/experiments?workflowType=machine_learning" in text
    remote = reports.summary(runs, tmp_path, tracking_uri="http://host:5000", experiment_id="3")
    assert "open http://host:5000/#/experiments/3?workflowType=machine_learning" in remote


def test_a_figure_is_a_function_of_its_data(runs):
    """Fig. 2's jittered replicate dots are drawn the same way every time, and the caller's numpy
    random state is left as it was."""
    import io

    def png() -> bytes:
        buf = io.BytesIO()
        reports.fig2(runs).savefig(buf, format="png", dpi=60)
        return buf.getvalue()

    np.random.seed(123)
    first = png()
    after = np.random.random()
    np.random.seed(123)
    np.random.random()  # a different global state than the first call saw
    assert png() == first
    np.random.seed(123)
    png()
    assert np.random.random() == after


def test_published_numbers_beside_table2s_cells(tmp_path):
    """Each published number beside its Table 2 cell (mean, sd, n), the difference, a cell the
    grid did not run as n/a; the caption cites the source and its note; write_reports writes it."""
    from spbench.reports import published_table, render_published, table2, write_reports

    runs = read_parquet(RUNS_SMALL)
    published = {"source": "Someone et al. 2099", "note": "selected on the test set",
                 "values": {"digits-mod3-k5": {"none": 50.0, "l2": 60.5}, "digits-mod3-k10": {"lwf": 40.0}}}
    frame = published_table(runs, published)
    cells = table2(runs, baseline=None).set_index(["target", "method"])
    assert list(zip(frame["target"], frame["method"])) == [("digits-mod3-k5", "none"), ("digits-mod3-k5", "l2"),
                                                          ("digits-mod3-k10", "lwf")]
    for r in frame.iloc[:2].itertuples(index=False):
        cell = cells.loc[(r.target, r.method)]
        assert (r.mean, r.n) == (cell["mean"], cell["n"]) and r.difference == pytest.approx(r.mean - r.published)
    missing = frame.iloc[2]
    assert missing["n"] == 0 and math.isnan(missing["mean"]) and math.isnan(missing["difference"])
    text = render_published(frame)
    assert "Someone et al. 2099 (selected on the test set)" in text and re.search(r"\| +n/a \|", text)
    mean, sd = frame.iloc[1]["mean"], frame.iloc[1]["std"]
    assert f"{mean:.1f} ± {sd:.1f}" in text and f"{mean - 60.5:+.1f}" in text
    paths = write_reports(runs, tmp_path, published=published)
    assert tmp_path / "published.md" in paths and (tmp_path / "published.md").read_text() == text
