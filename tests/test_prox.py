"""The proximal (forward-backward splitting) variants of l1_sp, gl_sp and gl_sp_fisher,
checked against their closed forms (and, for the Fisher-weighted group norm, against a
numerical minimisation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from spbench.penalties import make_penalty


def _params(seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    inherited = {
        "backbone.conv.weight": torch.nn.Parameter(torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)),
        "backbone.bn.weight": torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64)),
    }
    head = {"head.weight": torch.nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))}
    return inherited, head


def _depart(inherited, scale: float, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    w0 = {n: p.detach().clone() for n, p in inherited.items()}
    with torch.no_grad():
        for p in inherited.values():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return w0


@pytest.mark.parametrize("scale", [0.01, 0.3])
def test_l1_prox_is_soft_thresholding(scale):
    """w ← w0 + sign(d)·max(|d| − lr·α, 0), elementwise."""
    inherited, head = _params()
    pen = make_penalty("l1_sp", inherited, head, alpha=0.5, beta=0.0, variant="prox")
    w0 = _depart(inherited, scale)
    before = {n: p.detach().clone() for n, p in inherited.items()}
    pen.prox_(0.1)
    t = 0.05
    for n, p in inherited.items():
        d = (before[n] - w0[n]).numpy()
        expected = w0[n].numpy() + np.sign(d) * np.maximum(np.abs(d) - t, 0)
        np.testing.assert_allclose(p.detach().numpy(), expected, rtol=0, atol=1e-15)


def test_group_prox_is_group_soft_thresholding():
    """Each output channel's departure shrinks by max(0, 1 − lr·α·√p/‖d_g‖); 1-D tensors
    elementwise (groups of one)."""
    inherited, head = _params()
    pen = make_penalty("gl_sp", inherited, head, alpha=0.2, beta=0.0, variant="prox")
    w0 = _depart(inherited, 0.05)
    before = {n: p.detach().clone() for n, p in inherited.items()}
    lr = 0.5
    pen.prox_(lr)
    conv = "backbone.conv.weight"
    for c in range(4):
        d = (before[conv][c] - w0[conv][c]).flatten()
        shrink = max(0.0, 1 - lr * 0.2 * math.sqrt(d.numel()) / float(d.norm()))
        torch.testing.assert_close(inherited[conv][c].detach(), w0[conv][c] + shrink * (before[conv][c] - w0[conv][c]))
    bn = "backbone.bn.weight"
    d = before[bn] - w0[bn]
    torch.testing.assert_close(inherited[bn].detach(), w0[bn] + torch.sign(d) * torch.clamp(d.abs() - lr * 0.2, min=0))


def _numeric_prox(d: np.ndarray, f: np.ndarray, ts: float) -> np.ndarray:
    def objective(u):
        return 0.5 * np.sum((u - d) ** 2) + ts * math.sqrt(np.sum(f * u * u) + 1e-300)

    best = min(
        (minimize(objective, x0, method="Powell", options={"xtol": 1e-12, "ftol": 1e-15, "maxiter": 200000}) for x0 in (d, 0.5 * d, np.zeros_like(d))),
        key=lambda r: r.fun,
    )
    return best.x


@pytest.mark.parametrize("scale", [0.02, 0.2, 1.0])
def test_fisher_group_prox_minimises_its_objective(scale):
    """u = argmin ½‖u − d‖² + lr·α·s_g·(Σ F u²)^½ per group, against a numerical minimiser;
    zero exactly when Σ d²/F ≤ (lr·α·s_g)²."""
    inherited, head = _params()
    g = torch.Generator().manual_seed(3)
    fisher = {n: torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 + 0.05 for n, p in inherited.items()}
    pen = make_penalty("gl_sp_fisher", inherited, head, alpha=0.3, beta=0.0, fisher=fisher, variant="prox")
    w0 = _depart(inherited, scale)
    before = {n: p.detach().clone() for n, p in inherited.items()}
    lr = 0.4
    pen.prox_(lr)
    conv = "backbone.conv.weight"
    for c in range(4):
        d = (before[conv][c] - w0[conv][c]).flatten().numpy()
        f = fisher[conv][c].flatten().numpy()
        ts = lr * 0.3 * math.sqrt(d.size)
        got = (inherited[conv][c] - w0[conv][c]).detach().flatten().numpy()
        if np.sum(d * d / f) <= ts * ts:
            assert np.all(got == 0)
        else:
            np.testing.assert_allclose(got, _numeric_prox(d, f, ts), atol=1e-6)
            obj = lambda u: 0.5 * np.sum((u - d) ** 2) + ts * math.sqrt(np.sum(f * u * u))
            assert obj(got) <= obj(_numeric_prox(d, f, ts)) + 1e-12


def test_fisher_group_prox_with_unit_fisher_equals_group_prox():
    inherited_a, head_a = _params()
    inherited_b, head_b = _params()
    ones = {n: torch.ones_like(p) for n, p in inherited_b.items()}
    a = make_penalty("gl_sp", inherited_a, head_a, alpha=0.3, beta=0.0, variant="prox")
    b = make_penalty("gl_sp_fisher", inherited_b, head_b, alpha=0.3, beta=0.0, fisher=ones, variant="prox")
    _depart(inherited_a, 0.1)
    _depart(inherited_b, 0.1)
    a.prox_(0.3)
    b.prox_(0.3)
    for n in inherited_a:
        torch.testing.assert_close(inherited_a[n], inherited_b[n], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["l1_sp", "gl_sp", "gl_sp_fisher"])
def test_prox_variant_gradient_is_head_only_and_value_exact(name):
    """With variant='prox', add_grad_ adds only β·w on the head; value() is the exact
    (unsmoothed) Ω; eps is 0."""
    inherited, head = _params()
    fisher = {n: torch.ones_like(p) for n, p in inherited.items()} if name.endswith("fisher") else None
    pen = make_penalty(name, inherited, head, alpha=0.5, beta=0.1, fisher=fisher, variant="prox")
    assert pen.eps == 0.0
    w0 = _depart(inherited, 0.1)
    for foreach in (False, True):
        for p in [*inherited.values(), *head.values()]:
            p.grad = None
        pen.add_grad_(foreach=foreach)
        for p in inherited.values():
            assert torch.count_nonzero(p.grad) == 0
        torch.testing.assert_close(head["head.weight"].grad, 0.1 * head["head.weight"].detach())
    if name == "l1_sp":
        exact = sum((p - w0[n]).abs().sum() for n, p in inherited.items())
        torch.testing.assert_close(pen.value(), 0.5 * exact + 0.05 * head["head.weight"].pow(2).sum())


def test_bad_variant_and_eps_are_refused():
    inherited, head = _params()
    with pytest.raises(ValueError, match="variant"):
        make_penalty("l1_sp", inherited, head, alpha=0.1, beta=0.0, variant="admm")
    with pytest.raises(ValueError, match="eps"):
        make_penalty("gl_sp", inherited, head, alpha=0.1, beta=0.0, eps=0.0)


def test_flat_fisher_group_prox_equals_the_per_tensor_one():
    """The flat, all-tensors-at-once solver (used on accelerators) gives the per-tensor
    reference's result, here run on the CPU."""
    from spbench.penalties import _fisher_group_prox, _fisher_group_prox_rows

    g = torch.Generator().manual_seed(5)
    shapes = [(4, 2, 3, 3), (5,), (3, 7), (6, 1, 1, 1)]
    diffs = [0.1 * torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    fishers = [torch.rand(s, generator=g, dtype=torch.float64) + 0.05 for s in shapes]
    flat = _fisher_group_prox(diffs, fishers, 0.1)
    for d, f, u in zip(diffs, fishers, flat):
        torch.testing.assert_close(u, _fisher_group_prox_rows(d, f, 0.1), rtol=1e-12, atol=1e-15)
    assert any(bool((u == 0).any()) for u in flat) and any(bool((u != 0).any()) for u in flat)


@pytest.mark.parametrize("name", ["l1_sp", "gl_sp", "gl_sp_fisher"])
def test_method_applies_the_prox_after_the_optimizer_step(name):
    """As a method (finetune.nonsmooth = prox), the penalty gets the protocol's variant from
    the MethodContext, and training_step runs forward-backward splitting: the optimizer step
    on J(w) + β/2‖w_S̄‖², then the penalty's prox at the step's learning rate."""
    from torch import nn

    from spbench.methods import MethodContext, make_method
    from spbench.models import build_model, split_parameters
    from spbench.train import training_step

    def setup():
        torch.manual_seed(0)
        model = build_model("demo_resnet", 3, 1).double()
        inherited, head = split_parameters(model)
        fisher = {n: torch.ones_like(p) + 0.5 for n, p in inherited.items()} if name.endswith("fisher") else None
        return model, inherited, head, fisher

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    model, inherited, head, fisher = setup()
    method = make_method(name, MethodContext(model, inherited, head, fisher=fisher, nonsmooth="prox"),
                         alpha=0.5, beta=0.1)
    assert method.penalty.variant == "prox" and method.penalty.eps == 0.0
    s_model, s_inh, s_head, s_fisher = setup()
    smooth = make_method(name, MethodContext(s_model, s_inh, s_head, fisher=s_fisher, epsilon=0.02), alpha=0.5, beta=0.1)
    assert smooth.penalty.variant == "smooth" and smooth.penalty.eps == 0.02
    ref_model, ref_inh, ref_head, ref_fisher = setup()
    pen = make_penalty(name, ref_inh, ref_head, alpha=0.5, beta=0.1, fisher=ref_fisher, variant="prox")
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.2, momentum=0.9)
    for lr in (0.2, 0.1, 0.05):
        training_step(model, method, x, y, opt, lr=lr)
        for group in ref_opt.param_groups:
            group["lr"] = lr
        ref_opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(ref_model(x), y).backward()
        pen.add_grad_()
        ref_opt.step()
        pen.prox_(lr)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    w0 = method.penalty.w0
    assert any(bool((p.detach() == w0[n]).any()) for n, p in inherited.items())  # the prox set some departures to 0
