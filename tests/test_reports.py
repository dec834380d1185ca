"""Tables and figures from the run table (spbench.reports), on a small committed fixture.

The golden Markdown files live in tests/fixtures/expected/. After an intended change to the
tables, rewrite them with

    SPBENCH_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_reports.py

and review the diff before committing.
"""

from __future__ import annotations

import importlib.util
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spbench import reports
from spbench.results import read_parquet

FIXTURES = Path(__file__).resolve().parent / "fixtures"
RUNS_SMALL = FIXTURES / "runs_small.parquet"
EXPECTED = FIXTURES / "expected"
REGEN = os.environ.get("SPBENCH_REGEN_GOLDEN") == "1"
REGEN_HINT = (
    "if the change is intended, regenerate the golden files with "
    "`SPBENCH_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_reports.py` and review the diff"
)
PENALTIES = ["none", "l2", "l2_sp", "l2_sp_fisher"]


@pytest.fixture(scope="module")
def runs() -> pd.DataFrame:
    return read_parquet(RUNS_SMALL)


def _brute_force(runs: pd.DataFrame, column: str) -> dict[tuple, list[float]]:
    """Values of ``column`` per (source, target, penalty, alpha, beta), freeze == 0, by a plain loop."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in runs.to_dict("records"):
        if row["freeze"] == 0:
            groups[(row["source"], row["target"], row["penalty"], row["alpha"], row["beta"])].append(row[column])
    return groups


def _by_cell(frame: pd.DataFrame) -> dict[tuple, dict]:
    return {tuple(r[c] for c in reports.GROUP): r for r in frame.to_dict("records")}


# --------------------------------------------------------------------------- fixture


def test_fixture_is_what_its_generator_writes(runs):
    spec = importlib.util.spec_from_file_location("make_runs_small", FIXTURES / "make_runs_small.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pd.testing.assert_frame_equal(runs, module.make_runs())
    assert sorted(runs["penalty"].unique()) == sorted(PENALTIES)
    assert (runs["freeze"] > 0).sum() > 0


# --------------------------------------------------------------------------- tables


def test_table2_matches_brute_force(runs):
    t2 = reports.table2(runs)
    expected = _brute_force(runs, "test_accuracy")
    assert {"source", "target", "penalty", "alpha", "beta", "n", "mean", "std"} <= set(t2.columns)
    got = _by_cell(t2)
    assert set(got) == set(expected)
    for key, values in expected.items():
        assert got[key]["n"] == len(values) == 3
        assert got[key]["mean"] == pytest.approx(100 * statistics.mean(values), rel=1e-12)
        assert got[key]["std"] == pytest.approx(100 * statistics.stdev(values), rel=1e-9)
    # the freeze > 0 runs (accuracy ~95 %) are left out
    assert t2["mean"].max() < 90


def test_table3_matches_brute_force(runs):
    t3 = reports.table3(runs)
    drops = _brute_force(runs, "source_accuracy_drop")
    source = _brute_force(runs, "source_accuracy")
    pretrained = _brute_force(runs, "source_accuracy_pretrained")
    got = _by_cell(t3)
    assert set(got) == set(drops)
    for key, values in drops.items():
        assert got[key]["n"] == len(values) == 3
        assert got[key]["mean"] == pytest.approx(100 * statistics.mean(values), rel=1e-12)
        assert got[key]["std"] == pytest.approx(100 * statistics.stdev(values), rel=1e-9)
        assert got[key]["source_accuracy"] == pytest.approx(100 * statistics.mean(source[key]), rel=1e-12)
        assert got[key]["source_accuracy_pretrained"] == pytest.approx(100 * statistics.mean(pretrained[key]))
    assert (t3["mean"] < 0).all()


def test_table_order_penalties_then_others_alphabetically(runs):
    extra = runs[runs["penalty"] == "l2"].assign(penalty="delta")
    extra2 = runs[runs["penalty"] == "l2"].assign(penalty="bss")
    t2 = reports.table2(pd.concat([extra, runs, extra2], ignore_index=True))
    first_target = t2[t2["target"] == t2["target"].iloc[0]]
    assert first_target["penalty"].tolist() == ["none", "l2", "l2_sp", "l2_sp", "l2_sp_fisher", "bss", "delta"]
    assert first_target["alpha"].tolist()[2:4] == [0.01, 0.1]
    # natural order of targets: k5 before k10
    assert t2["target"].drop_duplicates().tolist() == ["digits-mod3-k5", "digits-mod3-k10"]


def test_single_replicate_has_nan_std_and_is_marked(runs):
    keep = ~((runs["penalty"] == "l2") & (runs["target"] == "digits-mod3-k5") & (runs["replicate"] > 0))
    t2 = reports.table2(runs[keep])
    cell = t2[(t2["penalty"] == "l2") & (t2["target"] == "digits-mod3-k5")].iloc[0]
    assert cell["n"] == 1 and math.isnan(cell["std"])
    text = reports.render_table2_markdown(t2)
    assert f"{cell['mean']:.2f} ± n/a (n=1)" in text
    assert "up to 3 replicates" in text


def test_missing_cell_renders_as_dash(runs):
    keep = ~((runs["penalty"] == "l2_sp_fisher") & (runs["target"] == "digits-mod3-k10"))
    text = reports.render_table2_markdown(reports.table2(runs[keep]))
    k10 = next(line for line in text.splitlines() if "digits-mod3-k10" in line)
    assert k10.rstrip(" |").endswith("—")


def test_setting_labels(runs):
    labels = list(reports.setting_labels(reports.table2(runs)).values())
    assert labels == ["none", "l2", "l2_sp (α=0.01, β=0.01)", "l2_sp (α=0.1, β=0.01)", "l2_sp_fisher"]


# --------------------------------------------------------------------------- golden


@pytest.mark.parametrize(
    "name, build",
    [
        ("table2.md", lambda r: reports.render_table2_markdown(reports.table2(r))),
        ("table3.md", lambda r: reports.render_table3_markdown(reports.table3(r))),
    ],
)
def test_markdown_matches_golden(runs, name, build):
    text = build(runs)
    path = EXPECTED / name
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"golden file {path} is missing; {REGEN_HINT}"
    expected = path.read_text(encoding="utf-8")
    assert text == expected, f"rendered {name} differs from {path}; {REGEN_HINT}\n--- got:\n{text}"


def test_markdown_layout(runs):
    text = reports.render_table2_markdown(reports.table2(runs))
    lines = text.splitlines()
    assert lines[0].startswith("**Table 2.**") and lines[1] == ""
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header[:2] == ["source", "target"]
    assert header[2:] == list(reports.setting_labels(runs[runs["freeze"] == 0]).values())
    assert len(lines) == 4 + 2  # caption, blank, header, rule, one row per target
    assert all(line.count("|") == lines[2].count("|") for line in lines[2:])


# --------------------------------------------------------------------------- figure


def _errorbar_extents(ax) -> set[tuple[float, float]]:
    """(low, high) of every error bar that seaborn drew (lines broken by NaN into bar + caps)."""
    out = set()
    for line in ax.lines:
        y = np.asarray(line.get_ydata(), dtype=float)
        if np.isnan(y).any():
            out.add((round(float(np.nanmin(y)), 6), round(float(np.nanmax(y)), 6)))
    return out


def test_fig2_on_fixture(runs):
    fig = reports.fig2(runs)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert ax.get_xlabel() == "target"
    assert ax.get_ylabel() == "test accuracy (%)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["digits-mod3-k5", "digits-mod3-k10"]
    (legend,) = fig.legends
    assert legend.get_title().get_text() == "penalty"
    entries = [t.get_text() for t in legend.get_texts()]
    assert entries == list(reports.setting_labels(runs[runs["freeze"] == 0]).values())
    assert {e.split(" ")[0] for e in entries} == set(PENALTIES)
    # error bars are mean ± sample std of the replicates, as in Table 2
    t2 = reports.table2(runs)
    expected = {(round(m - s, 6), round(m + s, 6)) for m, s in zip(t2["mean"], t2["std"])}
    assert _errorbar_extents(ax) == expected


def test_fig2_one_target_several_sources(runs):
    one = runs[runs["target"] == "digits-mod3-k5"]
    two = pd.concat([one, one.assign(source="other-src")], ignore_index=True)
    fig = reports.fig2(two)
    assert len(fig.axes) == 2
    assert [ax.get_title() for ax in fig.axes] == ["source: digits-src", "source: other-src"]
    for ax in fig.axes:
        assert ax.get_xlabel() == "target"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["digits-mod3-k5"]
    assert fig.axes[0].get_ylabel() == "test accuracy (%)"
    assert len(fig.legends[0].get_texts()) == 5


def test_write_reports(runs, tmp_path):
    out = tmp_path / "reports" / "demo"
    paths = reports.write_reports(runs, out)
    assert [p.name for p in paths] == ["table2.md", "table3.md", "table2.csv", "table3.csv", "fig2.png"]
    for path in paths:
        assert path.parent == out and path.stat().st_size > 0
    assert paths[4].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[0].read_text(encoding="utf-8") == reports.render_table2_markdown(reports.table2(runs))
    back = pd.read_csv(paths[2])
    pd.testing.assert_frame_equal(back, reports.table2(runs), check_dtype=False)


# --------------------------------------------------------------------------- errors


BUILDERS = [reports.table2, reports.table3, reports.fig2]


@pytest.mark.parametrize("build", BUILDERS, ids=lambda f: f.__name__)
def test_empty_table_is_refused(runs, build):
    with pytest.raises(ValueError, match="empty"):
        build(runs.iloc[0:0])


@pytest.mark.parametrize("build, column", [
    (reports.table2, "test_accuracy"),
    (reports.table2, "freeze"),
    (reports.table3, "source_accuracy_drop"),
    (reports.table3, "source_accuracy_pretrained"),
    (reports.fig2, "penalty"),
], ids=lambda x: getattr(x, "__name__", x))
def test_missing_column_is_named(runs, build, column):
    with pytest.raises(ValueError, match=rf"lacks the columns \['{column}'\]"):
        build(runs.drop(columns=[column]))


@pytest.mark.parametrize("build", BUILDERS, ids=lambda f: f.__name__)
def test_no_unfrozen_runs_is_refused(runs, build):
    with pytest.raises(ValueError, match=r"no runs with freeze == 0 \(freeze depths present: \[1, 2\]\)"):
        build(runs[runs["freeze"] > 0])


def test_duplicate_runs_are_refused(runs):
    with pytest.raises(ValueError, match="share one identity"):
        reports.table2(pd.concat([runs, runs.iloc[:1]], ignore_index=True))


def test_not_a_frame_is_refused(runs):
    with pytest.raises(TypeError, match="DataFrame"):
        reports.table2(runs.to_dict("records"))


def test_write_reports_refuses_empty_and_writes_nothing(runs, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        reports.write_reports(runs.iloc[0:0], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_render_markdown_needs_table_columns(runs):
    with pytest.raises(ValueError, match=r"lacks the columns \['n', 'mean', 'std'\]"):
        reports.render_table2_markdown(runs)
