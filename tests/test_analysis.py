"""Fig. 4's R² per unit, the penalty-overhead measurement, and the validation folds."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from spbench.analysis import FLOPS_PER_ELEMENT, conv_layers, penalty_flops, step_overhead, unit_r2
from spbench.data import fold_split
from spbench.methods import MethodContext, make_method
from spbench.models import build_model, split_parameters
from spbench.penalties import PENALTIES, make_penalty
from spbench.pipeline import device_name


def test_unit_r2_matches_numpy_regression():
    """R² equals 1 − SSres/SStot of a least-squares line fitted with numpy, unit by unit;
    an unchanged network gives 1 everywhere."""
    torch.manual_seed(0)
    pre = build_model("demo_resnet", 3, 1).backbone.double()
    post = copy.deepcopy(pre)
    with torch.no_grad():
        for p in post.parameters():
            p.add_(0.2 * torch.randn_like(p))
    images = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    rows = unit_r2(pre, post, images)
    names = conv_layers(pre)
    assert [r["layer_index"] for r in rows if r["unit"] == 0] == list(range(1, len(names) + 1))
    acts = {}
    for net, tag in ((pre, "pre"), (post, "post")):
        mods = dict(net.named_modules())
        hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n, tag=tag: acts.__setitem__((tag, n), o.detach()))
                 for n in names]
        net.eval()
        with torch.no_grad():
            net(images)
        for h in hooks:
            h.remove()
    for row in rows[::7]:
        x = acts[("pre", row["layer"])][:, row["unit"]].flatten().numpy()
        y = acts[("post", row["layer"])][:, row["unit"]].flatten().numpy()
        slope, intercept = np.polyfit(x, y, 1)
        r2 = 1 - np.sum((y - (slope * x + intercept)) ** 2) / np.sum((y - y.mean()) ** 2)
        assert row["r2"] == pytest.approx(r2, abs=1e-8)
    assert 0 < min(r["r2"] for r in rows) < 0.999
    same = unit_r2(pre, copy.deepcopy(pre), images)
    assert all(r["r2"] == pytest.approx(1.0) for r in same)


def test_penalty_flops_counts_elements():
    model = build_model("demo_resnet", 3, 1)
    inherited, head = split_parameters(model)
    n_s = sum(p.numel() for p in inherited.values())
    n_h = sum(p.numel() for p in head.values())
    pen = make_penalty("l2_sp", inherited, head, alpha=0.1, beta=0.01)
    assert penalty_flops(pen) == 3 * n_s + 2 * n_h
    assert penalty_flops(make_penalty("none", inherited, head, alpha=0, beta=0)) == 0
    # the method that wraps a penalty counts as its penalty
    method = make_method("l2_sp", MethodContext(model, inherited, head), alpha=0.1, beta=0.01)
    assert penalty_flops(method) == 3 * n_s + 2 * n_h
    assert penalty_flops(make_method("none", MethodContext(model, inherited, head))) == 0


def test_step_overhead_rows():
    """One row per penalty; the penalty adds FLOPs to the counted step and no FLOPs for none."""
    rows = step_overhead("demo_resnet", ["none", "l2_sp", "gl_sp"], num_classes=3, in_channels=1,
                         image_size=16, batch_size=4, repeats=2)
    by = {r["penalty"]: r for r in rows}
    assert by["none"]["penalty_flops"] == 0 and by["none"]["flops_ratio"] == 0
    assert by["l2_sp"]["step_flops"] == pytest.approx(by["none"]["step_flops"] + by["l2_sp"]["penalty_flops"])
    assert 0 < by["l2_sp"]["flops_ratio"] < by["gl_sp"]["flops_ratio"] < 1
    assert all(r["step_seconds"] > 0 and r["penalty_seconds"] >= 0 for r in rows)
    # the device as records and benchmarks name it: the table says on what the steps were timed
    assert {r["device"] for r in rows} == {device_name(torch.device("cpu"))}
    assert rows[0]["device"].startswith("cpu: ") and "thread" in rows[0]["device"]
    assert set(PENALTIES) <= set(FLOPS_PER_ELEMENT)
    with pytest.raises(ValueError, match="lwf"):
        step_overhead("demo_resnet", ["lwf"], num_classes=3, in_channels=1, image_size=16, batch_size=4, repeats=1)


@pytest.mark.parametrize("folds", [2, 5])
def test_fold_split_is_a_stratified_partition(folds):
    labels = np.repeat(np.arange(3), [7, 5, 10])
    seen = np.zeros(len(labels), dtype=int)
    for f in range(folds):
        train, val = fold_split(labels, folds, f, seed=1)
        assert set(train).isdisjoint(val) and len(train) + len(val) == len(labels)
        seen[val] += 1
        for c, n in zip(range(3), (7, 5, 10)):
            assert np.sum(labels[val] == c) in (n // folds, -(-n // folds))
    assert (seen == 1).all()
    assert not np.array_equal(fold_split(labels, folds, 0, 1)[1], fold_split(labels, folds, 0, 2)[1])
    with pytest.raises(ValueError):
        fold_split(labels, folds, folds, 1)
