"""Statistics across tasks (spbench.reports.rank_statistics): ranks, the Friedman test and the
probability of beating l2, against brute force written from their definitions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from spbench import reports
from test_reports import _load_generator, _runs_of

HPARAMS = {"l2": {"alpha": 0.01, "beta": 0.01}, "l2_sp": {"alpha": 0.01, "beta": 0.01}, "none": {}}


def frame(scores: dict[tuple[str, str], list[float]]) -> pd.DataFrame:
    """Test runs of the fixture's schema: ``scores[(target, method)]`` = the replicates' test
    accuracies (in [0, 1])."""
    gen = _load_generator()
    parts = []
    for (target, method), accs in scores.items():
        part = _runs_of(gen, method, HPARAMS[method], {"digits-mod3-k5": accs[0]}, replicates=len(accs))
        parts.append(part.assign(test_accuracy=accs, target=target,
                                 run_key=part["run_key"].str.replace("digits-mod3-k5", target)))
    return pd.concat(parts, ignore_index=True)


SCORES = {
    ("t1", "l2"): [0.50, 0.60, 0.55], ("t1", "l2_sp"): [0.70, 0.60, 0.65], ("t1", "none"): [0.40, 0.45, 0.42],
    ("t2", "l2"): [0.80, 0.82, 0.81], ("t2", "l2_sp"): [0.79, 0.90, 0.85], ("t2", "none"): [0.60, 0.66, 0.63],
    ("t3", "l2"): [0.30, 0.31, 0.32], ("t3", "l2_sp"): [0.20, 0.25, 0.22], ("t3", "none"): [0.33, 0.34, 0.35],
}


def brute_prob(x, y) -> float:
    """P(X > Y) over every pair, ties one half."""
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(x, y)]
    return sum(wins) / len(wins)


def test_ranks_friedman_and_probability_by_brute_force():
    runs = frame(SCORES)
    ranks, nemenyi = reports.rank_statistics(runs, resamples=500)
    methods = ["l2", "l2_sp", "none"]
    targets = ["t1", "t2", "t3"]
    means = {(t, m): 100 * np.mean(SCORES[(t, m)]) for t in targets for m in methods}
    # rank 1 = the best mean on the task
    per_task = {t: {m: 1 + sum(means[(t, o)] > means[(t, m)] for o in methods) for m in methods} for t in targets}
    mean_rank = {m: np.mean([per_task[t][m] for t in targets]) for m in methods}
    got = ranks.set_index("method")
    for m in methods:
        assert got.loc[m, "mean_rank"] == pytest.approx(mean_rank[m], abs=1e-12)
        assert got.loc[m, "tasks"] == 3
    # Friedman (no ties): 12 N / (k (k + 1)) * sum_j (R_j - (k + 1) / 2)^2 with R_j the mean ranks
    n, k = len(targets), len(methods)
    chi2 = 12 * n / (k * (k + 1)) * sum((mean_rank[m] - (k + 1) / 2) ** 2 for m in methods)
    assert ranks.attrs["friedman_statistic"] == pytest.approx(chi2, abs=1e-12)
    from scipy.stats import chi2 as chi2_dist

    assert ranks.attrs["friedman_p"] == pytest.approx(chi2_dist.sf(chi2, k - 1), abs=1e-12)
    for m in ("l2_sp", "none"):
        expected = np.mean([brute_prob([100 * a for a in SCORES[(t, m)]], [100 * b for b in SCORES[(t, "l2")]])
                            for t in targets])
        assert got.loc[m, "p_beats"] == pytest.approx(expected, abs=1e-12)
        per = [brute_prob(SCORES[(t, m)], SCORES[(t, "l2")]) for t in targets]
        assert min(per) - 1e-12 <= got.loc[m, "p_low"] <= got.loc[m, "p_beats"] <= got.loc[m, "p_high"] <= max(per) + 1e-12
    assert math.isnan(got.loc["l2", "p_beats"])
    assert list(ranks["mean_rank"]) == sorted(ranks["mean_rank"])  # best first
    assert set(nemenyi.columns) == set(methods) and (np.diag(nemenyi.to_numpy()) == 1).all()


def test_too_few_tasks_or_methods_is_insufficient():
    one_task = frame({k: v for k, v in SCORES.items() if k[0] == "t1"})
    with pytest.raises(reports.InsufficientDataError, match="two tasks"):
        reports.rank_statistics(one_task)
    two_methods = frame({k: v for k, v in SCORES.items() if k[1] != "none"})
    with pytest.raises(reports.InsufficientDataError, match="three methods"):
        reports.rank_statistics(two_methods)


def test_the_diagram_draws():
    fig = reports.cd_diagram(frame(SCORES), resamples=200)
    texts = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "l2_sp" in texts and "none" in texts
