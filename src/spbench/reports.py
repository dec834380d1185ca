"""Tables and figures: pure functions of the run table (``results/runs.parquet``).

Every builder takes a :class:`pandas.DataFrame` (the run table with the columns of
:data:`spbench.results.SCHEMA`, or for Fig. 4 and the overhead table the rows of
:data:`~spbench.results.R2_SCHEMA` / :data:`~spbench.results.OVERHEAD_SCHEMA`; only the
columns a builder uses are required) and returns a new object; nothing here reads files
except :func:`main`, and nothing writes except :func:`write_reports`.

Regenerate every table and figure from stored results, without training::

    python -m spbench.reports results/runs.parquet reports \\
        [--r2 results/activations.parquet] [--overhead results/overhead.parquet]

(:func:`main`; ``--help`` lists the options.)

Conventions shared by all outputs:

* Which runs count. ``evaluation == "test"`` runs (trained on the training set, scored on the
  test set) feed Tables 2 and 3, the paired differences and Figs. 1-3; ``evaluation ==
  "val{f}"`` runs (trained on the training set less fold f, scored on fold f) feed model
  selection only. Tables 2, 3, Fig. 1, Fig. 2 and the paired differences use ``freeze == 0``
  (nothing frozen), as in the paper; freezing is the subject of Fig. 3.
* A *setting* is one ``(method, setting)``: a method of :mod:`spbench.methods` and the
  canonical text of its hyper-parameters and learning rate (``alpha=0.01_beta=0.01_lr=0.05``,
  :func:`spbench.config.format_setting`); a *cell* is one ``(source, target)`` and one setting. Statistics are over the replicates of a cell: ``n`` is the number of runs with
  a non-missing value, ``mean`` their arithmetic mean and ``std`` the sample standard
  deviation (ddof = 1, NaN when ``n == 1``).
* One run, one row. A run table whose rows share the whole run identity
  (:data:`spbench.results.IDENTITY`) is refused. Rows that differ only in ``experiment`` (the
  part of the study that asked for the run: the workflow runs a setting wanted by two
  experiments once per experiment, with the same seed) are one run and counted once, the
  ``main`` row kept.
* Model selection (:func:`selection_table`): per (source, target, method), the setting with
  the highest mean validation accuracy; ties go to the smallest value of each hyper-parameter
  in the order of their names (for the penalties: alpha, then beta, then lr). Where a method
  was selected, Tables 2, 3 and Fig. 2 show its selected setting only (the
  paper reports the setting chosen by cross-validation); when the table has an
  ``experiment`` column they show the ``main`` experiment's runs only (not Fig. 1's grid).
* Accuracies are stored as fractions and reported in percent; differences and accuracy drops
  in percentage points.
* Methods are ordered as :data:`METHOD_ORDER` (the paper's penalties, then the later
  methods) and then any others alphabetically; within a method by the values of its
  hyper-parameters in the order of their names. Sources and
  targets are ordered naturally (``k5`` before ``k10``).
* Outputs the data cannot support raise :class:`InsufficientDataError` (a ``ValueError``)
  naming what is missing; :func:`write_reports` skips those and logs why.
"""

from __future__ import annotations

import argparse
import json
import html
import logging
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .config import parse_setting
from .report_items import ITEM_TITLES, item_title
from .results import IDENTITY, OVERHEAD_SCHEMA, R2_SCHEMA, SchemaError, read_parquet

__all__ = [
    "METHOD_ORDER",
    "SETTING",
    "GROUP",
    "FORMATS",
    "PAPER_TABLE2",
    "PAPER_TABLE3",
    "PAPER_PRETRAINED",
    "InsufficientDataError",
    "table2",
    "table3",
    "selection_table",
    "selected_settings",
    "rank_settings",
    "paired_differences",
    "overhead_table",
    "setting_labels",
    "method_columns",
    "render_table2",
    "render_table3",
    "render_selection",
    "render_paired",
    "rank_statistics",
    "rank_table",
    "render_ranks",
    "cd_diagram",
    "render_overhead",
    "render_table2_markdown",
    "render_table3_markdown",
    "fig1",
    "fig2",
    "fig3",
    "fig4",
    "write_reports",
    "report_page",
    "FIGURE_CAPTIONS",
    "ITEM_TITLES",
    "item_title",
    "summary",
    "main",
]

# named, not __name__: under `python -m spbench.reports` the module runs as __main__
logger = logging.getLogger("spbench.reports")

#: Methods in the order of the tables and Fig. 2: the paper's penalties, then the later
#: methods; others follow alphabetically.
METHOD_ORDER: tuple[str, ...] = (
    "none", "l2", "l2_sp", "l2_sp_fisher", "l1_sp", "gl_sp", "gl_sp_fisher", "lwf", "delta", "bss", "co_tuning",
)

#: The columns of one setting.
SETTING: list[str] = ["method", "setting"]

#: The columns one table row (a cell) is grouped by.
GROUP: list[str] = ["source", "target", *SETTING]

#: Output formats of the ``render_*`` functions.
FORMATS: tuple[str, ...] = ("markdown", "latex", "html")

#: The paper's Table 2 (Li et al. 2018; ResNet-101, mean ± std test accuracy in % over 5 runs),
#: keyed by (source, target) as this suite names them. The paper's caption: "The source
#: database is Places 365 for MIT Indoors 67 and ImageNet for Stanford Dogs 120 and Caltech
#: 256" — so MIT Indoors is keyed by ``places365``, not ``imagenet``.
PAPER_TABLE2: dict[tuple[str, str], dict[str, tuple[float, float]]] = {
    ("places365", "indoor67"): {"l2": (79.6, 0.5), "l2_sp": (84.2, 0.3), "l2_sp_fisher": (84.0, 0.4)},
    ("imagenet", "dogs120"): {"l2": (81.4, 0.2), "l2_sp": (85.1, 0.2), "l2_sp_fisher": (85.1, 0.2)},
    ("imagenet", "caltech256-30"): {"l2": (81.5, 0.2), "l2_sp": (83.5, 0.1), "l2_sp_fisher": (83.3, 0.1)},
    ("imagenet", "caltech256-60"): {"l2": (85.3, 0.2), "l2_sp": (86.4, 0.2), "l2_sp_fisher": (86.0, 0.1)},
}

#: The paper's Table 3: source-task accuracy drop in percentage points, same keys as
#: :data:`PAPER_TABLE2`. Per target from the paper's table; they span the ranges of the
#: specification (l2 −14.1 to −24.1, l2_sp −3.6 to −5.3, l2_sp_fisher −3.2 to −4.9).
PAPER_TABLE3: dict[tuple[str, str], dict[str, float]] = {
    ("places365", "indoor67"): {"l2": -24.1, "l2_sp": -5.3, "l2_sp_fisher": -4.9},
    ("imagenet", "dogs120"): {"l2": -14.1, "l2_sp": -4.7, "l2_sp_fisher": -4.2},
    ("imagenet", "caltech256-30"): {"l2": -15.4, "l2_sp": -4.2, "l2_sp_fisher": -3.6},
    ("imagenet", "caltech256-60"): {"l2": -16.9, "l2_sp": -3.6, "l2_sp_fisher": -3.2},
}

#: The paper's pretrained source accuracies (%), by source.
PAPER_PRETRAINED: dict[str, float] = {"places365": 54.7, "imagenet": 76.7}

_PAPER_CITE = "Li et al. (2018)"
# Which experiment's row to keep when two experiments ran the same setting (first listed wins).
_EXPERIMENT_PRECEDENCE = ("main", "select", "alpha_beta", "freeze")
_CELL_COLUMNS = [*GROUP, "n", "mean", "std"]
_DELTA_COLUMNS = ["delta", "delta_sd", "delta_n", "delta_low", "delta_high"]
_R2_COLUMNS = [f.name for f in R2_SCHEMA]
_OVERHEAD_COLUMNS = [f.name for f in OVERHEAD_SCHEMA]


class InsufficientDataError(ValueError):
    """The data hold nothing for what an output needs (e.g. no validation runs, no α × β grid).

    :func:`write_reports` skips the output and logs the message; every other ``ValueError``
    (a missing column, duplicate runs, an empty table) stops it.
    """


# --------------------------------------------------------------------------- checks, order


def _check_runs(runs: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    if not isinstance(runs, pd.DataFrame):
        raise TypeError(f"{what}: expected a pandas DataFrame of runs, got {type(runs).__name__}")
    missing = [c for c in columns if c not in runs.columns]
    if missing:
        raise ValueError(f"{what}: the run table lacks the columns {missing}")
    if runs.empty:
        raise ValueError(f"{what}: the run table is empty (no runs to report)")


def _identity(runs: pd.DataFrame) -> list[str]:
    """The run identity; ``experiment`` only where the table has it."""
    return [c for c in IDENTITY if c != "experiment" or c in runs.columns]


def _required(*extra: str) -> list[str]:
    """The identity columns a run table must have (``experiment`` is optional), and ``extra``."""
    return [*(c for c in IDENTITY if c != "experiment"), *extra]


#: The typed hyper-parameter columns of the run table (Fig. 1's axes, its facets).
_TYPED_HPARAMS = ("alpha", "beta", "lr")


def _slim(runs: pd.DataFrame, *values: str) -> pd.DataFrame:
    """Only the identity, the typed hyper-parameters and the ``values`` columns (the rest is
    dead weight for filtering)."""
    typed = [c for c in _TYPED_HPARAMS if c in runs.columns]
    return runs[list(dict.fromkeys([*_identity(runs), *typed, *values]))]


def _one_row_per_run(runs: pd.DataFrame, what: str) -> pd.DataFrame:
    """Refuse duplicate identities; keep one row of a run that several experiments share."""
    ident = _identity(runs)
    dup = runs.duplicated(ident, keep=False)
    if dup.any():
        example = runs.loc[dup, ident].head(1).to_dict("records")[0]
        raise ValueError(f"{what}: several runs share one identity, e.g. {example}")
    if "experiment" not in runs.columns:
        return runs
    experiment = runs["experiment"].fillna("").astype(str)
    rank = [(_EXPERIMENT_PRECEDENCE.index(e) if e in _EXPERIMENT_PRECEDENCE else len(_EXPERIMENT_PRECEDENCE), e)
             for e in experiment]
    order = sorted(range(len(runs)), key=rank.__getitem__)
    ranked = runs.iloc[order]
    first = ~ranked.duplicated([c for c in ident if c != "experiment"], keep="first").to_numpy()
    return runs.iloc[sorted(np.asarray(order)[first].tolist())]


def _evaluation(runs: pd.DataFrame) -> pd.Series:
    return runs["evaluation"].fillna("").astype(str)


def _test_runs(runs: pd.DataFrame, what: str, *, unfrozen: bool = True) -> pd.DataFrame:
    """One row per run, ``evaluation == "test"``, and ``freeze == 0`` when ``unfrozen``."""
    runs = _one_row_per_run(runs, what)
    evaluation = _evaluation(runs)
    sel = runs[evaluation == "test"]
    if sel.empty:
        present = sorted(evaluation.unique().tolist())
        raise InsufficientDataError(f"{what}: no runs with evaluation == 'test' (evaluations present: {present})")
    if unfrozen:
        depths = sorted(int(d) for d in sel["freeze"].unique())
        sel = sel[sel["freeze"] == 0]
        if sel.empty:
            raise InsufficientDataError(f"{what}: no test runs with freeze == 0 (freeze depths present: {depths})")
    return sel


def _validation_runs(runs: pd.DataFrame, what: str) -> pd.DataFrame:
    runs = _one_row_per_run(runs, what)
    sel = runs[_evaluation(runs).str.startswith("val") & (runs["freeze"] == 0)]
    if sel.empty:
        raise InsufficientDataError(
            f"{what}: no validation runs (evaluation 'val<fold>' with freeze == 0) to select settings on"
        )
    return sel


def _natural_key(text: str) -> tuple:
    """``digits-mod3-k5`` before ``digits-mod3-k10``: digit runs compare as numbers."""
    tokens = [tok for tok in re.split(r"(\d+)", str(text)) if tok]
    return tuple((0, int(tok), "") if tok.isdigit() else (1, 0, tok) for tok in tokens)


def _method_key(name: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(name), "") if name in METHOD_ORDER else (len(METHOD_ORDER), str(name))


def _values_key(setting: str) -> tuple:
    """A setting's hyper-parameter values in the order of their names (``alpha``, ``beta``, ``lr``)."""
    values = parse_setting(str(setting))
    return tuple((name, float(values[name])) for name in sorted(values))


def _setting_key(setting: Sequence) -> tuple:
    method, text = setting
    return (_method_key(method), _values_key(text))


def _setting_rank(frame: pd.DataFrame) -> pd.Series:
    """Each row's setting as a rank in report order (for tie-breaking sorts)."""
    keys = sorted({(str(m), str(t)) for m, t in frame[SETTING].itertuples(index=False)}, key=_setting_key)
    rank = {k: i for i, k in enumerate(keys)}
    return pd.Series([rank[(str(m), str(t))] for m, t in frame[SETTING].itertuples(index=False)], index=frame.index)


def _sort_rows(frame: pd.DataFrame, by: Sequence[str] = GROUP) -> pd.DataFrame:
    """Rows in report order: natural order of text keys, METHOD_ORDER, settings by their values."""

    def key(values: tuple) -> tuple:
        out = []
        for column, value in zip(by, values):
            if column in ("method", "penalty"):
                out.append(_method_key(value))
            elif column == "setting":
                out.append(_values_key(value))
            elif isinstance(value, str):
                out.append(_natural_key(value))
            else:
                out.append(float(value))
        return tuple(out)

    keys = [key(tuple(row)) for row in frame[list(by)].itertuples(index=False)]
    order = sorted(range(len(frame)), key=keys.__getitem__)
    return frame.iloc[order].reset_index(drop=True)


def _pairs(frame: pd.DataFrame) -> list[tuple[str, str]]:
    pairs = {(str(s), str(t)) for s, t in frame[["source", "target"]].itertuples(index=False)}
    return sorted(pairs, key=lambda st: (_natural_key(st[0]), _natural_key(st[1])))


def _settings_of(frame: pd.DataFrame) -> list[tuple[str, str]]:
    found = {(str(m), str(t)) for m, t in frame[SETTING].itertuples(index=False)}
    return sorted(found, key=_setting_key)


def _is_setting(frame: pd.DataFrame, setting: tuple) -> pd.Series:
    method, text = setting
    return (frame["method"] == method) & (frame["setting"] == text)


def _aggregate(runs: pd.DataFrame, column: str, scale: float, by: Sequence[str] = GROUP) -> pd.DataFrame:
    """n, mean and sample std (ddof=1) of ``scale * runs[column]`` per group of ``by``."""
    values = runs[list(by)].assign(_v=runs[column].astype(float) * scale)
    grouped = values.groupby(list(by), sort=False, dropna=False)["_v"]
    out = grouped.agg(n="count", mean="mean", std=lambda s: s.std(ddof=1))
    return out.reset_index()


# --------------------------------------------------------------------------- model selection


def selection_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Model selection on validation folds (the runs with ``evaluation`` ``val<f>``, ``freeze == 0``).

    Per (source, target, method, setting): ``n`` = number of validation runs with a
    score (folds × replicates), ``folds`` and ``replicates`` = how many distinct of each,
    ``mean`` = mean of 100 · accuracy on the held-out fold (the ``test_accuracy`` column of a
    validation run) over those runs, each run weighing the same, ``std`` its sample std
    (ddof = 1). ``selected`` marks, per (source, target, method), the setting with the highest
    ``mean`` among those trained for the most steps (successive halving's shorter rungs, whose
    setting says ``steps``, are listed but never selected); equal means (compared to 1e-9 percentage points) go to the setting first in report
    order (the smallest value of each hyper-parameter, in the order of their names: for the
    penalties alpha, then beta, then lr). A setting without any score is never selected.
    Test-set runs are never looked at.
    """
    _check_runs(runs, _required("test_accuracy"), "selection_table")
    val = _validation_runs(_slim(runs, "test_accuracy"), "selection_table")
    out = _aggregate(val, "test_accuracy", 100.0)
    counts = val.groupby(GROUP, sort=False, dropna=False).agg(
        folds=("evaluation", "nunique"), replicates=("replicate", "nunique")
    )
    out = out.merge(counts.reset_index(), on=GROUP, how="left", validate="one_to_one")
    out = _sort_rows(out)[[*GROUP, "n", "folds", "replicates", "mean", "std"]]
    out["steps"] = [parse_setting(text).get("steps", math.inf) for text in out["setting"]]
    out["selected"] = False
    for _, group in out.groupby(["source", "target", "method"], sort=False):
        # with successive halving, the choice is among the settings trained for the full steps
        full = group[group["steps"] == group["steps"].max()]
        ranking = rank_settings(full)
        if len(ranking):
            out.loc[ranking.index[0], "selected"] = True
    return out.drop(columns="steps")


def rank_settings(scores: pd.DataFrame) -> pd.DataFrame:
    """The scored rows of one (source, target, method) of :func:`selection_table`, best first:
    highest ``mean``, equal means (to 1e-9 percentage points) in report order. Settings
    without a score are left out."""
    scored = scores[scores["mean"].notna()]
    order = scored.assign(_m=-scored["mean"].round(9), _k=_setting_rank(scored)).sort_values(["_m", "_k"], kind="stable")
    return order.drop(columns=["_m", "_k"])


def selected_settings(runs: pd.DataFrame) -> pd.DataFrame:
    """The setting chosen for each (source, target, method) that has validation runs.

    Columns ``source, target, method, setting``, one row per (source, target, method), in
    report order: the rows of :func:`selection_table` marked ``selected`` (highest mean
    validation accuracy; ties to the setting first in report order). Raises
    :class:`InsufficientDataError` when ``runs`` holds no validation runs.
    """
    table = selection_table(runs)
    return table.loc[table["selected"], GROUP].reset_index(drop=True)


def _selected_or_none(runs: pd.DataFrame) -> dict[tuple[str, str, str], tuple[str, str]]:
    """(source, target, method) -> selected setting; empty without validation runs."""
    try:
        chosen = selected_settings(runs)
    except InsufficientDataError:
        return {}
    return {(s, t, m): (m, text) for s, t, m, text in chosen[GROUP].itertuples(index=False)}


def _reported(test: pd.DataFrame, chosen: Mapping, what: str) -> pd.DataFrame:
    """The test runs Tables 2, 3 and Fig. 2 show: the ``main`` experiment's runs when the
    table says which experiment asked for a run, and of a method that went through model
    selection only its selected setting."""
    if "experiment" in test.columns and (test["experiment"] == "main").any():
        test = test[test["experiment"] == "main"]
    if not chosen:
        return test
    keep = pd.Series(True, index=test.index)
    for (source, target, method), setting in chosen.items():
        here = (test["source"] == source) & (test["target"] == target) & (test["method"] == method)
        if here.any() and not (here & _is_setting(test, setting)).any():
            logger.warning(
                "%s: no test runs of the selected setting %s for %s -> %s; its cell stays empty",
                what, setting, source, target,
            )
        keep &= ~here | _is_setting(test, setting)
    return test[keep]


# --------------------------------------------------------------------------- paired differences


def _t_quantile(level: float, dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2.0, dof))


def _most_run_setting(frame: pd.DataFrame) -> tuple[str, str]:
    """The setting of ``frame`` with the most runs that have a test accuracy (ties: the first
    in report order)."""
    counts = frame.groupby(SETTING, dropna=False)["test_accuracy"].count().reset_index()
    counts = counts.assign(_n=-counts["test_accuracy"], _k=_setting_rank(counts)).sort_values(["_n", "_k"], kind="stable")
    best = counts.iloc[0]
    return (str(best["method"]), str(best["setting"]))


def _baseline_settings(
    test: pd.DataFrame, chosen: Mapping, baseline: str
) -> dict[tuple[str, str], tuple[tuple[str, str], str]]:
    """(source, target) -> (baseline setting, the rule that chose it)."""
    out = {}
    for source, target in _pairs(test):
        here = test[(test["source"] == source) & (test["target"] == target) & (test["method"] == baseline)]
        if here.empty:
            continue
        setting = chosen.get((source, target, baseline))
        if setting is not None and _is_setting(here, setting).any():
            out[(source, target)] = (setting, "selected on validation folds")
            continue
        out[(source, target)] = (_most_run_setting(here), "most replicates")
    return out


def paired_differences(runs: pd.DataFrame, baseline: str = "l2", *, level: float = 0.95) -> pd.DataFrame:
    """Paired test-accuracy differences of every setting against the baseline, per (source, target).

    Over the test runs with ``freeze == 0``. For each (source, target) the *baseline setting*
    is the ``baseline`` method's setting selected on validation folds (:func:`selected_settings`)
    when it has test runs there; otherwise the ``baseline`` setting with the most test
    replicates (ties: the first in report order). Every other setting of that
    (source, target) is matched to it on ``replicate`` (runs with one replicate index share
    the seed: head initialisation and batch order); with d_r = 100 · (acc_r − acc_baseline,r)
    over the ``n`` replicates both have: ``delta`` = mean of d (percentage points), ``sd`` =
    its sample std (ddof = 1), and the ``level`` (95 %) Student-t confidence interval
    ``ci_low``, ``ci_high`` = delta ∓ t.ppf(0.5 + level/2, n − 1) · sd / √n (NaN when n < 2).
    Settings with no replicate in common are left out. ``baseline_method`` and
    ``baseline_setting`` name the baseline setting and ``baseline_rule`` how it was chosen.
    """
    _check_runs(runs, _required("test_accuracy"), "paired_differences")
    runs = _slim(runs, "test_accuracy")
    return _paired(_test_runs(runs, "paired_differences"), _selected_or_none(runs), baseline, level)


def _paired(test: pd.DataFrame, chosen: Mapping, baseline: str, level: float) -> pd.DataFrame:
    if not (test["method"] == baseline).any():
        present = sorted(test["method"].unique().tolist(), key=_method_key)
        raise InsufficientDataError(
            f"paired_differences: no test runs (freeze == 0) of the baseline method {baseline!r} "
            f"(methods present: {present})"
        )
    bases = _baseline_settings(test, chosen, baseline)
    rows = []
    for (source, target), (base, rule) in bases.items():
        here = test[(test["source"] == source) & (test["target"] == target)]
        ref = here[_is_setting(here, base)].set_index("replicate")["test_accuracy"].astype(float).dropna()
        for setting in _settings_of(here):
            if setting == base:
                continue
            other = here[_is_setting(here, setting)].set_index("replicate")["test_accuracy"].astype(float).dropna()
            common = sorted(set(ref.index) & set(other.index))
            if not common:
                continue
            d = np.array([100.0 * (other[r] - ref[r]) for r in common])
            n = len(d)
            mean = float(d.mean())
            sd = float(d.std(ddof=1)) if n > 1 else math.nan
            half = _t_quantile(level, n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
            rows.append({
                "source": source, "target": target, "method": setting[0], "setting": setting[1],
                "baseline_method": base[0], "baseline_setting": base[1], "baseline_rule": rule, "n": n, "delta": mean, "sd": sd,
                "ci_low": mean - half, "ci_high": mean + half,
            })
    columns = [*GROUP, "baseline_method", "baseline_setting", "baseline_rule", "n", "delta", "sd", "ci_low", "ci_high"]
    return _sort_rows(pd.DataFrame(rows, columns=columns))


# --------------------------------------------------------------------------- tables


def table2(runs: pd.DataFrame, *, baseline: str | None = "l2") -> pd.DataFrame:
    """Table 2: target test accuracy per cell, in percent, with the paired difference to ``baseline``.

    Over the reported test runs (``evaluation == "test"``, ``freeze == 0``, the ``main``
    experiment and selected settings; see the module's conventions), per (source, target,
    method, setting): ``n`` replicates, ``mean`` = mean of 100 · test_accuracy,
    ``std`` = its sample std (ddof = 1; NaN when n == 1). With a ``baseline`` method that has
    test runs: ``delta``, ``delta_sd``, ``delta_n``, ``delta_low``, ``delta_high`` = the paired
    difference to the row's baseline setting and its 95 % confidence interval
    (:func:`paired_differences`; NaN for the baseline cell itself), and ``is_baseline`` marks
    that cell. One row per cell, in report order.
    """
    _check_runs(runs, _required("test_accuracy"), "table2")
    runs = _slim(runs, "test_accuracy")
    chosen = _selected_or_none(runs)
    every = _test_runs(runs, "table2")
    test = _reported(every, chosen, "table2")
    out = _sort_rows(_aggregate(test, "test_accuracy", 100.0))
    if baseline is None or not (test["method"] == baseline).any():
        return out
    paired = _paired(every, chosen, baseline, 0.95).rename(
        columns={"sd": "delta_sd", "n": "delta_n", "ci_low": "delta_low", "ci_high": "delta_high"}
    )
    out = out.merge(paired[[*GROUP, *_DELTA_COLUMNS]], on=GROUP, how="left", validate="one_to_one")
    bases = _baseline_settings(every, chosen, baseline)
    out["is_baseline"] = [(s, t) in bases and (m, text) == bases[(s, t)][0]
                          for s, t, m, text in out[GROUP].itertuples(index=False)]
    return out


def table3(runs: pd.DataFrame) -> pd.DataFrame:
    """Table 3: how much of the source task the fine-tuned backbone forgets.

    Same cells as :func:`table2`. ``mean`` and ``std`` are the mean and sample std (ddof = 1)
    of 100 · source_accuracy_drop, in percentage points, where the drop is (accuracy of the
    fine-tuned backbone with the original source head — or the method's trained copy of it,
    the record's ``retention_head`` — on source test data) − (pretrained network's accuracy);
    negative means worse. ``source_accuracy`` and
    ``source_accuracy_pretrained`` are the cell means of those columns, in percent.
    """
    cols = ["source_accuracy", "source_accuracy_pretrained", "source_accuracy_drop"]
    _check_runs(runs, _required(*cols), "table3")
    runs = _slim(runs, "test_accuracy", *cols)
    sel = _reported(_test_runs(runs, "table3"), _selected_or_none(runs), "table3")
    if sel["source_accuracy_drop"].isna().all():
        raise InsufficientDataError("table3: no test run carries a source_accuracy_drop")
    out = _aggregate(sel, "source_accuracy_drop", 100.0)
    percent = sel[GROUP].assign(**{c: sel[c].astype(float) * 100.0 for c in cols[:2]})
    means = percent.groupby(GROUP, sort=False, dropna=False).mean()
    out = out.merge(means.reset_index(), on=GROUP, how="left", validate="one_to_one")
    return _sort_rows(out)


def overhead_table(overhead: pd.DataFrame) -> pd.DataFrame:
    """§4.4.1: the compute cost of the penalty in one training step, per penalty.

    From :data:`~spbench.results.OVERHEAD_SCHEMA` rows: ``step_flops`` (forward, backward and
    optimizer of one step, counted by ``torch.utils.flop_counter``: matrix products and
    convolutions), ``penalty_flops`` (the penalty's elementwise operations, counted
    analytically), ``flops_percent`` = 100 · penalty_flops / step_flops, the measured median
    ``step_seconds`` and ``penalty_seconds`` and ``time_percent`` = 100 · penalty_seconds /
    step_seconds. One row per (arch, device, batch_size, image_size, penalty), in report order.
    """
    _check_runs(overhead, _OVERHEAD_COLUMNS, "overhead_table")
    key = ["arch", "device", "batch_size", "image_size", "penalty"]
    dup = overhead.duplicated(key, keep=False)
    if dup.any():
        example = overhead.loc[dup, key].head(1).to_dict("records")[0]
        raise ValueError(f"overhead_table: several rows share one measurement key, e.g. {example}")
    out = overhead[[*key, "step_flops", "penalty_flops", "step_seconds", "penalty_seconds"]].copy()
    out["flops_percent"] = 100.0 * out["penalty_flops"].astype(float) / out["step_flops"].astype(float)
    out["time_percent"] = 100.0 * out["penalty_seconds"].astype(float) / out["step_seconds"].astype(float)
    out = _sort_rows(out, key)
    return out[[*key, "step_flops", "penalty_flops", "flops_percent", "step_seconds", "penalty_seconds",
                "time_percent"]]


# --------------------------------------------------------------------------- labels


def _fmt_hparam(x: float) -> str:
    return format(float(x), "g")


#: How labels write a hyper-parameter's name.
_SYMBOLS = {"alpha": "α", "beta": "β", "lambda": "λ", "eta": "η", "temperature": "T"}


def _hparam_parts(setting: str, with_lr: bool) -> list[str]:
    values = parse_setting(setting)
    parts = [f"{_SYMBOLS.get(n, n)}={_fmt_hparam(values[n])}" for n in sorted(values) if n != "lr"]
    if with_lr:
        parts.append(f"lr={_fmt_hparam(values['lr'])}")
    return parts


def setting_labels(cells: pd.DataFrame) -> dict[tuple[str, str], str]:
    """Label of each (method, setting) present in ``cells``, in report order.

    A method seen with one setting is labelled by its name; one seen with several gets one
    label per setting, its hyper-parameters in name order, e.g. ``l2_sp (α=0.1, β=0.01)``, with
    ``lr=…`` added only when that method has several learning rates in ``cells``.
    """
    settings = _settings_of(cells)
    count: dict[str, int] = {}
    lrs: dict[str, set[float]] = {}
    for m, text in settings:
        count[m] = count.get(m, 0) + 1
        lrs.setdefault(m, set()).add(parse_setting(text)["lr"])
    labels = {}
    for m, text in settings:
        if count[m] == 1:
            labels[(m, text)] = m
        else:
            labels[(m, text)] = f"{m} ({', '.join(_hparam_parts(text, len(lrs[m]) > 1))})"
    return labels


def method_columns(cells: pd.DataFrame) -> dict[tuple[str, str], str]:
    """The column (or legend entry) of each (method, setting) in ``cells``, in report order.

    A method with at most one setting per (source, target) gets one column, named by the
    method, whatever setting each row chose (model selection may choose differently per
    target; the cells then say which). A method with several settings in one row (no
    selection: every listed setting was run) gets a column per setting, labelled as
    :func:`setting_labels` does.
    """
    labels = setting_labels(cells)
    per_row = cells.groupby(["source", "target", "method"], sort=False)["setting"].nunique()
    several = set(per_row[per_row > 1].index.get_level_values("method"))
    return {(m, text): (label if m in several else m) for (m, text), label in labels.items()}


def _setting_text(method: str, setting: str) -> str:
    parts = _hparam_parts(setting, True)
    return f"{method} ({', '.join(parts)})"


# --------------------------------------------------------------------------- rendering


@dataclass
class _Display:
    """A table ready to print: a caption and rows of cells; a cell is one or more lines."""

    name: str  # the file stem; the LaTeX label is tab:<name>
    title: str  # "Table 2."
    caption: str  # plain text after the title
    header: list[str]
    align: list[str]  # "l" or "r" per column
    rows: list[list[tuple[str, ...]]] = field(default_factory=list)

    def add(self, cells: Sequence[str | tuple[str, ...]]) -> None:
        self.rows.append([c if isinstance(c, tuple) else (c,) for c in cells])


def _md_escape(text: str) -> str:
    return str(text).replace("|", r"\|")


def _frame(table: _Display, cell: Callable[[tuple[str, ...], str], str], head: Callable[[str], str]) -> pd.DataFrame:
    """The table as a frame of finished text: ``cell(lines, align)`` per cell, ``head(h)`` per column."""
    rows = [[cell(lines, align) for lines, align in zip(row, table.align)] for row in table.rows]
    return pd.DataFrame(rows, columns=[head(h) for h in table.header], dtype=object)


def _styler(frame: pd.DataFrame):
    """A Styler that prints the frame's text as it is: escaped already, so never escaped again
    (whatever the ``styler.format`` options say), and without the row labels."""
    from pandas.io.formats.style import Styler  # needs jinja2, like DataFrame.style

    return Styler(frame, cell_ids=False).format(str).format_index(str, axis="columns").hide(axis="index")


def _to_markdown(table: _Display) -> str:
    frame = _frame(table, lambda lines, _: _md_escape("  ".join(lines)), _md_escape)
    colalign = ["right" if a == "r" else "left" for a in table.align]
    # disable_numparse: a cell keeps the digits it was formatted with ("60.10", not 60.1)
    body = frame.to_markdown(index=False, headers=list(frame.columns), colalign=colalign, disable_numparse=True)
    return f"**{table.title}** {table.caption}\n\n{body}\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "<": r"\textless{}", ">": r"\textgreater{}",
    "±": r"$\pm$", "α": r"$\alpha$", "β": r"$\beta$", "λ": r"$\lambda$", "η": r"$\eta$", "Δ": r"$\Delta$", "×": r"$\times$",
    "²": r"$^2$", "√": r"$\surd$", "−": r"$-$", "→": r"$\to$", "≥": r"$\geq$", "≤": r"$\leq$",
    "—": "---", "–": "--", "“": "``", "”": "''", "’": "'", "§": r"\S{}", "…": r"\ldots{}",
}


def _tex(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _to_latex(table: _Display) -> str:
    def cell(lines: tuple[str, ...], align: str) -> str:
        if len(lines) == 1:
            return _tex(lines[0])
        # several lines in one cell: a nested tabular, which needs no package beyond booktabs;
        # "{}" keeps a line that opens with "[" from reading as the optional argument of \\
        body = r"\\".join(("{}" if line.startswith("[") else "") + _tex(line) for line in lines)
        return rf"\begin{{tabular}}[t]{{@{{}}{align}@{{}}}}" + body + r"\end{tabular}"

    return _styler(_frame(table, cell, _tex)).to_latex(
        column_format="".join(table.align), position="htbp", position_float="centering", hrules=True,
        label=f"tab:{table.name}", caption=_tex(table.caption),
    )


def _to_html(table: _Display) -> str:
    frame = _frame(table, lambda lines, _: "<br>".join(html.escape(line) for line in lines), html.escape)
    # one text-align per column, on the class pandas gives its header and data cells
    align = [{"selector": f".col{i}", "props": [("text-align", "right" if a == "r" else "left")]}
             for i, a in enumerate(table.align)]
    return _styler(frame).set_table_styles(align).to_html(
        table_uuid=table.name, table_attributes='class="spbench"',
        caption=f"<b>{html.escape(table.title)}</b> {html.escape(table.caption)}",
    )


_RENDERERS: dict[str, Callable[[_Display], str]] = {"markdown": _to_markdown, "latex": _to_latex, "html": _to_html}


def _render(table: _Display, fmt: str) -> str:
    try:
        return _RENDERERS[fmt](table)
    except KeyError:
        raise ValueError(f"unknown format {fmt!r} (known: {list(FORMATS)})") from None


def _fmt_mean_std(mean: float, std: float, n: int, n_max: int, fmt: str) -> str:
    text = format(mean, fmt) + " ± " + ("n/a" if math.isnan(std) else format(std, ".2f"))
    return text if n == n_max else f"{text} (n={n})"


def _replicates_phrase(cells: pd.DataFrame) -> str:
    n = cells["n"]
    if n.min() == n.max():
        return f"{int(n.max())} replicate{'s' if n.max() != 1 else ''}"
    return f"up to {int(n.max())} replicates ((n=k) marks cells with fewer)"


def _has_delta(cells: pd.DataFrame) -> bool:
    return all(c in cells.columns for c in [*_DELTA_COLUMNS, "is_baseline"]) and cells["delta"].notna().any()


def _delta_text(r) -> str:
    text = f"(Δ {r.delta:+.2f}"
    if r.delta_n >= 2 and not math.isnan(r.delta_low):
        text += f" [{r.delta_low:+.2f}, {r.delta_high:+.2f}]"
    if int(r.delta_n) != int(r.n):
        text += f", n={int(r.delta_n)}"
    return text + ")"


def _cells_display(
    cells: pd.DataFrame,
    name: str,
    title: str,
    caption: str,
    *,
    fmt: str,
    extra_columns: Sequence[tuple[str, str]] = (),
    paper: Mapping[tuple[str, str], Mapping[str, str]] | None = None,
    paper_extra: Mapping[tuple[str, str], Sequence[str]] | None = None,
) -> _Display:
    """Rows (source, target), one column per method (:func:`method_columns`); a method whose
    setting differs between rows shows each cell's setting under its numbers; optional rows
    "(paper)" after ours."""
    columns = method_columns(cells)
    names = list(dict.fromkeys(columns.values()))
    method_of = {col: m for (m, _), col in columns.items()}
    varying = {col for col in names if sum(c == col for c in columns.values()) > 1}
    n_max = int(cells["n"].max())
    delta = _has_delta(cells)
    multi = {m for m in method_of.values() if sum(q == m for q in method_of.values()) > 1}
    lookup = {(r.source, r.target, columns[(r.method, r.setting)]): r for r in cells.itertuples(index=False)}
    header = ["source", "target", *(h for _, h in extra_columns), *names]
    table = _Display(name, title, caption, header, ["l", "l"] + ["r"] * (len(header) - 2))
    for source, target in _pairs(cells):
        in_row = cells[(cells["source"] == source) & (cells["target"] == target)]
        line: list[str | tuple[str, ...]] = [source, target]
        line += [format(float(in_row[c].mean()), ".2f") for c, _ in extra_columns]
        for col in names:
            r = lookup.get((source, target, col))
            if r is None:
                line.append("—")
                continue
            lines = [_fmt_mean_std(r.mean, r.std, int(r.n), n_max, fmt)]
            if col in varying:
                lines.append(f"({', '.join(_hparam_parts(r.setting, False))})")
            if delta and not math.isnan(r.delta):
                lines.append(_delta_text(r))
            elif delta and r.is_baseline and method_of[col] in multi:
                lines.append("(Δ reference)")
            line.append(tuple(lines) if len(lines) > 1 else lines[0])
        table.add(line)
        numbers = (paper or {}).get((source, target))
        if numbers and any(method_of[c] in numbers for c in names):
            extra = list((paper_extra or {}).get((source, target), [""] * len(extra_columns)))
            table.add([source, f"{target} (paper)", *extra, *(numbers.get(method_of[c], "") for c in names)])
    if varying:
        table.caption += (" A method whose selected setting differs between rows shows each cell's setting "
                          "(its hyper-parameters) under the accuracy.")
    return table


def _table2_display(t2: pd.DataFrame) -> _Display:
    caption = (
        f"Target test accuracy (%), mean ± sample std over {_replicates_phrase(t2)}; "
        "no frozen layers (freeze = 0); for a method whose setting was chosen on validation folds, "
        "the chosen setting only."
    )
    if _has_delta(t2):
        base = t2.loc[t2["is_baseline"].astype(bool), "method"]
        name = base.iloc[0] if len(base) else "baseline"
        caption += (
            f" (Δ …): paired difference to the row's {name} cell over the replicates both have "
            "(same seed), in percentage points, with its 95 % Student-t confidence interval [low, high]."
        )
    paper = {
        key: {p: f"{m:.1f} ± {s:.1f}" for p, (m, s) in numbers.items()} for key, numbers in PAPER_TABLE2.items()
    }
    table = _cells_display(t2, "table2", "Table 2.", caption, fmt=".2f", paper=paper)
    if any(row[1][0].endswith("(paper)") for row in table.rows):
        table.caption += f" Rows “(paper)”: {_PAPER_CITE}, Table 2 (ResNet-101, mean ± std over 5 runs)."
    return table


def _table3_display(t3: pd.DataFrame) -> _Display:
    caption = (
        "Source-task accuracy drop (percentage points): fine-tuned backbone with the original source "
        "head (for LwF, which trains a copy of it to keep the source task, that copy) on source test data, "
        "minus the pretrained network's accuracy (negative = forgotten); "
        f"mean ± sample std over {_replicates_phrase(t3)}; freeze = 0. "
        "“pretrained (%)” is the pretrained network's source accuracy."
    )
    paper = {key: {p: f"{v:+.1f}" for p, v in numbers.items()} for key, numbers in PAPER_TABLE3.items()}
    paper_extra = {(s, t): [f"{PAPER_PRETRAINED[s]:.1f}"] for s, t in PAPER_TABLE3}
    table = _cells_display(t3, "table3", "Table 3.", caption, fmt="+.2f",
                           extra_columns=[("source_accuracy_pretrained", "pretrained (%)")],
                           paper=paper, paper_extra=paper_extra)
    if any(row[1][0].endswith("(paper)") for row in table.rows):
        table.caption += f" Rows “(paper)”: {_PAPER_CITE}, Table 3 (ResNet-101)."
    return table


def render_table2(t2: pd.DataFrame, fmt: str = "markdown") -> str:
    """Table 2 (:func:`table2`) in the paper's layout, with its caption, as ``fmt`` (:data:`FORMATS`).

    One row per (source, target), one column per setting (:func:`setting_labels`), each cell
    ``mean ± std`` (``n/a`` when n == 1; ``(n=k)`` when fewer replicates than the most in the
    table; ``—`` when missing) followed, when ``t2`` has paired differences, by
    ``(Δ +d [low, high])`` in percentage points. After a (source, target) for which
    :data:`PAPER_TABLE2` has numbers comes a row ``target (paper)`` with the paper's values.
    """
    _check_runs(t2, _CELL_COLUMNS, "render_table2")
    return _render(_table2_display(t2), fmt)


def render_table3(t3: pd.DataFrame, fmt: str = "markdown") -> str:
    """Table 3 (:func:`table3`) in the paper's layout (signed drops), as ``fmt``; paper rows from
    :data:`PAPER_TABLE3` and :data:`PAPER_PRETRAINED` where they exist."""
    _check_runs(t3, [*_CELL_COLUMNS, "source_accuracy_pretrained"], "render_table3")
    return _render(_table3_display(t3), fmt)


def render_table2_markdown(t2: pd.DataFrame) -> str:
    """Table 2 as Markdown: ``render_table2(t2, "markdown")``."""
    return render_table2(t2, "markdown")


def render_table3_markdown(t3: pd.DataFrame) -> str:
    """Table 3 as Markdown: ``render_table3(t3, "markdown")``."""
    return render_table3(t3, "markdown")


def render_selection(selection: pd.DataFrame, fmt: str = "markdown") -> str:
    """The model-selection table (:func:`selection_table`) as ``fmt``: one row per candidate
    setting, its validation accuracy (mean ± std over folds × replicates) and ``yes`` on the
    selected one."""
    _check_runs(selection, [*GROUP, "n", "folds", "mean", "std", "selected"], "render_selection")
    caption = (
        "Model selection: each candidate setting trained on the training set less one fold and scored "
        "on that fold; validation accuracy (%), mean ± sample std over folds × replicates (runs). "
        "Per source, target and method the highest mean is selected (ties: the smallest value of each "
        "hyper-parameter, in the order of their names). "
        "The test set is not used."
    )
    header = ["source", "target", "method", "setting", "runs", "folds", "validation accuracy (%)", "selected"]
    table = _Display("selection", "Model selection.", caption, header, ["l"] * 4 + ["r"] * 3 + ["l"])
    for r in selection.itertuples(index=False):
        acc = "—" if math.isnan(r.mean) else _fmt_mean_std(r.mean, r.std, 0, 0, ".2f")
        table.add([r.source, r.target, r.method, ", ".join(_hparam_parts(r.setting, True)),
                   str(int(r.n)), str(int(r.folds)), acc, "yes" if r.selected else ""])
    return _render(table, fmt)


def rank_statistics(runs: pd.DataFrame, *, baseline: str = "l2", confidence: float = 0.95, resamples: int = 2000,
                    seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every method across all tasks (each (source, target) pair of Table 2), beside the per-task
    tables: ``(ranks, nemenyi)``.

    The cells are Table 2's (reported test runs, freeze 0, selected settings): a method's score
    on a task is its mean test accuracy over replicates. Per task the methods are ranked (1 =
    best, ties share the mean rank); only methods with a cell on every task take part. ``ranks``
    has one row per method, best mean rank first: ``tasks``, ``mean_rank``, and ``p_beats``, the
    probability that a random replicate of the method beats a random replicate of ``baseline`` on
    a random task (per task the Mann-Whitney U statistic over n·m, ties counting one half,
    then the mean over tasks), with a ``confidence`` percentile bootstrap interval over tasks
    (``p_low``, ``p_high``; ``resamples`` resamples, seeded; NaN for the baseline itself or
    without one). ``ranks.attrs`` holds the Friedman test over the tasks
    (``friedman_statistic``, ``friedman_p``, scipy.stats.friedmanchisquare); ``nemenyi`` the
    Nemenyi post-hoc p-values between methods (scikit-posthocs' posthoc_nemenyi_friedman).
    Raises :class:`InsufficientDataError` with fewer than two tasks or three methods.
    """
    import scikit_posthocs
    from scipy import stats

    _check_runs(runs, _required("test_accuracy"), "rank_statistics")
    runs = _slim(runs, "test_accuracy")
    test = _reported(_test_runs(runs, "rank_statistics"), _selected_or_none(runs), "rank_statistics")
    labels = method_columns(test)
    test = test.assign(task=test["source"] + " → " + test["target"],
                       entrant=[labels[(m, t)] for m, t in test[SETTING].itertuples(index=False)],
                       accuracy=test["test_accuracy"].astype(float) * 100.0)
    cells = test.groupby(["task", "entrant"], sort=False)["accuracy"].mean().unstack("entrant")
    complete = cells.dropna(axis=1)
    if len(complete.columns) < len(cells.columns):
        logger.warning("rank_statistics: %s lack a cell on some task and are left out",
                       sorted(set(cells.columns) - set(complete.columns)))
    if len(complete) < 2 or len(complete.columns) < 3:
        raise InsufficientDataError(f"rank_statistics needs two tasks and three methods with a cell on each, "
                                    f"got {len(complete)} tasks and {len(complete.columns)} methods")
    order = [e for e in dict.fromkeys(labels.values()) if e in complete.columns]
    complete = complete[order]
    ranks = complete.rank(axis=1, ascending=False, method="average")
    friedman = stats.friedmanchisquare(*[complete[e].to_numpy() for e in order])
    nemenyi = scikit_posthocs.posthoc_nemenyi_friedman(complete.to_numpy())
    nemenyi.index = nemenyi.columns = order
    base = next((label for (method, _), label in labels.items() if method == baseline and label in order), None)
    rows = []
    for entrant in order:
        p = low = high = math.nan
        if base is not None and entrant != base:
            per_task = []
            for task in complete.index:
                x = test.loc[(test["task"] == task) & (test["entrant"] == entrant), "accuracy"].to_numpy()
                y = test.loc[(test["task"] == task) & (test["entrant"] == base), "accuracy"].to_numpy()
                per_task.append(stats.mannwhitneyu(x, y, alternative="two-sided").statistic / (len(x) * len(y)))
            per_task = np.asarray(per_task)
            p = float(per_task.mean())
            if np.ptp(per_task) == 0:  # every task alike: no spread to resample
                low = high = p
            else:
                boot = stats.bootstrap((per_task,), np.mean, confidence_level=confidence, n_resamples=resamples,
                                       method="percentile", rng=np.random.default_rng(seed))
                low, high = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
        rows.append({"method": entrant, "tasks": len(complete), "mean_rank": float(ranks[entrant].mean()),
                     "p_beats": p, "p_low": low, "p_high": high})
    out = pd.DataFrame(rows)
    out = out.assign(_k=range(len(out))).sort_values(["mean_rank", "_k"], kind="stable").drop(columns="_k")
    out = out.reset_index(drop=True)
    out.attrs.update(friedman_statistic=float(friedman.statistic), friedman_p=float(friedman.pvalue),
                     baseline=base or "", confidence=confidence)
    return out, nemenyi


def rank_table(runs: pd.DataFrame, **kwargs) -> pd.DataFrame:
    """The ranks of :func:`rank_statistics` (its Friedman test in ``attrs``)."""
    return rank_statistics(runs, **kwargs)[0]


def render_ranks(ranks: pd.DataFrame, fmt: str = "markdown") -> str:
    """The ranks across tasks (:func:`rank_table`) as ``fmt``, with the Friedman test in the caption."""
    _check_runs(ranks, ["method", "tasks", "mean_rank", "p_beats", "p_low", "p_high"], "render_ranks")
    a = ranks.attrs
    level = round(100 * a.get("confidence", 0.95))
    base = a.get("baseline") or "l2"
    caption = (
        f"Every method across the {int(ranks['tasks'].iloc[0])} (source, target) tasks of Table 2 (its cells: mean "
        "test accuracy over replicates at the selected setting): the mean rank over tasks (1 = best; ties share "
        f"the mean rank), and P(beats {base}), the probability that a random replicate of the method beats one of "
        f"{base} on a random task (Mann-Whitney U / (n·m) per task, averaged), with a {level} % percentile bootstrap "
        f"interval over tasks. Friedman test over the tasks: χ² = {a.get('friedman_statistic', math.nan):.2f}, "
        f"p = {a.get('friedman_p', math.nan):.3g}; the critical-difference diagram (cd) shows the Nemenyi "
        "post-hoc test. With few tasks the intervals are wide and the test has little power."
    )
    header = ["method", "tasks", "mean rank", f"P(beats {base})", f"{level} % interval"]
    table = _Display("ranks", "Ranks across tasks.", caption, header, ["l", "r", "r", "r", "r"])
    for r in ranks.itertuples(index=False):
        p = "n/a" if math.isnan(r.p_beats) else f"{r.p_beats:.2f}"
        ci = "n/a" if math.isnan(r.p_low) else f"[{r.p_low:.2f}, {r.p_high:.2f}]"
        table.add([r.method, str(int(r.tasks)), f"{r.mean_rank:.2f}", p, ci])
    return _render(table, fmt)


def published_table(runs: pd.DataFrame, published: Mapping[str, Any]) -> pd.DataFrame:
    """Table 2's cells beside numbers published elsewhere (``published``: a config's
    ``published`` entry: ``values`` target -> method -> accuracy in percent, ``source`` the
    citation, ``note``), one row per published number: the cell's ``n``, ``mean`` and ``std``
    (as in :func:`table2`; NaN where the grid has no such cell), the ``published`` value and
    ``difference`` = mean − published. A method with several reported settings gives one row
    per setting."""
    cells = table2(runs, baseline=None)
    rows = []
    for target, methods in published["values"].items():
        for method, value in methods.items():
            found = cells[(cells["target"] == target) & (cells["method"] == method)]
            for cell in found.itertuples(index=False) if len(found) else [None]:
                mean = math.nan if cell is None else float(cell.mean)
                rows.append({"source": "" if cell is None else cell.source, "target": target, "method": method,
                             "setting": "" if cell is None else cell.setting, "n": 0 if cell is None else int(cell.n),
                             "mean": mean, "std": math.nan if cell is None else float(cell.std),
                             "published": float(value), "difference": mean - float(value)})
    if not rows:
        raise InsufficientDataError("published_table: no published values")
    out = pd.DataFrame(rows)
    out.attrs.update(source=published.get("source", ""), note=published.get("note", ""))
    return out


def render_published(frame: pd.DataFrame, fmt: str = "markdown") -> str:
    """:func:`published_table` as ``fmt``; its caption cites the source and its note."""
    _check_runs(frame, ["source", "target", "method", "n", "mean", "std", "published", "difference"],
                "render_published")
    source, note = frame.attrs.get("source", ""), frame.attrs.get("note", "")
    caption = ("Target test accuracy (%) of Table 2's cells (mean ± sample std over n replicates, the setting "
               f"chosen by spbench's model selection on training folds) beside the numbers published by {source}"
               + (f" ({note})" if note else "") + "; Δ = spbench − published. A cell the grid did not run reads n/a.")
    table = _Display("published", "Published numbers.", caption,
                     ["source", "target", "method", "spbench", "n", "published", "Δ"],
                     ["l", "l", "l", "r", "r", "r", "r"])
    for r in frame.itertuples(index=False):
        ours = "n/a" if math.isnan(r.mean) else (f"{r.mean:.1f}" + ("" if math.isnan(r.std) else f" ± {r.std:.1f}"))
        delta = "n/a" if math.isnan(r.difference) else f"{r.difference:+.1f}"
        table.add([r.source or "n/a", r.target, r.method, ours, str(int(r.n)), f"{r.published:.1f}", delta])
    return _render(table, fmt)


def cd_diagram(runs: pd.DataFrame, **kwargs):
    """The critical-difference diagram of :func:`rank_statistics` (``kwargs`` go to it): each
    method at its mean rank, bars joining methods the Nemenyi test does not tell apart
    (p ≥ 0.05); drawn by scikit-posthocs. Returns a :class:`matplotlib.figure.Figure` not
    managed by pyplot."""
    return _cd_figure(*rank_statistics(runs, **kwargs))


def _cd_figure(ranks: pd.DataFrame, nemenyi: pd.DataFrame):
    """:func:`cd_diagram` of statistics already computed."""
    import scikit_posthocs
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 0.9 + 0.28 * len(ranks)))
    ax = fig.add_subplot()
    scikit_posthocs.critical_difference_diagram(ranks.set_index("method")["mean_rank"], nemenyi, ax=ax)
    ax.set_title(f"mean rank over {int(ranks['tasks'].iloc[0])} tasks; Friedman p = {ranks.attrs['friedman_p']:.3g}",
                 fontsize=9)
    fig.tight_layout()
    return fig


def render_paired(paired: pd.DataFrame, fmt: str = "markdown") -> str:
    """The paired differences (:func:`paired_differences`) as ``fmt``: one row per setting with
    its baseline, n, mean difference ± sd and the 95 % confidence interval."""
    _check_runs(paired, [*GROUP, "baseline_method", "baseline_setting", "baseline_rule", "n", "delta", "sd",
                         "ci_low", "ci_high"], "render_paired")
    rules = sorted(set(paired["baseline_rule"]))
    caption = (
        "Paired differences of target test accuracy (percentage points; freeze = 0): each setting minus "
        "the baseline setting of the same source and target, over the replicates both have (a replicate "
        "index fixes the seed: head initialisation and batch order); mean Δ, its sample std and the 95 % "
        "Student-t confidence interval Δ ± t(0.975, n−1)·sd/√n (n/a when n < 2). Baseline: "
        + "; ".join(rules) + "."
    )
    header = ["source", "target", "method", "setting", "baseline", "n", "Δ", "sd", "95 % CI"]
    table = _Display("paired", "Paired differences.", caption, header, ["l"] * 5 + ["r"] * 4)
    for r in paired.itertuples(index=False):
        ci = "n/a" if math.isnan(r.ci_low) else f"[{r.ci_low:+.2f}, {r.ci_high:+.2f}]"
        table.add([r.source, r.target, r.method, ", ".join(_hparam_parts(r.setting, True)),
                   _setting_text(r.baseline_method, r.baseline_setting),
                   str(int(r.n)), f"{r.delta:+.2f}", "n/a" if math.isnan(r.sd) else f"{r.sd:.2f}", ci])
    return _render(table, fmt)


def _si(x: float) -> str:
    """4.2e9 -> ``4.20 G``: three significant digits and an SI prefix."""
    if x == 0 or not math.isfinite(x):
        return format(x, "g")
    exponent = min(max(int(math.floor(math.log10(abs(x)) / 3)), 0), 5)
    prefix = ["", "k", "M", "G", "T", "P"][exponent]
    return f"{x / 1000 ** exponent:.3g} {prefix}".rstrip()


def render_overhead(table_: pd.DataFrame, fmt: str = "markdown") -> str:
    """The overhead table (:func:`overhead_table`) as ``fmt``; its caption says how FLOPs were counted."""
    _check_runs(table_, ["arch", "device", "batch_size", "image_size", "penalty", "step_flops", "penalty_flops",
                         "flops_percent", "step_seconds", "penalty_seconds", "time_percent"], "render_overhead")
    caption = (
        "Compute overhead of the penalty in one training step. Step FLOPs (forward, backward, optimizer) "
        "are counted by torch.utils.flop_counter, which counts matrix products and convolutions; the "
        "penalty's elementwise operations are counted analytically. Seconds: measured medians."
    )
    if (table_["arch"] == "resnet101").any():
        caption += f" {_PAPER_CITE}, §4.4.1: L2-SP adds less than 1 % to the FLOPs of a ResNet-101 step."
    header = ["arch", "device", "batch", "image", "penalty", "step FLOPs", "penalty FLOPs", "FLOPs (%)",
              "step (s)", "penalty (s)", "time (%)"]
    table = _Display("overhead", "Overhead.", caption, header, ["l", "l", "r", "r", "l"] + ["r"] * 6)
    for r in table_.itertuples(index=False):
        table.add([r.arch, r.device, str(int(r.batch_size)), str(int(r.image_size)), r.penalty, _si(r.step_flops),
                   _si(r.penalty_flops), f"{r.flops_percent:.3g}", f"{r.step_seconds:.3g}",
                   f"{r.penalty_seconds:.3g}", f"{r.time_percent:.3g}"])
    return _render(table, fmt)


# --------------------------------------------------------------------------- figures


def _figure_context():
    """The paper-like style: white grid, readable fonts, for Figures built without pyplot; and
    numpy's global generator seeded (then restored), which seaborn draws its jitter from, so that
    a figure is a function of its data alone."""
    import contextlib

    import seaborn as sns

    stack = contextlib.ExitStack()
    stack.enter_context(sns.axes_style("whitegrid"))
    stack.enter_context(sns.plotting_context("paper", font_scale=1.15))
    state = np.random.get_state()
    np.random.seed(0)
    stack.callback(np.random.set_state, state)
    return stack


def _palette(names: Sequence[str]) -> dict[str, tuple]:
    import seaborn as sns

    # the colour-blind palette has 10 colours; more series get evenly spaced hues instead of repeats
    colours = sns.color_palette("colorblind" if len(names) <= 10 else "husl", max(len(names), 1))
    return dict(zip(names, colours))


def _hparam_tick(x: float) -> str:
    """0 -> ``0``; powers of ten as 10^k (mathtext); other values as ``%g``."""
    if x == 0:
        return "0"
    k = math.log10(abs(x))
    if abs(k - round(k)) < 1e-9:
        return "1" if round(k) == 0 else rf"$10^{{{int(round(k))}}}$"
    return _fmt_hparam(x)


def fig1(
    runs: pd.DataFrame,
    method: str = "l2_sp",
    source: str | None = None,
    target: str | None = None,
    *,
    x: str = "beta",
):
    """Fig. 1: target test accuracy (%) over the α × β grid of one method.

    Over the test runs with ``freeze == 0`` of ``method`` on one (source, target) that has
    several alpha and several beta values (the first such pair in report order unless
    ``source`` / ``target`` say which). As in the paper's figure, x = β on a categorical axis
    (0, 10⁻⁴, …) and one line per α (``x="alpha"`` swaps the two); a point is the mean over
    replicates with a ± sample-std error bar when there are several. One facet per learning
    rate when the grid has several. Returns a :class:`matplotlib.figure.Figure` not managed
    by pyplot.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    import seaborn as sns

    if x not in ("alpha", "beta"):
        raise ValueError(f"fig1: x must be 'alpha' or 'beta', not {x!r}")
    hue = "alpha" if x == "beta" else "beta"
    symbol = {"alpha": "α", "beta": "β"}
    _check_runs(runs, _required("test_accuracy", "alpha", "beta", "lr"), "fig1")
    test = _test_runs(_slim(runs, "test_accuracy"), "fig1")
    sel = test[test["method"] == method]
    if source is not None:
        sel = sel[sel["source"] == source]
    if target is not None:
        sel = sel[sel["target"] == target]
    grids = [
        (s, t) for s, t in _pairs(sel)
        if sel.loc[(sel["source"] == s) & (sel["target"] == t), "alpha"].nunique() > 1
        and sel.loc[(sel["source"] == s) & (sel["target"] == t), "beta"].nunique() > 1
    ]
    if not grids:
        where = "".join(f", {k} = {v!r}" for k, v in (("source", source), ("target", target)) if v is not None)
        raise InsufficientDataError(
            f"fig1: no (source, target) has test runs (freeze == 0) of method {method!r} with several "
            f"alpha and several beta values{where}"
        )
    if len(grids) > 1:
        logger.info("fig1: %d (source, target) pairs have an α × β grid; drawing %s", len(grids), grids[0])
    source, target = grids[0]
    data = sel[(sel["source"] == source) & (sel["target"] == target)].copy()
    data["accuracy"] = data["test_accuracy"].astype(float) * 100.0
    xs = sorted(data[x].astype(float).unique())
    hues = sorted(data[hue].astype(float).unique())
    data["_x"] = data[x].astype(float).map(dict(zip(xs, map(_hparam_tick, xs))))
    data["_hue"] = data[hue].astype(float).map({h: f"{symbol[hue]} = {_hparam_tick(h)}" for h in hues})
    hue_order = [f"{symbol[hue]} = {_hparam_tick(h)}" for h in hues]
    palette = _palette(hue_order)
    lrs = sorted(data["lr"].astype(float).unique())
    several = data.groupby([*SETTING], dropna=False)["accuracy"].count().max() > 1

    with _figure_context():
        fig = Figure(figsize=(3.2 * len(lrs) + 1.8, 3.4), layout="constrained")
        axes = fig.subplots(1, len(lrs), sharey=True, squeeze=False)[0]
        for ax, lr in zip(axes, lrs):
            sub = data[data["lr"] == lr]
            sns.pointplot(data=sub, x="_x", y="accuracy", hue="_hue", order=[_hparam_tick(v) for v in xs],
                          hue_order=hue_order, palette=palette, errorbar="sd" if several else None,
                          capsize=0.08, markersize=5, linewidth=1.4, legend=False, ax=ax)
            title = f"{method}: {source} → {target}"
            ax.set_title(title if len(lrs) == 1 else f"{title}, lr = {_fmt_hparam(lr)}")
            ax.set_xlabel(symbol[x])
            ax.set_ylabel("test accuracy (%)" if ax is axes[0] else "")
        handles = [Line2D([], [], color=palette[h], marker="o", label=h) for h in hue_order]
        fig.legend(handles=handles, title=symbol[hue], loc="outside right upper", frameon=False)
    return fig


def fig2(runs: pd.DataFrame):
    """Fig. 2: target test accuracy (%) per target, one colour per method.

    One facet per source; x = target, hue = method (the columns of Table 2,
    :func:`method_columns`: one legend entry per method, whatever setting selection chose on
    each target; in :data:`METHOD_ORDER`; legend title "method"); a point with error
    bar = mean ± sample std (ddof = 1) over replicates, small dots = the individual
    replicates. Test runs with ``freeze == 0`` only. Returns a
    :class:`matplotlib.figure.Figure` not managed by pyplot (no GUI backend, nothing global
    to close); save it with ``fig.savefig``.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    import seaborn as sns

    _check_runs(runs, _required("test_accuracy"), "fig2")
    runs = _slim(runs, "test_accuracy")
    sel = _reported(_test_runs(runs, "fig2"), _selected_or_none(runs), "fig2")
    labels = method_columns(sel)
    data = sel[GROUP].copy()
    data["setting"] = [labels[(m, text)] for m, text in sel[SETTING].itertuples(index=False)]
    data["accuracy"] = sel["test_accuracy"].astype(float) * 100.0
    sources = sorted(data["source"].unique(), key=_natural_key)
    targets = sorted(data["target"].unique(), key=_natural_key)
    hue_order = list(dict.fromkeys(labels.values()))
    palette = _palette(hue_order)
    # stripplot's dodge splits a width of 0.8 into len(hue_order) slots; this pointplot
    # dodge puts each mean on the centre of its slot.
    dodge = 0.8 * (len(hue_order) - 1) / len(hue_order)

    facet_w = max(3.0, 0.35 * len(targets) * len(hue_order) + 1.0)
    with _figure_context():
        fig = Figure(figsize=(facet_w * len(sources) + 2.2, 3.6), layout="constrained")
        axes = fig.subplots(1, len(sources), sharey=True, squeeze=False)[0]
        for ax, source in zip(axes, sources):
            sub = data[data["source"] == source]
            common = dict(data=sub, x="target", y="accuracy", hue="setting", order=targets,
                          hue_order=hue_order, palette=palette, legend=False, ax=ax)
            sns.stripplot(**common, dodge=True, jitter=0.04, size=3, alpha=0.45)
            sns.pointplot(**common, dodge=dodge or False, errorbar="sd", capsize=0.08,
                          linestyle="none", markersize=5, err_kws={"linewidth": 1.2})
            ax.set_title(f"source: {source}")
            ax.set_xlabel("target")
            ax.set_ylabel("test accuracy (%)" if ax is axes[0] else "")
        handles = [Line2D([], [], color=palette[h], marker="o", linestyle="none", label=h) for h in hue_order]
        fig.legend(handles=handles, title="method", loc="outside right upper", frameon=False)
    return fig


def _fig3_setting(
    frozen: pd.DataFrame, chosen: Mapping, source: str, target: str, method: str
) -> tuple[str, str]:
    """The setting Fig. 3 draws: the selected one if it was run frozen, else the frozen runs'
    setting (with several, the one with most runs; ties: the first in report order)."""
    setting = chosen.get((source, target, method))
    if setting is not None and _is_setting(frozen, setting).any():
        return setting
    if frozen["setting"].nunique() > 1:
        logger.info("fig3: %s -> %s, %s has several frozen settings; drawing the one with most runs",
                    source, target, method)
    return _most_run_setting(frozen)


def fig3(runs: pd.DataFrame, methods: Sequence[str] = ("l2", "l2_sp")):
    """Fig. 3: target test accuracy (%) against the freeze depth, one line per method.

    Test runs with ``freeze > 0`` of ``methods``; one facet per (source, target) that has
    some. Per method one setting: the one selected on validation folds when it was run frozen,
    else the setting of the frozen runs (with several, the one with most runs). A point with
    error bar = mean ± sample std over replicates at that depth; the dashed horizontal line in
    the same colour = the mean of the same setting with nothing frozen (``freeze == 0``), as
    the paper's dashed lines. Returns a :class:`matplotlib.figure.Figure` not managed by pyplot.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    _check_runs(runs, _required("test_accuracy"), "fig3")
    runs = _slim(runs, "test_accuracy")
    test = _test_runs(runs, "fig3", unfrozen=False)
    methods = list(methods)
    frozen = test[(test["freeze"] > 0) & test["method"].isin(methods)]
    if frozen.empty:
        raise InsufficientDataError(f"fig3: no test runs with freeze > 0 for the methods {methods}")
    chosen = _selected_or_none(runs)
    pairs = _pairs(frozen)
    palette = _palette(methods)
    with _figure_context():
        fig = Figure(figsize=(3.6 * len(pairs) + 1.6, 3.4), layout="constrained")
        axes = fig.subplots(1, len(pairs), sharey=False, squeeze=False)[0]
        for ax, (source, target) in zip(axes, pairs):
            here = test[(test["source"] == source) & (test["target"] == target)]
            depths = sorted(int(d) for d in frozen.loc[(frozen["source"] == source)
                                                       & (frozen["target"] == target), "freeze"].unique())
            for method in methods:
                fr = frozen[(frozen["source"] == source) & (frozen["target"] == target)
                            & (frozen["method"] == method)]
                if fr.empty:
                    continue
                setting = _fig3_setting(fr, chosen, source, target, method)
                runs_s = here[_is_setting(here, setting)]
                acc = runs_s.assign(acc=runs_s["test_accuracy"].astype(float) * 100.0)
                stats = acc[acc["freeze"] > 0].groupby("freeze")["acc"].agg(["mean", "std", "count"])
                ax.errorbar(stats.index.to_numpy(dtype=float), stats["mean"].to_numpy(),
                            yerr=stats["std"].fillna(0.0).to_numpy() if (stats["count"] > 1).any() else None,
                            color=palette[method], marker="o", markersize=4.5, linewidth=1.4, capsize=3,
                            label=method)
                level = acc.loc[acc["freeze"] == 0, "acc"]
                if level.notna().any():
                    ax.axhline(float(level.mean()), color=palette[method], linestyle="--", linewidth=1.2)
            ax.set_xticks(depths)
            ax.set_title(f"{source} → {target}")
            ax.set_xlabel("frozen up to layer (freeze depth)")
            ax.set_ylabel("test accuracy (%)" if ax is axes[0] else "")
        present = [m for m in methods if (frozen["method"] == m).any()]
        handles = [Line2D([], [], color=palette[m], marker="o", label=m) for m in present]
        handles.append(Line2D([], [], color="0.35", linestyle="--", label="no freezing"))
        fig.legend(handles=handles, title="method", loc="outside right upper", frameon=False)
    return fig


def fig4(r2: pd.DataFrame):
    """Fig. 4: per-layer boxplots of R² (fine-tuned activation of a unit regressed on its
    pretrained activation, on target images).

    From :data:`~spbench.results.R2_SCHEMA` rows; one facet per (source, target); x = layer
    (``layer_index``, forward order), hue = method (labelled with its setting when a method comes
    with several), one box per (layer, method setting) over all its units and replicates. The y axis
    spans [min(0, smallest R²), 1], plus a margin of 0.02 at both ends. Returns a
    :class:`matplotlib.figure.Figure` not managed by pyplot.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    import seaborn as sns

    _check_runs(r2, _R2_COLUMNS, "fig4")
    dup = r2.duplicated(["source", "target", "method", "setting", "replicate", "layer", "unit"], keep=False)
    if dup.any():
        raise ValueError("fig4: several R² rows share one (source, target, setting, replicate, layer, unit)")
    data = r2.copy()
    labels = setting_labels(data)
    data["label"] = [labels[(m, text)] for m, text in data[SETTING].itertuples(index=False)]
    hue_order = list(labels.values())
    palette = _palette(hue_order)
    pairs = _pairs(data)
    low = min(0.0, float(data["r2"].min()))
    with _figure_context():
        n_layers = data["layer_index"].nunique()
        fig = Figure(figsize=(max(4.0, 0.25 * n_layers * len(hue_order) + 2.0) + 1.8, 3.2 * len(pairs)),
                     layout="constrained")
        axes = fig.subplots(len(pairs), 1, squeeze=False)[:, 0]
        for ax, (source, target) in zip(axes, pairs):
            sub = data[(data["source"] == source) & (data["target"] == target)]
            order = sorted(int(i) for i in sub["layer_index"].unique())
            with warnings.catch_warnings():
                # seaborn 0.13 still passes matplotlib's deprecated `vert` to bxp
                warnings.filterwarnings("ignore", message=r".*vert: bool.*")
                sns.boxplot(data=sub, x="layer_index", y="r2", hue="label", order=order, hue_order=hue_order,
                            palette=palette, fliersize=1.5, linewidth=0.8, legend=False, ax=ax)
            ax.set_ylim(low - 0.02, 1.02)  # a margin, so that boxes at 0 or 1 are not cut by the frame
            ax.set_title(f"{source} → {target}")
            ax.set_xlabel("layer (forward order)")
            ax.set_ylabel("R² (fine-tuned on pretrained)")
        handles = [Patch(facecolor=palette[h], edgecolor="0.3", label=h) for h in hue_order]
        fig.legend(handles=handles, title="method", loc="outside right upper", frameon=False)
    return fig


# --------------------------------------------------------------------------- writing


_TABLE_SUFFIXES = (("md", "markdown"), ("tex", "latex"), ("html", "html"))


def write_reports(
    runs: pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    r2: pd.DataFrame | None = None,
    overhead: pd.DataFrame | None = None,
    fig1_method: str = "l2_sp",
    fig1_target: str | None = None,
    fig3_methods: Sequence[str] = ("l2", "l2_sp"),
    published: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write every table and figure the data support into ``out_dir``; return the paths written.

    Tables (each as ``.md``, ``.tex``, ``.html`` and ``.csv``, the CSV being the builder's
    frame at full precision): ``table2`` (with the paired Δ to l2), ``table3``, ``selection``
    (needs validation runs), ``paired`` (needs l2 test runs), ``overhead`` (needs
    ``overhead``). Figures (``.png`` at 150 dpi and ``.pdf``): ``fig1`` (needs an α × β grid
    of ``fig1_method``, on ``fig1_target`` if given), ``fig2``, ``fig3`` (needs runs of
    ``fig3_methods`` with freeze > 0), ``fig4`` (needs ``r2``). With ``published`` (a config's
    ``published`` entry), the table ``published``: Table 2's cells beside those numbers.
    An output the data cannot support (:class:`InsufficientDataError`) is skipped with a log
    message; any other error stops before anything is written, as does having nothing to write.
    """
    _check_runs(runs, _required("test_accuracy"), "write_reports")
    if r2 is not None:
        _check_runs(r2, _R2_COLUMNS, "write_reports (r2)")
    if overhead is not None:
        _check_runs(overhead, _OVERHEAD_COLUMNS, "write_reports (overhead)")

    def attempt(name: str, build: Callable[[], object]):
        try:
            return build()
        except InsufficientDataError as err:
            logger.warning("skipping %s: %s", name, err)
            return None

    tables: list[tuple[str, pd.DataFrame, Callable[[pd.DataFrame, str], str]]] = []
    figures: list[tuple[str, object]] = []
    for name, build, render in [
        ("table2", lambda: table2(runs), render_table2),
        ("table3", lambda: table3(runs), render_table3),
        ("selection", lambda: selection_table(runs), render_selection),
        ("paired", lambda: paired_differences(runs), render_paired),
    ]:
        frame = attempt(name, build)
        if frame is not None and not frame.empty:
            tables.append((name, frame, render))
        elif frame is not None:
            logger.warning("skipping %s: no rows", name)
    ranked = attempt("ranks and cd", lambda: rank_statistics(runs))  # the table and the diagram share them
    if ranked is not None:
        tables.append(("ranks", ranked[0], render_ranks))
    if published is not None:
        frame = attempt("published", lambda: published_table(runs, published))
        if frame is not None:
            tables.append(("published", frame, render_published))
    if overhead is not None:
        tables.append(("overhead", overhead_table(overhead), render_overhead))
    else:
        logger.info("skipping overhead: no overhead table given")
    for name, build in [
        ("fig1", lambda: fig1(runs, fig1_method, target=fig1_target)),
        ("fig2", lambda: fig2(runs)),
        ("fig3", lambda: fig3(runs, fig3_methods)),
    ]:
        figure = attempt(name, build)
        if figure is not None:
            figures.append((name, figure))
    if ranked is not None:
        figures.append(("cd", _cd_figure(*ranked)))
    if r2 is not None:
        figures.append(("fig4", fig4(r2)))
    else:
        logger.info("skipping fig4: no R² table given")
    if not tables and not figures:
        raise InsufficientDataError("write_reports: the data support no table and no figure (see the log)")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name, frame, render in tables:
        for suffix, fmt in _TABLE_SUFFIXES:
            path = out / f"{name}.{suffix}"
            path.write_text(render(frame, fmt), encoding="utf-8")
            paths.append(path)
        path = out / f"{name}.csv"
        frame.to_csv(path, index=False)
        paths.append(path)
    for name, figure in figures:
        png, pdf = out / f"{name}.png", out / f"{name}.pdf"
        figure.savefig(png, dpi=150)
        figure.savefig(pdf, metadata={"CreationDate": None})
        paths += [png, pdf]
    page = out / "report.html"
    page.write_text(report_page([(name, render(frame, "html")) for name, frame, render in tables],
                                [(name, (out / f"{name}.png").read_bytes()) for name, _ in figures]), encoding="utf-8")
    paths.append(page)
    logger.info("wrote %d files into %s", len(paths), out)
    return paths


#: The figures' captions (the tables carry theirs).
FIGURE_CAPTIONS: dict[str, str] = {
    "fig1": "Fig. 1. Target test accuracy over the α × β grid of one method (one line per α), mean ± sample "
            "std over replicates.",
    "fig2": "Fig. 2. Target test accuracy of every method on every target: points with bars are the mean ± "
            "sample std over replicates, dots the replicates.",
    "fig3": "Fig. 3. Target test accuracy against the number of frozen units; dashed lines: the same setting "
            "with nothing frozen.",
    "fig4": "Fig. 4. Per layer, the R² of each unit's fine-tuned activation regressed on its pretrained "
            "activation (target test images), one box per method.",
    "cd": "Critical differences. Each method at its mean rank over the tasks of Table 2 (1 = best); a bar "
          "joins methods the Nemenyi post-hoc test of the Friedman test does not tell apart (p ≥ 0.05).",
}


def report_page(tables: Sequence[tuple[str, str]], figures: Sequence[tuple[str, bytes]]) -> str:
    """One self-contained HTML page: every table (its HTML rendering, with its caption) and every
    figure (the PNG inlined as base64, with its caption), a contents list first; nothing is
    loaded from elsewhere."""
    import base64

    entries = [(name, item_title(name)) for name, _ in tables]
    entries += [(name, item_title(name)) for name, _ in figures]
    contents = "".join(f'<li><a href="#{html.escape(n)}">{html.escape(label)}</a></li>' for n, label in entries)
    body = [f'<section id="{html.escape(name)}">{table}</section>' for name, table in tables]
    for name, png in figures:
        data = base64.b64encode(png).decode("ascii")
        caption = FIGURE_CAPTIONS.get(name, name)
        body.append(f'<figure id="{html.escape(name)}"><img src="data:image/png;base64,{data}" '
                    f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>')
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{padding:2px 8px;border-bottom:1px solid #ddd}caption{text-align:left;margin-bottom:.5em}"
             "img{max-width:100%}figure{margin:2em 0}figcaption{margin-top:.5em}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>spbench report</title>"
            f"<style>{style}</style></head><body><h1>spbench report</h1><ul>{contents}</ul>"
            + "".join(body) + "</body></html>\n")


def summary(runs: pd.DataFrame, reports_dir: str | os.PathLike, *, tracking_uri: str | None = None,
            experiment_id: str | None = None, baseline: str = "l2") -> str:
    """What a finished workflow prints: where Tables 2 and 3 and the figures are, the
    headline (each method's mean paired difference of test accuracy to ``baseline`` over the
    (source, target) cells of Table 2, in percentage points, with how many cells' intervals
    lie above and below 0), and the command that opens the MLflow UI on ``tracking_uri``."""
    out = Path(reports_dir)
    lines = ["spbench: finished.", f"  Table 2 (target test accuracy):  {out / 'table2.md'}  (also .tex, .html, .csv)",
             f"  Table 3 (source accuracy drop):  {out / 'table3.md'}"]
    figures = sorted(out.glob("fig*.png")) + sorted(out.glob("cd.png"))
    if (out / "ranks.md").exists():
        lines.append(f"  Ranks across tasks:              {out / 'ranks.md'}")
    if figures:
        lines.append(f"  Figures: {', '.join(str(f) for f in figures)}")
    try:
        t2 = table2(runs, baseline=baseline)
    except (InsufficientDataError, ValueError):
        t2 = None
    if t2 is not None and _has_delta(t2):
        cells = t2[~t2["is_baseline"].astype(bool) & t2["delta"].notna()]
        parts = []
        for method in sorted(cells["method"].unique(), key=_method_key):
            d = cells[cells["method"] == method]
            above, below = int((d["delta_low"] > 0).sum()), int((d["delta_high"] < 0).sum())
            parts.append(f"{method} {d['delta'].mean():+.2f} ({above}↑ {below}↓ of {len(d)})")
        lines.append(f"  Headline: mean paired Δ test accuracy vs {baseline}, percentage points (cells whose "
                     f"95 % interval lies above ↑ / below ↓ 0):")
        lines += [f"    {p}" for p in parts]
    if tracking_uri:
        from .tracking import runs_page

        if tracking_uri.startswith(("http://", "https://")):
            lines.append(f"  MLflow runs: open {runs_page(tracking_uri, experiment_id)}")
        else:
            mlflow = Path(sys.executable).with_name("mlflow")
            lines.append(f"  MLflow runs: {mlflow if mlflow.exists() else 'mlflow'} ui --backend-store-uri {tracking_uri}")
            lines.append(f"    then open {runs_page('http://127.0.0.1:5000', experiment_id)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _read_typed(path: str | os.PathLike, schema, what: str) -> pd.DataFrame:
    """Read a Parquet table whose columns must be exactly those of ``schema``."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    names = [f.name for f in schema]
    if sorted(table.schema.names) != sorted(names):
        missing = sorted(set(names) - set(table.schema.names))
        extra = sorted(set(table.schema.names) - set(names))
        raise SchemaError(f"{path}: columns differ from the {what} schema (missing {missing}, extra {extra})")
    return table.select(names).cast(schema).to_pandas()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: regenerate every table and figure from stored results, without training.

    ``python -m spbench.reports RUNS_PARQUET OUT_DIR [--r2 R2_PARQUET] [--overhead OVERHEAD_PARQUET]
    [--fig1-method NAME] [--fig1-target NAME] [--fig3-methods NAME,NAME] [--published JSON]``; prints the paths written, one a line.
    """
    parser = argparse.ArgumentParser(
        prog="python -m spbench.reports",
        description="Regenerate every table and figure from stored results (no training).",
    )
    parser.add_argument("runs", metavar="RUNS_PARQUET", help="the run table (results/runs.parquet)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder for the tables and figures")
    parser.add_argument("--r2", metavar="R2_PARQUET", help="per-unit R² table for Fig. 4")
    parser.add_argument("--overhead", metavar="OVERHEAD_PARQUET", help="step-cost table for the overhead table")
    parser.add_argument("--fig1-method", default="l2_sp", metavar="NAME",
                        help="method whose α × β grid Fig. 1 draws (default: %(default)s)")
    parser.add_argument("--fig1-target", default=None, metavar="NAME",
                        help="target whose grid Fig. 1 draws (default: the first that has one)")
    parser.add_argument("--fig3-methods", default="l2,l2_sp", metavar="NAME,NAME",
                        help="comma-separated methods Fig. 3 draws (default: %(default)s)")
    parser.add_argument("--published", default=None, metavar="JSON",
                        help="numbers published elsewhere, as a config's `published` entry in JSON: "
                             '{"source": ..., "note": ..., "values": {target: {method: accuracy %%}}}')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # matplotlib notes at INFO that categorical ticks such as "0" or "1" look like numbers
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    runs = read_parquet(args.runs)
    r2 = _read_typed(args.r2, R2_SCHEMA, "R²") if args.r2 else None
    overhead = _read_typed(args.overhead, OVERHEAD_SCHEMA, "overhead") if args.overhead else None
    fig3_methods = [p.strip() for p in args.fig3_methods.split(",") if p.strip()]
    paths = write_reports(runs, args.out_dir, r2=r2, overhead=overhead, fig1_method=args.fig1_method,
                          fig1_target=args.fig1_target, fig3_methods=fig3_methods,
                          published=json.loads(args.published) if args.published else None)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
