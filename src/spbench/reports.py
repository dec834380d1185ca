"""Tables and figures: pure functions of the run table (``results/runs.parquet``).

Every builder takes the run table as a :class:`pandas.DataFrame` with the columns of
:data:`spbench.results.SCHEMA` (only the columns it uses are required) and returns a new
object; nothing here reads files. :func:`write_reports` is the one helper that writes.

Conventions shared by all outputs:

* Only runs with ``freeze == 0`` (nothing frozen) enter Table 2, Table 3 and Fig. 2, as in
  the paper; freezing is the subject of Fig. 3.
* A *setting* is one ``(penalty, alpha, beta)``; a *cell* is one ``(source, target)`` and one
  setting. Statistics are over the replicates of a cell: ``n`` is the number of runs with a
  non-missing value, ``mean`` their arithmetic mean and ``std`` the sample standard deviation
  (ddof = 1, NaN when ``n == 1``).
* Accuracies are stored as fractions and reported in percent; accuracy drops in percentage
  points.
* Penalties are ordered ``none, l2, l2_sp, l2_sp_fisher`` and then any others alphabetically;
  within a penalty by ``alpha`` then ``beta``. Sources and targets are ordered naturally
  (``k5`` before ``k10``).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

__all__ = [
    "PENALTY_ORDER",
    "GROUP",
    "table2",
    "table3",
    "setting_labels",
    "render_markdown",
    "render_table2_markdown",
    "render_table3_markdown",
    "fig2",
    "write_reports",
]

#: Penalties in the order of the paper's tables; others follow alphabetically.
PENALTY_ORDER: tuple[str, ...] = ("none", "l2", "l2_sp", "l2_sp_fisher")

#: The columns one table row (a cell) is grouped by.
GROUP: list[str] = ["source", "target", "penalty", "alpha", "beta"]

# The run identity (spbench.results.IDENTITY); duplicates would silently inflate n.
_IDENTITY = [*GROUP, "freeze", "replicate"]
# The columns of a table of cells (output of table2 / table3).
_CELL_COLUMNS = [*GROUP, "n", "mean", "std"]

_TABLE2_CAPTION = (
    "**Table 2.** Target test accuracy (%), mean ± sample std over {reps}; "
    "no frozen layers (freeze = 0)."
)
_TABLE3_CAPTION = (
    "**Table 3.** Source-task accuracy drop (percentage points): fine-tuned backbone with the "
    "original source head on source test data, minus the pretrained network's accuracy "
    "(negative = forgotten); mean ± sample std over {reps}; freeze = 0. "
    "“pretrained (%)” is the pretrained network's source accuracy."
)


# --------------------------------------------------------------------------- checks, order


def _check_runs(runs: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    if not isinstance(runs, pd.DataFrame):
        raise TypeError(f"{what}: expected a pandas DataFrame of runs, got {type(runs).__name__}")
    missing = [c for c in columns if c not in runs.columns]
    if missing:
        raise ValueError(f"{what}: the run table lacks the columns {missing}")
    if runs.empty:
        raise ValueError(f"{what}: the run table is empty (no runs to report)")


def _unfrozen(runs: pd.DataFrame, what: str) -> pd.DataFrame:
    dup = runs.duplicated(_IDENTITY, keep=False)
    if dup.any():
        example = runs.loc[dup, _IDENTITY].head(1).to_dict("records")[0]
        raise ValueError(f"{what}: several runs share one identity, e.g. {example}")
    sel = runs[runs["freeze"] == 0]
    if sel.empty:
        depths = sorted(runs["freeze"].unique().tolist())
        raise ValueError(f"{what}: no runs with freeze == 0 (freeze depths present: {depths})")
    return sel


def _natural_key(text: str) -> tuple:
    """``digits-mod3-k5`` before ``digits-mod3-k10``: digit runs compare as numbers."""
    tokens = [tok for tok in re.split(r"(\d+)", str(text)) if tok]
    return tuple((0, int(tok), "") if tok.isdigit() else (1, 0, tok) for tok in tokens)


def _penalty_key(name: str) -> tuple[int, str]:
    return (PENALTY_ORDER.index(name), "") if name in PENALTY_ORDER else (len(PENALTY_ORDER), name)


def _sort_cells(frame: pd.DataFrame) -> pd.DataFrame:
    keys = [
        (_natural_key(s), _natural_key(t), _penalty_key(p), a, b)
        for s, t, p, a, b in frame[GROUP].itertuples(index=False)
    ]
    order = sorted(range(len(frame)), key=keys.__getitem__)
    return frame.iloc[order].reset_index(drop=True)


def _aggregate(runs: pd.DataFrame, column: str, scale: float) -> pd.DataFrame:
    """n, mean and sample std (ddof=1) of ``scale * runs[column]`` per cell."""
    values = runs[GROUP].assign(_v=runs[column].astype(float) * scale)
    out = values.groupby(GROUP, sort=False)["_v"].agg(n="count", mean="mean", std=lambda s: s.std(ddof=1))
    return out.reset_index()


# --------------------------------------------------------------------------- tables


def table2(runs: pd.DataFrame) -> pd.DataFrame:
    """Table 2: target test accuracy per cell, in percent.

    For each (source, target, penalty, alpha, beta) over the runs with ``freeze == 0``:
    ``n`` replicates, ``mean`` = mean of 100 · test_accuracy, ``std`` = its sample standard
    deviation (ddof = 1; NaN when n == 1). One row per cell, in report order.
    """
    _check_runs(runs, [*_IDENTITY, "test_accuracy"], "table2")
    out = _aggregate(_unfrozen(runs, "table2"), "test_accuracy", 100.0)
    return _sort_cells(out)


def table3(runs: pd.DataFrame) -> pd.DataFrame:
    """Table 3: how much of the source task the fine-tuned backbone forgets.

    Same cells as :func:`table2` (``freeze == 0``). ``mean`` and ``std`` are the mean and
    sample std (ddof = 1) of 100 · source_accuracy_drop, in percentage points, where the drop
    is (accuracy of the fine-tuned backbone with the original source head on source test
    data) − (pretrained network's accuracy); negative means worse. ``source_accuracy`` and
    ``source_accuracy_pretrained`` are the cell means of those columns, in percent.
    """
    cols = ["source_accuracy", "source_accuracy_pretrained", "source_accuracy_drop"]
    _check_runs(runs, [*_IDENTITY, *cols], "table3")
    sel = _unfrozen(runs, "table3")
    out = _aggregate(sel, "source_accuracy_drop", 100.0)
    percent = sel[GROUP].assign(**{c: sel[c].astype(float) * 100.0 for c in cols[:2]})
    means = percent.groupby(GROUP, sort=False).mean()
    out = out.merge(means.reset_index(), on=GROUP, how="left", validate="one_to_one")
    return _sort_cells(out)


# --------------------------------------------------------------------------- markdown


def _fmt_hparam(x: float) -> str:
    return format(float(x), "g")


def setting_labels(cells: pd.DataFrame) -> dict[tuple[str, float, float], str]:
    """Column label of each (penalty, alpha, beta) setting present in ``cells``, in report order.

    A penalty seen with one setting is labelled by its name; one seen with several gets one
    label per setting, e.g. ``l2_sp (α=0.1, β=0.01)``.
    """
    settings = cells[["penalty", "alpha", "beta"]].drop_duplicates()
    settings = sorted(
        {(str(p), float(a), float(b)) for p, a, b in settings.itertuples(index=False)},
        key=lambda s: (_penalty_key(s[0]), s[1], s[2]),
    )
    count: dict[str, int] = {}
    for p, _, _ in settings:
        count[p] = count.get(p, 0) + 1
    return {
        (p, a, b): p if count[p] == 1 else f"{p} (α={_fmt_hparam(a)}, β={_fmt_hparam(b)})"
        for p, a, b in settings
    }


def _escape(text: str) -> str:
    return str(text).replace("|", r"\|")


def _fmt_cell(mean: float, std: float, n: int, n_max: int, fmt: str) -> str:
    text = format(mean, fmt) + " ± " + ("n/a" if math.isnan(std) else format(std, ".2f"))
    return text if n == n_max else f"{text} (n={n})"


def _replicates_phrase(cells: pd.DataFrame) -> str:
    n = cells["n"]
    if n.min() == n.max():
        return f"{int(n.max())} replicate{'s' if n.max() != 1 else ''}"
    return f"up to {int(n.max())} replicates ((n=k) marks cells with fewer)"


def render_markdown(
    cells: pd.DataFrame,
    caption: str,
    *,
    fmt: str = ".2f",
    extra_columns: Sequence[tuple[str, str]] = (),
) -> str:
    """A Markdown table of ``cells`` (the output of :func:`table2` or :func:`table3`).

    One row per (source, target), one column per setting (:func:`setting_labels`), each cell
    ``mean ± std`` with ``fmt`` for the mean and two decimals for the std (``n/a`` when
    n == 1); a cell with fewer replicates than the most in the table shows ``(n=k)``, a
    missing cell ``—``. ``extra_columns`` are (column of ``cells``, header) pairs shown after
    the target as the row mean of that column. ``caption`` comes first, then a blank line.
    """
    _check_runs(cells, [*_CELL_COLUMNS, *(c for c, _ in extra_columns)], "render_markdown")
    labels = setting_labels(cells)
    n_max = int(cells["n"].max())
    rows = sorted(
        {(str(s), str(t)) for s, t in cells[["source", "target"]].itertuples(index=False)},
        key=lambda st: (_natural_key(st[0]), _natural_key(st[1])),
    )
    lookup = {
        (r.source, r.target, r.penalty, float(r.alpha), float(r.beta)): r for r in cells.itertuples(index=False)
    }
    header = ["source", "target", *(h for _, h in extra_columns), *labels.values()]
    numeric_from = 2
    body = []
    for source, target in rows:
        in_row = cells[(cells["source"] == source) & (cells["target"] == target)]
        line = [source, target]
        line += [format(float(in_row[c].mean()), ".2f") for c, _ in extra_columns]
        for setting in labels:
            r = lookup.get((source, target, *setting))
            line.append("—" if r is None else _fmt_cell(r.mean, r.std, int(r.n), n_max, fmt))
        body.append([_escape(x) for x in line])
    header = [_escape(h) for h in header]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def fmt_row(cols: list[str]) -> str:
        padded = [c.ljust(w) if i < numeric_from else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * w if i < numeric_from else "-" * (w - 1) + ":" for i, w in enumerate(widths)]
    lines = [caption, "", fmt_row(header), "| " + " | ".join(rule) + " |", *map(fmt_row, body)]
    return "\n".join(lines) + "\n"


def render_table2_markdown(t2: pd.DataFrame) -> str:
    """Table 2 (:func:`table2`) in the paper's layout, with its caption."""
    _check_runs(t2, _CELL_COLUMNS, "render_table2_markdown")
    return render_markdown(t2, _TABLE2_CAPTION.format(reps=_replicates_phrase(t2)))


def render_table3_markdown(t3: pd.DataFrame) -> str:
    """Table 3 (:func:`table3`) in the paper's layout (signed drops), with its caption."""
    _check_runs(t3, [*_CELL_COLUMNS, "source_accuracy_pretrained"], "render_table3_markdown")
    return render_markdown(
        t3,
        _TABLE3_CAPTION.format(reps=_replicates_phrase(t3)),
        fmt="+.2f",
        extra_columns=[("source_accuracy_pretrained", "pretrained (%)")],
    )


# --------------------------------------------------------------------------- figure


def fig2(runs: pd.DataFrame):
    """Fig. 2: target test accuracy (%) per target, one colour per penalty setting.

    One facet per source; x = target, hue = setting (labelled as in the tables, legend title
    "penalty"); a point with error bar = mean ± sample std (ddof = 1) over replicates, small
    dots = the individual replicates. Only runs with ``freeze == 0``. Returns a
    :class:`matplotlib.figure.Figure` not managed by pyplot (no GUI backend, nothing global
    to close); save it with ``fig.savefig``.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    import seaborn as sns

    _check_runs(runs, [*_IDENTITY, "test_accuracy"], "fig2")
    sel = _unfrozen(runs, "fig2")
    labels = setting_labels(sel)
    data = sel[GROUP].copy()
    settings = sel[["penalty", "alpha", "beta"]].itertuples(index=False)
    data["setting"] = [labels[(p, float(a), float(b))] for p, a, b in settings]
    data["accuracy"] = sel["test_accuracy"].astype(float) * 100.0
    sources = sorted(data["source"].unique(), key=_natural_key)
    targets = sorted(data["target"].unique(), key=_natural_key)
    hue_order = list(labels.values())
    palette = dict(zip(hue_order, sns.color_palette("colorblind", len(hue_order))))
    # stripplot's dodge splits a width of 0.8 into len(hue_order) slots; this pointplot
    # dodge puts each mean on the centre of its slot.
    dodge = 0.8 * (len(hue_order) - 1) / len(hue_order)

    facet_w = max(3.0, 0.35 * len(targets) * len(hue_order) + 1.0)
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
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
        fig.legend(handles=handles, title="penalty", loc="outside right upper", frameon=False)
    return fig


# --------------------------------------------------------------------------- writing


def write_reports(runs: pd.DataFrame, out_dir: str | os.PathLike) -> list[Path]:
    """Write table2.md, table3.md, table2.csv, table3.csv and fig2.png into ``out_dir``.

    The CSV files hold :func:`table2` / :func:`table3` at full precision; the PNG is
    :func:`fig2` at 150 dpi. Returns the paths written, in that order.
    """
    out = Path(out_dir)
    t2, t3 = table2(runs), table3(runs)
    figure = fig2(runs)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in ("table2.md", "table3.md", "table2.csv", "table3.csv", "fig2.png")]
    paths[0].write_text(render_table2_markdown(t2), encoding="utf-8")
    paths[1].write_text(render_table3_markdown(t3), encoding="utf-8")
    t2.to_csv(paths[2], index=False)
    t3.to_csv(paths[3], index=False)
    figure.savefig(paths[4], dpi=150)
    return paths
