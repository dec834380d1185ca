"""The proximal (forward-backward splitting) variants of l1_sp, gl_sp and gl_sp_fisher,
checked against their closed forms (and, for the Fisher-weighted group norm, against a
numerical minimisation)."""

from __future__ import annotations

import math
import warnings

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_l1_prox_is_the_textbook_formula_to_the_bit(dtype):
    """The one-kernel soft-thresholding gives sign(d)·max(|d| − t, 0) to the bit, at the
    threshold itself (±t: 0), inside it, outside it, and for t = 0 (d itself)."""
    from spbench.penalties import L1SP

    g = torch.Generator().manual_seed(0)
    t = 0.01
    d = torch.cat([torch.randn(10_000, generator=g, dtype=dtype) * 0.02,
                   torch.tensor([t, -t, 0.0, -0.0, 2 * t, -2 * t, 1e-30], dtype=dtype)])
    for threshold in (t, 0.0):
        expected = torch.sign(d) * torch.clamp(d.abs() - threshold, min=0)
        got = L1SP._prox(None, d, threshold, None)
        assert torch.equal(got, expected)
        assert got.dtype == dtype
    assert int((L1SP._prox(None, d, t, None) == 0).sum()) > 1000  # the zone |d| ≤ t is set to 0


def test_group_prox_is_group_soft_thresholding():
    """Each output channel's departure shrinks by max(0, 1 − lr·α·√p/‖d_g‖); 1-D tensors
    elementwise (groups of one). Departures small and large: groups set back to w0 and groups
    shrunk but kept, both seen."""
    shrinks, lr = [], 0.5
    for scale in (0.05, 0.3, 1.0):
        inherited, head = _params()
        pen = make_penalty("gl_sp", inherited, head, alpha=0.2, beta=0.0, variant="prox")
        w0 = _depart(inherited, scale)
        before = {n: p.detach().clone() for n, p in inherited.items()}
        pen.prox_(lr)
        conv = "backbone.conv.weight"
        for c in range(4):
            d = (before[conv][c] - w0[conv][c]).flatten()
            shrink = max(0.0, 1 - lr * 0.2 * math.sqrt(d.numel()) / float(d.norm()))
            shrinks.append(shrink)
            torch.testing.assert_close(inherited[conv][c].detach(), w0[conv][c] + shrink * (before[conv][c] - w0[conv][c]))
        bn = "backbone.bn.weight"
        d = before[bn] - w0[bn]
        shrinks += (1 - lr * 0.2 / d.abs()).clamp(min=0).tolist()
        torch.testing.assert_close(inherited[bn].detach(), w0[bn] + torch.sign(d) * torch.clamp(d.abs() - lr * 0.2, min=0))
    assert 0.0 in shrinks and max(shrinks) > 0.5, shrinks


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


@pytest.mark.parametrize("name", ["l1_sp", "gl_sp"])
def test_prox_in_blocks_of_rows_is_the_whole_tensor_map(name, monkeypatch):
    """On the CPU prox_ works in place through blocks of a few rows; each block is the
    closed-form map of its rows, so the result is that of the map on the whole tensor, bit for
    bit (here with blocks of 2 rows of the convolution, 18 elements of the 1-D tensor)."""
    from spbench.penalties import make_penalty as make

    inherited, head = _params()
    pen = make(name, inherited, head, alpha=0.2, beta=0.0, variant="prox")
    w0 = _depart(inherited, 0.05)
    before = {n: p.detach().clone() for n, p in inherited.items()}
    monkeypatch.setattr("spbench.penalties._BLOCK_BYTES", 4 * 18 * 8 // 2)  # 2 of the conv's rows, 18 elements of bn
    pen.prox_(0.25)
    for n, p in inherited.items():
        assert torch.equal(p.detach(), w0[n] + pen._prox(before[n] - w0[n], 0.25 * 0.2, None)), n
    moved = torch.cat([(p.detach() != w0[n]).flatten() for n, p in inherited.items()])
    assert bool(moved.any()) and not bool(moved.all())


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


# -- the Fisher group prox's Newton solve against the bisection it replaced ------------------------


def _bisection_prox_rows(d: torch.Tensor, f: torch.Tensor, t: float, iterations: int = 64) -> torch.Tensor:
    """The former solver, kept as a reference: λ by 64 halvings of log λ over [-60, 60]."""
    rows = d.reshape(d.shape[0], -1) if d.ndim >= 2 else d.reshape(-1, 1)
    fr = (f.reshape(f.shape[0], -1) if f.ndim >= 2 else f.reshape(-1, 1)).clamp_min(1e-30)
    ts = t * math.sqrt(rows.shape[1])
    zero = (rows.pow(2) / fr).sum(dim=1) <= ts * ts
    lo = torch.full((rows.shape[0], 1), -60.0, dtype=d.dtype)
    hi = torch.full_like(lo, 60.0)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lam = mid.exp()
        g = lam.squeeze(1) * torch.sqrt((fr * (rows / (1 + lam * fr)).pow(2)).sum(dim=1)) - ts
        up = (g > 0).unsqueeze(1)
        hi = torch.where(up, mid, hi)
        lo = torch.where(up, lo, mid)
    u = rows / (1 + ((lo + hi) / 2).exp() * fr)
    u[zero] = 0
    return u.reshape(d.shape)


def _extreme_case(seed: int, shape=(40, 6, 3, 3)):
    """Departures over 5 decades, Fisher entries over 12 (1e-8 .. 1e4, within a group too), some
    groups with one Fisher value (closed form), and t such that about half of the groups are
    zero; four groups put at the zero threshold (factors 1, 1 ± 1e-12, 1 + 1e-9)."""
    g = torch.Generator().manual_seed(seed)
    c = shape[0]
    k = math.prod(shape[1:]) if len(shape) > 1 else 1
    d = torch.randn(c, k, generator=g, dtype=torch.float64) * 10 ** torch.empty(c, 1, dtype=torch.float64).uniform_(-4, 1, generator=g)
    f = 10 ** torch.empty(c, k, dtype=torch.float64).uniform_(-8, 4, generator=g)
    if k > 1:
        f[:6] = f[:6, :1]  # constant over the group
        f[6], f[7] = 1e-8, 1e4
    threshold = (d * d / f).sum(dim=1).sqrt()
    ts = float(threshold.median())
    t = ts / math.sqrt(k)
    for row, factor in zip(range(8, 12), (1.0, 1 + 1e-12, 1 - 1e-12, 1 + 1e-9)):
        d[row] *= factor * ts / threshold[row]
    return d.reshape(shape), f.reshape(shape), t


def _assert_close_per_group(new: torch.Tensor, old: torch.Tensor, d: torch.Tensor, tol: float = 1e-12) -> None:
    """|new − old| ≤ tol·|old| + tol·max_g|d| in every group g (u is 0 where d is tiny)."""
    rows = lambda x: x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(-1, 1)  # noqa: E731
    scale = rows(d).abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(rows(new) / scale, rows(old) / scale, rtol=tol, atol=tol)


@pytest.mark.parametrize("seed", range(4))
def test_fisher_group_prox_matches_the_bisection(seed):
    """The Newton solve gives the former bisection's u to 1e-12 (float64), on extreme Fisher
    values and on groups at the zero threshold; the zero groups are the same ones (but for a
    group exactly at the threshold, which either may leave at rounding level)."""
    from spbench.penalties import _fisher_group_prox_rows

    d, f, t = _extreme_case(seed)
    new, old = _fisher_group_prox_rows(d, f, t), _bisection_prox_rows(d, f, t)
    _assert_close_per_group(new, old, d)
    size_new, size_old, size_d = (x.reshape(x.shape[0], -1).abs().amax(dim=1) for x in (new, old, d))
    assert torch.equal(size_new > 1e-12 * size_d, size_old > 1e-12 * size_d)
    assert bool((size_new[size_old == 0] == 0).all()) and 0 < int((size_new == 0).sum()) < new.shape[0]


def test_fisher_group_prox_flat_and_closed_form_match_the_bisection():
    """The all-tensors-at-once solver (accelerators) on several shapes at once, and the closed
    form for groups of one element (1-D tensors on the CPU), against the bisection; a Fisher
    entry of exactly 0 counts as 1e-30, as before; t = 0 leaves d unchanged."""
    from spbench.penalties import _fisher_group_prox, _fisher_prox_single

    cases = [_extreme_case(10, (40, 6, 3, 3)), _extreme_case(11, (30, 17)), _extreme_case(12, (50,))]
    t = cases[0][2]
    diffs = [d for d, _, _ in cases]
    fishers = [f for _, f, _ in cases]
    fishers[1][3, :5] = 0.0
    fishers[2][:3] = 0.0
    flat = _fisher_group_prox(diffs, fishers, t)
    for d, f, u in zip(diffs, fishers, flat):
        _assert_close_per_group(u, _bisection_prox_rows(d, f, t), d)
    assert all(bool((u == 0).any()) and bool((u != 0).any()) for u in flat)
    d1, f1, t1 = cases[2][0], fishers[2], cases[2][2]  # with its own t: its threshold groups
    (u1,) = _fisher_prox_single([d1], [f1], t1)
    _assert_close_per_group(u1, _bisection_prox_rows(d1, f1, t1), d1)
    assert bool((u1 == 0).any()) and bool((u1 != 0).any())
    assert all(torch.equal(u, d) for u, d in zip(_fisher_group_prox(diffs, fishers, 0.0), diffs))
    assert torch.equal(_fisher_prox_single([d1], [f1], 0.0)[0], d1)


def test_fisher_group_prox_of_groups_that_did_not_move():
    """A group with d = 0 exactly (a channel whose gradient is zero) stays at 0 in both
    solvers, without NaN and without holding up the iteration of the others."""
    from spbench.penalties import _fisher_group_prox, _fisher_group_prox_rows, _fisher_prox_mu

    d, f, t = _extreme_case(20, (30, 17))
    d[[0, 5, 29]] = 0.0
    for u in (_fisher_group_prox_rows(d, f, t), _fisher_group_prox([d], [f], t)[0]):
        assert not bool(u.isnan().any()) and bool((u[[0, 5, 29]] == 0).all())
        _assert_close_per_group(u[1:5], _bisection_prox_rows(d, f, t)[1:5], d[1:5])
    gid = torch.arange(30).repeat_interleave(17)
    flat_d, flat_f = d.reshape(-1), f.reshape(-1)
    ts = torch.full((30,), t * math.sqrt(17), dtype=torch.float64)

    def group_sum(x):
        return torch.zeros(30, dtype=x.dtype).index_add_(0, gid, x)

    def solve(cap):
        return _fisher_prox_mu(flat_f * flat_d * flat_d, flat_f, ts, group_sum, lambda m: m[gid], max_iterations=cap)

    assert torch.equal(solve(12), solve(100)) and bool((solve(100)[[0, 5, 29]] == 0).all())


def test_fisher_prox_newton_converges_in_a_handful_of_iterations():
    """On the extreme cases the iteration has stopped (every group converged) within 12 Newton
    steps: capping it there gives the uncapped result, bit for bit."""
    from spbench.penalties import _fisher_prox_mu

    for seed in range(4):
        d, f, t = _extreme_case(seed)
        rows, fr = d.reshape(d.shape[0], -1), f.reshape(f.shape[0], -1)
        ts = t * math.sqrt(rows.shape[1])
        live = (rows * rows / fr).sum(dim=1) > ts * ts
        a, fl = (fr * rows * rows)[live], fr[live]
        assert torch.equal(_fisher_prox_mu(a, fl, ts, max_iterations=12), _fisher_prox_mu(a, fl, ts))
        assert not torch.equal(_fisher_prox_mu(a, fl, ts, max_iterations=1), _fisher_prox_mu(a, fl, ts))


@pytest.mark.parametrize("block_bytes,native", [(None, "never"), (300, "never"), (None, "always")])
def test_fisher_prox_step_matches_the_bisection_on_every_tensor(block_bytes, native, monkeypatch):
    """prox_ of gl_sp_fisher on the CPU (closed form for the 1-D tensor, Newton per row for the
    convolution, by torch operations in blocks of rows: also with one row per block; or by the
    native kernel) sets w = w0 + u with u the bisection's, to 1e-12, extreme Fisher included."""
    if block_bytes:
        monkeypatch.setattr("spbench.penalties._BLOCK_BYTES", block_bytes)
    monkeypatch.setattr("spbench.penalties.NATIVE", native)
    by_kernel = _count_native_calls(monkeypatch)
    inherited, head = _params()
    g = torch.Generator().manual_seed(7)
    fisher = {n: 10 ** torch.empty(p.shape, dtype=torch.float64).uniform_(-8, 4, generator=g) for n, p in inherited.items()}
    pen = make_penalty("gl_sp_fisher", inherited, head, alpha=0.3, beta=0.0, fisher=fisher, variant="prox")
    w0 = _depart(inherited, 0.5)
    before = {n: p.detach().clone() for n, p in inherited.items()}
    lr = 0.05
    pen.prox_(lr)
    zeros = 0
    for n, p in inherited.items():
        d = before[n] - w0[n]
        expected = w0[n] + _bisection_prox_rows(d, fisher[n], lr * 0.3)
        _assert_close_per_group(p.detach() - w0[n], expected - w0[n], d)
        zeros += int((p.detach() == w0[n]).sum())
    assert zeros > 0
    assert by_kernel == ([(4, 2, 3, 3)] if native == "always" else [])


def _count_native_calls(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the tensors that go through the native kernel from now on."""
    import spbench.penalties as penalties

    calls, real = [], penalties._fisher_prox_native_

    def counted(kernel, p, *args, **kwargs):
        calls.append(tuple(p.shape))
        return real(kernel, p, *args, **kwargs)

    monkeypatch.setattr(penalties, "_fisher_prox_native_", counted)
    return calls


@pytest.mark.parametrize("native", ["never", "always"])
def test_fisher_prox_step_in_float32_and_channels_last(native, monkeypatch):
    """The same prox_ step on a float32 copy of the network (the iteration's stopping rule
    in float32 rounding) and on channels_last weights (not contiguous as rows) lands where
    the float64 one does, to float32 rounding and to float64 rounding; by the torch
    operations or by the native kernel."""
    from spbench.models import build_model, split_parameters

    monkeypatch.setattr("spbench.penalties.NATIVE", native)
    by_kernel = _count_native_calls(monkeypatch)

    def run(dtype, channels_last=False):
        torch.manual_seed(0)
        model = build_model("demo_resnet", 3, 1).to(dtype)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        inherited, head = split_parameters(model)
        g = torch.Generator().manual_seed(1)
        fisher = {n: (10 ** torch.empty(p.shape, dtype=torch.float64).uniform_(-3, 2, generator=g)).to(dtype)
                  for n, p in inherited.items()}
        pen = make_penalty("gl_sp_fisher", inherited, head, alpha=0.3, beta=0.0, fisher=fisher, variant="prox")
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in inherited.values():
                p.add_((0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(dtype))
        pen.prox_(0.1)
        return [p.detach().double().contiguous() for p in inherited.values()], pen

    ref, pen = run(torch.float64)
    assert any(bool((p == w0).any()) for p, w0 in zip(ref, pen.w0.values()))  # some groups at w0
    for a, b in zip(run(torch.float64, channels_last=True)[0], ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    for a, b in zip(run(torch.float32)[0], ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    multi = sum(p.ndim >= 2 for p in pen.w0.values())
    assert multi > 2 and len(by_kernel) == (3 * multi if native == "always" else 0)


def test_fisher_prox_reads_channels_last_tensors_in_place(monkeypatch):
    """prox_ hands a channels_last kernel to the native kernel as is, its rows read in
    [O, kh, kw, I] order (no copy of w, of w0, nor of F: the penalty stores F, estimated
    contiguous, in the parameter's layout, as w0), and lands where the contiguous map does, to
    float64 rounding (a group's map does not depend on the order of its elements; its sums
    round in another order); so does the torch operations' path on the same views; a layout
    whose rows are not dense blocks is copied and written back."""
    from spbench import native, penalties
    from spbench.models import build_model, split_parameters

    real = _native()
    seen = []

    class Recording:
        def fisher_group_prox_(self, w, w0, f, t, iterations):
            seen.append((w.data_ptr(), w0.data_ptr(), f.data_ptr()))
            real.fisher_group_prox_(w, w0, f, t, iterations)

    monkeypatch.setattr(native, "load", Recording)
    d, f, t = _extreme_case(3, (24, 5, 3, 3))
    w0 = torch.randn(d.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    expected = w0 + d
    real.fisher_group_prox_(expected.view(24, -1), w0.reshape(24, -1), f.reshape(24, -1), t, 100)
    for layout in (torch.channels_last, "transposed"):
        for how in ("always", "never"):
            if layout == "transposed":  # dims 1 and 0 swapped in memory: rows are not dense blocks
                weight = torch.nn.Parameter(w0.transpose(0, 1).contiguous().transpose(0, 1))
            else:
                weight = torch.nn.Parameter(w0.contiguous(memory_format=layout))
            pen = make_penalty("gl_sp_fisher", {"w": weight}, {}, alpha=t, beta=0.0, fisher={"w": f}, variant="prox")
            with torch.no_grad():
                weight.add_(d)
            monkeypatch.setattr(penalties, "NATIVE", how)
            seen.clear()
            pen.prox_(1.0)
            torch.testing.assert_close(weight.detach(), expected, rtol=1e-12, atol=1e-15)
            assert pen.fisher["w"].stride() == weight.stride() == pen.w0["w"].stride()
            assert len(seen) == (how == "always"), (layout, how, seen)
            in_place = seen == [(weight.data_ptr(), pen.w0["w"].data_ptr(), pen.fisher["w"].data_ptr())]
            assert in_place == (layout == torch.channels_last and how == "always"), (layout, how, seen)
    model = build_model("demo_resnet", 3, 1).to(memory_format=torch.channels_last)
    inherited, head = split_parameters(model)
    fisher = {n: torch.rand(p.shape) for n, p in inherited.items()}  # contiguous, as estimated
    pen = make_penalty("gl_sp_fisher", inherited, head, alpha=0.3, beta=0.0, fisher=fisher, variant="prox")
    assert any(p.ndim == 4 and not p.is_contiguous() for p in inherited.values())
    for n, p in inherited.items():
        assert pen.fisher[n].stride() == p.stride() == pen.w0[n].stride() and torch.equal(pen.fisher[n], fisher[n])


def _native():
    from spbench import native

    kernel = native.load()
    assert kernel is not None, "the native kernel did not build (see the warning)"
    return kernel


def test_native_fisher_prox_matches_the_bisection_row_by_row():
    """The native kernel on its own: the bisection's u to 1e-12 (float64) on the extreme cases
    (Fisher from 1e-8 to 1e4, constant over some groups, groups at the zero threshold, groups
    with d = 0 exactly, a Fisher entry of exactly 0), with the same zero groups; the same
    result, bit for bit, on one thread and on two (the groups are independent); and clear
    errors for what it does not take."""
    kernel = _native()
    for seed, shape in ((0, (40, 6, 3, 3)), (1, (30, 17)), (2, (64, 1, 1, 1))):
        d, f, t = _extreme_case(seed, shape)
        d[[3, 13]] = 0.0
        f[5, ...] = 0.0
        g = torch.Generator().manual_seed(seed)
        w0 = torch.randn(shape, generator=g, dtype=torch.float64)
        rows = lambda x: x.reshape(shape[0], -1).contiguous()  # noqa: E731
        p = rows(w0 + d)
        kernel.fisher_group_prox_(p, rows(w0), rows(f), t, 100)
        u, expected = p - rows(w0), rows(_bisection_prox_rows(d, f, t))
        moved = [i for i in range(shape[0]) if i not in (3, 13)]
        _assert_close_per_group(u[moved], expected[moved], rows(d)[moved])
        size_new, size_old, size_d = (x.abs().amax(dim=1) for x in (u, expected, rows(d)))
        assert bool((size_new[[3, 13]] == 0).all()) and not bool(u.isnan().any())
        assert torch.equal(size_new > 1e-10 * size_d, size_old > 1e-10 * size_d)
        if shape[1] > 1:
            assert 0 < int((size_new == 0).sum()) < shape[0]
    big = torch.randn(300, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    fb, w0b = torch.rand_like(big) + 0.1, torch.zeros_like(big)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            pb = big.clone()
            kernel.fisher_group_prox_(pb, w0b, fb, 0.05, 100)
            results.append(pb)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and not torch.equal(results[0], big)
    ok = torch.zeros(4, 3)
    for args, message in (
        ((ok.t(), ok.t(), ok.t(), 0.1, 100), "contiguous"),
        ((ok, ok.double(), ok, 0.1, 100), "one dtype"),
        ((ok, ok[:3], ok, 0.1, 100), "one shape"),
        ((ok, ok, ok, 0.0, 100), "positive"),
    ):
        with pytest.raises(RuntimeError, match=message):
            kernel.fisher_group_prox_(*args)


def test_fisher_prox_runs_natively_for_large_networks_and_falls_back_where_it_cannot_build(monkeypatch):
    """NATIVE='auto' runs the kernel when the tensors of groups hold NATIVE_MIN_ELEMENTS elements
    or more, not below, with the torch operations' result to rounding; where the kernel cannot
    be built, the build warns once, names the compiler's complaint, and prox_ gives the torch
    operations' result; an unknown setting is an error."""
    import spbench.penalties as penalties
    from spbench import native

    def step():
        inherited, head = _params(3)
        g = torch.Generator().manual_seed(4)
        fisher = {n: torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.1 for n, p in inherited.items()}
        pen = make_penalty("gl_sp_fisher", inherited, head, alpha=0.3, beta=0.0, fisher=fisher, variant="prox")
        _depart(inherited, 0.5)
        pen.prox_(0.05)
        return [p.detach().clone() for p in inherited.values()]

    by_kernel = _count_native_calls(monkeypatch)
    monkeypatch.setattr(penalties, "NATIVE", "auto")
    monkeypatch.setattr(penalties, "NATIVE_MIN_ELEMENTS", 73)  # the conv kernel has 72
    eager = step()
    assert by_kernel == []
    monkeypatch.setattr(penalties, "NATIVE_MIN_ELEMENTS", 72)
    for a, b in zip(step(), eager):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    assert by_kernel == [(4, 2, 3, 3)]

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'spbench_native'\nc++: command not found")

    monkeypatch.setattr("torch.utils.cpp_extension.load", broken)
    native.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"could not be built \(RuntimeError: c\+\+: command not found\)"):
            fallback = step()
        assert all(torch.equal(a, b) for a, b in zip(fallback, eager)) and by_kernel == [(4, 2, 3, 3)]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            step()  # the torch operations from now on, without a second warning
    finally:
        native.load.cache_clear()
    monkeypatch.setattr(penalties, "NATIVE", "sometimes")
    with pytest.raises(ValueError, match="NATIVE must be 'auto', 'always' or 'never'"):
        step()
