"""Penalties Ω(w) (SPEC §2): every registered penalty against an independent formula, its
in-place gradient against autograd, its SGD trajectory against the explicit objective, and its
registered reference state. Parametrized over ``PENALTIES`` so a new entry is covered."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from spbench.models import apply_freeze, build_model, split_parameters
from spbench.penalties import PENALTIES, make_penalty

NAMES = sorted(PENALTIES)
ALPHA, BETA = 0.3, 0.07


# -- helpers ---------------------------------------------------------------------------------------


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("demo_resnet", 3, 1).double()


def _random_fisher(params: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.1 for n, p in params.items()}


@torch.no_grad()
def _perturb(model: nn.Module, seed: int = 2, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _weights(name: str) -> tuple[float, float]:
    return (0.0, 0.0) if name == "none" else (ALPHA, BETA)


def _setup(name: str, scope: str = "all", freeze: int = 0, seed: int = 0):
    """Model, penalty built at w0, then weights moved away from w0. Returns the reference state
    the test itself keeps (w0 copy, Fisher) for the brute-force formulas."""
    model = _model(seed)
    if freeze:
        apply_freeze(model, freeze)
    inherited, head = split_parameters(model, scope)
    fisher = _random_fisher(inherited) if PENALTIES[name].uses_fisher else None
    alpha, beta = _weights(name)
    penalty = make_penalty(name, inherited, head, alpha=alpha, beta=beta, fisher=fisher)
    w0 = {n: p.detach().clone() for n, p in inherited.items()}
    _perturb(model)
    return model, penalty, inherited, head, w0, fisher


# -- brute-force Ω from SPEC §2, written independently of the library -------------------------------


def _abs(x: torch.Tensor, eps: float) -> torch.Tensor:
    # |x|, or its smoothed form √(x² + ε²) (SPEC §2) when the penalty declares an ``eps``.
    return torch.sqrt(x * x + eps * eps) if eps else x.abs()


def _group_terms(d2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared norms per group and group sizes: one group per output channel (dim 0) of a
    ≥2-D tensor, one group per element of a 1-D tensor."""
    if d2.ndim >= 2:
        return d2.reshape(d2.shape[0], -1).sum(dim=1), torch.full((d2.shape[0],), float(d2[0].numel()))
    return d2.reshape(-1), torch.ones(d2.numel())


def _group_lasso(w, w0, fisher, eps):
    total = 0.0
    for n in w:
        d2 = (w[n] - w0[n]) ** 2
        if fisher is not None:
            d2 = fisher[n] * d2
        sq, size = _group_terms(d2)
        norms = torch.sqrt(sq + eps * eps) if eps else torch.sqrt(sq)
        total = total + (size.to(sq).sqrt() * norms).sum()
    return total


REFERENCE_R = {
    # R(w_S) such that Ω = α R(w_S) + β/2 ‖w_S̄‖² (``none``: Ω = 0 whatever α, β).
    "l2": lambda w, w0, F, eps: sum(0.5 * (w[n] ** 2).sum() for n in w),
    "l2_sp": lambda w, w0, F, eps: sum(0.5 * ((w[n] - w0[n]) ** 2).sum() for n in w),
    "l2_sp_fisher": lambda w, w0, F, eps: sum(0.5 * (F[n] * (w[n] - w0[n]) ** 2).sum() for n in w),
    "l1_sp": lambda w, w0, F, eps: sum(_abs(w[n] - w0[n], eps).sum() for n in w),
    "gl_sp": lambda w, w0, F, eps: _group_lasso(w, w0, None, eps),
    "gl_sp_fisher": lambda w, w0, F, eps: _group_lasso(w, w0, F, eps),
}


def _reference_value(name, alpha, beta, inherited, head, w0, fisher, eps=0.0) -> float:
    if name == "none":
        return 0.0
    assert name in REFERENCE_R, f"penalty {name!r} has no brute-force formula in this test: add one from SPEC §2"
    w = {n: p.detach() for n, p in inherited.items()}
    r = REFERENCE_R[name](w, w0, fisher, eps) if w else 0.0
    h = sum(float((p.detach() ** 2).sum()) for p in head.values())
    return alpha * float(r) + 0.5 * beta * h


def _autograd_grads(penalty, params: list[torch.Tensor]) -> list[torch.Tensor]:
    value = penalty.value()
    if not value.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


# -- value ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["all", "weights"])
@pytest.mark.parametrize("name", NAMES)
def test_value_matches_spec_formula(name, scope):
    """value() equals SPEC §2's Ω: α on the inherited tensors, β/2‖·‖² on the head, summed."""
    model, penalty, inherited, head, w0, fisher = _setup(name, scope)
    expected = _reference_value(name, *_weights(name), inherited, head, w0, fisher, getattr(penalty, "eps", 0.0))
    value = penalty.value()
    assert value.ndim == 0
    assert float(value.detach()) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    if name != "none":
        assert expected > 0 and value.requires_grad


@pytest.mark.parametrize("name", [n for n in NAMES if n != "none"])
def test_value_weights_alpha_and_beta_separately(name):
    """α scales only the inherited part and β only the head: Ω(α, β) = Ω(α, 0) + Ω(0, β)."""
    model = _model()
    inherited, head = split_parameters(model)
    fisher = _random_fisher(inherited) if PENALTIES[name].uses_fisher else None
    pens = {
        ab: make_penalty(name, inherited, head, alpha=ab[0], beta=ab[1], fisher=fisher)
        for ab in [(ALPHA, BETA), (ALPHA, 0.0), (0.0, BETA)]
    }
    _perturb(model)
    both, a_only, b_only = (float(pens[ab].value().detach()) for ab in [(ALPHA, BETA), (ALPHA, 0.0), (0.0, BETA)])
    assert b_only == pytest.approx(0.5 * BETA * sum(float((p.detach() ** 2).sum()) for p in head.values()), rel=1e-12)
    assert a_only > 0
    assert both == pytest.approx(a_only + b_only, rel=1e-12)


# -- gradient ------------------------------------------------------------------------------------


@pytest.mark.parametrize("start", ["none", "nonzero"])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("scope", ["all", "weights"])
@pytest.mark.parametrize("name", NAMES)
def test_add_grad_adds_autograd_gradient(name, scope, foreach, start):
    """add_grad_ adds exactly ∂Ω/∂w (autograd of value()) to each .grad, for both code paths,
    starting from .grad None or a known nonzero .grad; unpenalised tensors are untouched."""
    model, penalty, *_ = _setup(name, scope)
    names, params = zip(*model.named_parameters())
    expected = _autograd_grads(penalty, list(params))
    gen = torch.Generator().manual_seed(3)
    initial = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    for p, g0 in zip(params, initial):
        p.grad = g0.clone() if start == "nonzero" else None
    penalty.add_grad_(foreach=foreach)
    for n, p, g0, g in zip(names, params, initial, expected):
        want = g + g0 if start == "nonzero" else g
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_add_grad_default_path_matches_loop(name):
    """add_grad_() with the default path gives the same .grad as the reference loop."""
    model, penalty, *_ = _setup(name)
    params = list(model.parameters())
    penalty.add_grad_(foreach=False)
    loop = [None if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    penalty.add_grad_()
    for p, g in zip(params, loop):
        if g is None:
            assert p.grad is None or not p.grad.any()
        else:
            torch.testing.assert_close(p.grad, g, rtol=1e-13, atol=1e-15)


GROUP_NAMES = [n for n in NAMES if n.startswith("gl_sp")]


def _group_fast_path(path: str):
    from spbench.penalties import _group_grad_flat_, _group_grad_per_tensor_

    return {"per_tensor": _group_grad_per_tensor_, "flat": _group_grad_flat_}[path]


@pytest.mark.parametrize("path", ["per_tensor", "per_tensor_small_blocks", "flat"])
@pytest.mark.parametrize("scope", ["all", "weights"])
@pytest.mark.parametrize("name", GROUP_NAMES)
def test_group_fast_paths_match_loop_and_autograd(name, scope, path, monkeypatch):
    """The smoothed group penalties' two fast paths — tensor by tensor, in blocks of rows,
    through a reused workspace (the CPU path of add_grad_; also with blocks of a few rows),
    and all tensors at once as blocks of equal group size in one flat vector (the accelerator
    path, run here on the CPU) — add the same gradient as the per-tensor reference loop and as
    autograd of value(), in float64."""
    if path == "per_tensor_small_blocks":
        monkeypatch.setattr("spbench.penalties._BLOCK_BYTES", 1000)  # a few rows per block
        path = "per_tensor"
    model, penalty, inherited, head, w0, fisher = _setup(name, scope)
    params = list(inherited.values())
    expected = _autograd_grads(penalty, params)
    gen = torch.Generator().manual_seed(3)
    initial = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    for p, g0 in zip(params, initial):
        p.grad = g0.clone()
    penalty.add_grad_(foreach=False)
    loop = [p.grad.clone() for p in params]
    for p, g0 in zip(params, initial):
        p.grad = g0.clone()
    fishers = [penalty.fisher[n] for n in inherited] if penalty.uses_fisher else None
    with torch.no_grad():
        _group_fast_path(path)([p.grad for p in params], params, [penalty.w0[n] for n in inherited], fishers,
                               penalty.alpha, penalty.eps)
    assert any(p.ndim == 1 for p in params) == (scope == "all") and any(p.ndim == 4 for p in params)
    for n, p, g0, lg, ag in zip(inherited, params, initial, loop, expected):
        torch.testing.assert_close(p.grad, lg, rtol=1e-12, atol=1e-15, msg=lambda m: f"{n}: {m}")
        torch.testing.assert_close(p.grad, g0 + ag, rtol=1e-12, atol=1e-14, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", [n for n in NAMES if n != "none"])
def test_fast_path_on_channels_last_weights(name):
    """Convolution weights in channels_last memory format (not contiguous as rows): the fast
    path still adds the reference loop's gradient to their (channels_last) .grad."""
    model, penalty, *_ = _setup(name)
    model.to(memory_format=torch.channels_last)
    params = list(model.parameters())
    assert any(p.ndim == 4 and not p.is_contiguous() for p in params)
    assert all(p.is_contiguous() for p in penalty.buffers())  # w0, F as built: other strides
    grads = {}
    for foreach in (False, True):
        for p in params:
            p.grad = torch.ones_like(p)  # the same memory format as p, as autograd's would be
        penalty.add_grad_(foreach=foreach)
        grads[foreach] = [p.grad.clone() for p in params]
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_add_grad_leaves_frozen_parameters_alone(name, foreach):
    """Parameters frozen by apply_freeze are outside S: add_grad_ gives them no gradient."""
    model, penalty, *_ = _setup(name, freeze=2)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen
    penalty.add_grad_(foreach=foreach)
    assert all(p.grad is None for p in frozen)


# -- trajectory ----------------------------------------------------------------------------------


def _sgd_run(model, penalty, mode: str, steps: int = 20) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=gen)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if mode == "explicit":
            (loss + penalty.value()).backward()
        elif mode == "loop":
            loss.backward()
            penalty.add_grad_(foreach=False)
        elif mode == "foreach":
            loss.backward()
            penalty.add_grad_(foreach=True)
        elif mode == "default":
            loss.backward()
            penalty.add_grad_()
        else:
            loss.backward()  # no penalty at all
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _twin(name: str, scope: str = "all"):
    """The same model and penalty state, built independently (w0 = same initial weights)."""
    model = _model()
    inherited, head = split_parameters(model, scope)
    fisher = _random_fisher(inherited) if PENALTIES[name].uses_fisher else None
    alpha, beta = _weights(name)
    penalty = make_penalty(name, inherited, head, alpha=alpha, beta=beta, fisher=fisher)
    _perturb(model)
    return model, penalty


@pytest.mark.parametrize("mode", ["loop", "foreach"])
@pytest.mark.parametrize("name", NAMES)
def test_trajectory_matches_explicit_objective(name, mode):
    """20 SGD-momentum steps with backward + add_grad_ follow the trajectory of
    (loss + value()).backward() (SPEC §2: in-place gradient ≡ explicit penalty)."""
    explicit = _sgd_run(*_twin(name), "explicit")
    in_place = _sgd_run(*_twin(name), mode)
    # The smoothed non-smooth penalties have curvature ~1/ε near w0: rounding differences
    # between two correct formulas grow by that factor over the steps, hence a looser bound.
    rtol, atol = (1e-7, 1e-9) if getattr(_twin(name)[1], "eps", 0.0) else (1e-9, 1e-11)
    for a, b in zip(in_place, explicit):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    if name != "none":
        plain = _sgd_run(*_twin(name), "plain")
        moved = max(float((a - b).abs().max()) for a, b in zip(explicit, plain))
        assert moved > 1e-4, "the penalty should change the trajectory (test would be vacuous)"


@pytest.mark.parametrize("name", NAMES)
def test_method_steps_the_penalty_unchanged(name):
    """The penalty as a method of spbench.methods (what train_steps takes): the training
    loop's step (training_step) follows the penalty's own SGD trajectory exactly, and the
    method's state is the penalty's reference state (w0, F), nothing more."""
    from spbench.methods import MethodContext, make_method
    from spbench.train import training_step

    expected = _sgd_run(*_twin(name), "default")
    model = _model()
    inherited, head = split_parameters(model)
    fisher = _random_fisher(inherited) if PENALTIES[name].uses_fisher else None
    hparams = {} if name == "none" else dict(zip(("alpha", "beta"), _weights(name)))
    method = make_method(name, MethodContext(model, inherited, head, fisher=fisher), **hparams)
    _perturb(model)
    assert type(method.penalty) is PENALTIES[name]
    assert (method.penalty.alpha, method.penalty.beta) == _weights(name)
    assert method.needs.fisher == PENALTIES[name].uses_fisher and method.extra_parameters() == []
    assert method.state_dict().keys() == {f"penalty.{k}" for k in method.penalty.state_dict()}
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=gen)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    model.train()
    for _ in range(20):
        training_step(model, method, x, y, opt, lr=0.05)
    for a, b in zip(model.parameters(), expected):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)


# -- registered reference state ------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_reference_state_is_registered(name):
    """w0 (and F) live in the penalty's state_dict as copies of their values at construction;
    model parameters are not registered a second time."""
    model = _model()
    inherited, head = split_parameters(model)
    cls = PENALTIES[name]
    fisher = _random_fisher(inherited) if cls.uses_fisher else None
    alpha, beta = _weights(name)
    penalty = make_penalty(name, inherited, head, alpha=alpha, beta=beta, fisher=fisher)
    at_build = {n: p.detach().clone() for n, p in inherited.items()}
    state = penalty.state_dict()
    param_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not any(t.data_ptr() in param_ptrs for t in state.values()), "model parameters registered twice"
    expected_count = len(inherited) * (int(cls.uses_reference) + int(cls.uses_fisher))
    assert len([t for t in state.values() if torch.is_tensor(t) and t.is_floating_point()]) == expected_count
    state_ptrs = {t.data_ptr() for t in state.values()}
    _perturb(model)
    for n, p in inherited.items():
        if cls.uses_reference:
            assert penalty.w0[n].data_ptr() in state_ptrs
            assert torch.equal(penalty.w0[n], at_build[n]), f"w0 of {n} is not the construction value"
            assert not torch.equal(penalty.w0[n], p.detach()), f"w0 of {n} follows the parameter"
        if cls.uses_fisher:
            assert penalty.fisher[n].data_ptr() in state_ptrs
            assert torch.equal(penalty.fisher[n], fisher[n])


@pytest.mark.parametrize("name", [n for n in NAMES if PENALTIES[n].uses_reference])
def test_reference_state_follows_to_and_load_state_dict(name):
    """penalty.to(float32) converts w0/F; load_state_dict restores them into a fresh penalty."""
    model, penalty, inherited, head, w0, fisher = _setup(name)
    # A checkpoint round trip: a penalty built on other weights takes over the saved reference.
    other = _model(seed=5)
    o_inh, o_head = split_parameters(other)
    o_fisher = _random_fisher(o_inh, seed=6) if PENALTIES[name].uses_fisher else None
    restored = make_penalty(name, o_inh, o_head, alpha=ALPHA, beta=BETA, fisher=o_fisher)
    restored.load_state_dict(penalty.state_dict())
    for n in inherited:
        assert torch.equal(restored.w0[n], w0[n])
        if fisher is not None:
            assert torch.equal(restored.fisher[n], fisher[n])
    penalty.to(torch.float32)
    for key, t in penalty.state_dict().items():
        assert t.dtype == torch.float32, key
    for n in inherited:
        assert penalty.w0[n].dtype == torch.float32
        torch.testing.assert_close(penalty.w0[n], w0[n].float())


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in NAMES if n != "none"])
@pytest.mark.parametrize("bad", [{"alpha": -0.1}, {"beta": -1.0}, {"alpha": math.nan}])
def test_negative_or_nan_weight_raises(name, bad):
    """α and β must be non-negative numbers."""
    inherited, head = split_parameters(_model())
    fisher = _random_fisher(inherited) if PENALTIES[name].uses_fisher else None
    kwargs = {"alpha": ALPHA, "beta": BETA, **bad}
    with pytest.raises(ValueError):
        make_penalty(name, inherited, head, fisher=fisher, **kwargs)


@pytest.mark.parametrize("kwargs", [{"alpha": 0.1, "beta": 0.0}, {"alpha": 0.0, "beta": 0.1}])
def test_none_rejects_weights(kwargs):
    """The 'none' penalty takes α = β = 0 only."""
    inherited, head = split_parameters(_model())
    with pytest.raises(ValueError):
        make_penalty("none", inherited, head, **kwargs)


@pytest.mark.parametrize("name", [n for n in NAMES if PENALTIES[n].uses_fisher])
def test_fisher_penalty_validates_fisher(name):
    """A Fisher penalty needs a Fisher diagonal covering S, with each tensor's shape."""
    inherited, head = split_parameters(_model())
    with pytest.raises(ValueError):
        make_penalty(name, inherited, head, alpha=ALPHA, beta=BETA)
    fisher = _random_fisher(inherited)
    first = next(iter(inherited))
    wrong_shape = {**fisher, first: torch.rand(fisher[first].numel() + 1, dtype=torch.float64)}
    with pytest.raises(ValueError, match="shape"):
        make_penalty(name, inherited, head, alpha=ALPHA, beta=BETA, fisher=wrong_shape)
    missing = {n: f for n, f in fisher.items() if n != first}
    with pytest.raises(ValueError):
        make_penalty(name, inherited, head, alpha=ALPHA, beta=BETA, fisher=missing)


def test_unknown_penalty_names_known_ones():
    """make_penalty on an unknown name raises ValueError listing the registry."""
    inherited, head = split_parameters(_model())
    with pytest.raises(ValueError) as err:
        make_penalty("nope", inherited, head, alpha=ALPHA, beta=BETA)
    assert "nope" in str(err.value)
    assert all(n in str(err.value) for n in PENALTIES)


# -- which tensors are penalised ----------------------------------------------------------------


def test_split_parameters_scopes():
    """'all' puts every backbone tensor in S, 'weights' only those of ≥2 dimensions; the head
    is S̄ in both."""
    model = _model()
    backbone = {n: p for n, p in model.named_parameters() if n.startswith("backbone.")}
    inh_all, head_all = split_parameters(model, "all")
    inh_w, head_w = split_parameters(model, "weights")
    assert set(inh_all) == set(backbone)
    assert set(inh_w) == {n for n, p in backbone.items() if p.ndim >= 2}
    assert any(p.ndim == 1 for p in inh_all.values()) and all(p.ndim >= 2 for p in inh_w.values())
    assert set(head_all) == set(head_w) == {"head.weight", "head.bias"}
    assert all(inh_all[n] is p for n, p in backbone.items())
    with pytest.raises(ValueError):
        split_parameters(model, "convs")


@pytest.mark.parametrize("scope", ["all", "weights"])
def test_split_parameters_excludes_frozen(scope):
    """Parameters frozen by apply_freeze are in neither S nor S̄."""
    model = _model()
    frozen = set(apply_freeze(model, 2))
    inherited, head = split_parameters(model, scope)
    assert frozen and not frozen & (set(inherited) | set(head))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.")}
    if scope == "all":
        assert set(inherited) == trainable
    else:
        assert set(inherited) == {n for n in trainable if dict(model.named_parameters())[n].ndim >= 2}
