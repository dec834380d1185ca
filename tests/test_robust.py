"""SPD, FTP, LP-FT and WiSE-FT against brute force written from their papers' formulas
(float64, plain numpy per tensor and per row), the composition of methods, and WiSE-FT's
post-hoc values: one training scored at every listed a."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from spbench.config import RunSpec, post_hoc_variants, selection_runs, training_candidates, validate_config
from spbench.methods import METHODS, MethodContext, SetupData, compose, make_method, method_class
from spbench.models import build_model, split_parameters
from test_protocol import prepare_tiny


def _context(classes=3, seed=0):
    torch.manual_seed(seed)
    src = build_model("demo_resnet", 5, 1).double().eval()
    model = build_model("demo_resnet", classes, 1).double()
    model.backbone.load_state_dict(src.backbone.state_dict())
    inherited, head = split_parameters(model)
    return model, MethodContext(model, inherited, head, source_model=src)


def _np(t):
    return t.detach().numpy().astype(np.float64).copy()


def _displace(params, scale, gen):
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


# --------------------------------------------------------------------------- SPD


def test_spd_step_matches_the_formula():
    """c = −gᵀ(w_prev − w0); if c < 0: r = clamp((‖w̃ − w0‖ − ‖w_prev − w0‖)/‖w̃ − w0‖, 0, 1),
    w = w̃ − λ r (w̃ − w0); else w = w̃ — per tensor, for every branch."""
    model, ctx = _context()
    lam = 0.7
    method = make_method("spd", ctx, **{"lambda": lam})
    params = list(ctx.inherited.values())
    w0 = [_np(p) for p in params]
    gen = torch.Generator().manual_seed(1)
    _displace(params, 0.05, gen)  # w_prev ≠ w0
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    prev = [_np(p) for p in params]
    grads = [_np(p.grad) for p in params]
    method.add_grad_()
    # the optimizer's step: any direction (every other tensor: half-way back toward w0)
    steps = [0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype) if i % 2 else
             0.5 * (p.detach() - torch.from_numpy(a)) for i, (p, a) in enumerate(zip(params, w0))]
    with torch.no_grad():
        for p, s in zip(params, steps):
            p.sub_(s)
    method.prox_(0.1)
    branches = set()
    for p, a, b, g, s in zip(params, w0, prev, grads, steps):
        tilde = b - _np(s)
        c = -float(np.sum(g * (b - a)))
        before, after = np.linalg.norm(b - a), np.linalg.norm(tilde - a)
        expect = tilde
        if c < 0:
            r = min(max((after - before) / after, 0.0), 1.0)
            expect = tilde - lam * r * (tilde - a)
            branches.add("decayed" if r > 0 else "moved back")
        else:
            branches.add("consistent")
        np.testing.assert_allclose(_np(p), expect, rtol=0, atol=1e-13)
    assert branches == {"decayed", "moved back", "consistent"}


def test_spd_leaves_the_head_and_a_consistent_step_alone():
    model, ctx = _context()
    method = make_method("spd", ctx, **{"lambda": 1.0})
    params = list(ctx.inherited.values())
    gen = torch.Generator().manual_seed(2)
    _displace(params, 0.05, gen)
    with torch.no_grad():
        for p, w0 in zip(params, method.w0.values()):
            p.grad = -(p - w0)  # descent direction along the displacement: c > 0 everywhere
    method.add_grad_()
    head = [_np(p) for p in ctx.head.values()]
    before = [_np(p) for p in params]
    method.prox_(0.1)
    for p, b in zip(params, before):
        np.testing.assert_array_equal(_np(p), b)
    for p, h in zip(ctx.head.values(), head):
        np.testing.assert_array_equal(_np(p), h)


# --------------------------------------------------------------------------- FTP


def _row_norms(c):
    if c.ndim < 2:
        return np.full((1,) * c.ndim, np.abs(c).sum() + 1e-8)
    return np.array([np.abs(c[i]).sum() + 1e-8 for i in range(c.shape[0])]).reshape((-1,) + (1,) * (c.ndim - 1))


def test_ftp_three_steps_match_the_formula():
    """γ₁ = 10⁻⁸; then ∇γ = gᵀ(c_prev/n_prev) (× k when positive), Adam on γ (μ = 0.01),
    γ clipped to [10⁻⁸, max row norm], w = w0 + clamp(γ/n, 0, 1) c, per tensor."""
    model, ctx = _context()
    k = 0.6
    method = make_method("ftp", ctx, k=k)
    params = list(ctx.inherited.values())
    w0 = [_np(p) for p in params]
    n = len(params)
    gamma, m1, m2 = np.zeros(n), np.zeros(n), np.zeros(n)
    direction = [np.zeros_like(a) for a in w0]
    gen = torch.Generator().manual_seed(3)
    signs = set()
    for t in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        grads = [_np(p.grad) for p in params]
        method.add_grad_()
        steps = [0.02 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        with torch.no_grad():
            for p, s in zip(params, steps):
                p.sub_(s)
        tilde = [_np(p) for p in params]
        method.prox_(0.1)
        for i in range(n):
            c = tilde[i] - w0[i]
            norms = _row_norms(c)
            if t == 0:
                g_new = 1e-8
            else:
                grad = float(np.sum(grads[i] * direction[i]))
                signs.add(grad > 0)
                if grad > 0:
                    grad *= k
                m1[i] = 0.9 * m1[i] + 0.1 * grad
                m2[i] = 0.999 * m2[i] + 0.001 * grad**2
                g_new = gamma[i] - 0.01 * (m1[i] / (1 - 0.9**t)) / (np.sqrt(m2[i] / (1 - 0.999**t)) + 1e-8)
            gamma[i] = min(max(g_new, 1e-8), norms.max())
            expect = w0[i] + np.clip(gamma[i] / norms, 0, 1) * c
            np.testing.assert_allclose(_np(params[i]), expect, rtol=0, atol=1e-12)
            direction[i] = c / norms
        np.testing.assert_allclose(method.gamma.numpy(), gamma, rtol=1e-12, atol=0)
    assert signs == {True, False}  # both signs of the radius gradient were exercised
    assert int(method.steps_done) == 4


def test_ftp_counts_its_steps_from_a_loaded_state():
    """FTP counts its radius updates on the host (no device read per step) and recounts from
    the buffer when a state is loaded: a method that has run three steps, given the state
    and weights of step 1, takes the same next step (Adam's bias correction at t = 1) as a
    fresh method given them."""
    model, ctx = _context()
    params = list(ctx.inherited.values())

    def step(m, gen):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        m.add_grad_()
        with torch.no_grad():
            for p in params:
                p.sub_(0.02 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        m.prox_(0.1)

    def load(m, state, weights):
        m.load_state_dict(state)
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)

    gen = torch.Generator().manual_seed(5)
    ran = make_method("ftp", ctx)
    step(ran, gen)
    after_one = copy.deepcopy(ran.state_dict()), [p.detach().clone() for p in params]
    step(ran, gen), step(ran, gen)
    load(ran, *after_one)
    step(ran, torch.Generator().manual_seed(6))
    got = copy.deepcopy(ran.state_dict()), [p.detach().clone() for p in params]

    fresh = make_method("ftp", ctx)
    load(fresh, *after_one)
    step(fresh, torch.Generator().manual_seed(6))
    assert int(fresh.steps_done) == 2 and fresh.gamma.max() > 1e-8
    for name, value in fresh.state_dict().items():
        assert torch.equal(got[0][name], value), name
    for a, p in zip(got[1], params):
        assert torch.equal(a, p)


def test_ftp_state_is_checkpointed():
    model, ctx = _context()
    method = make_method("ftp", ctx)
    keys = set(method.state_dict())
    assert {"gamma", "moment1", "moment2", "steps_done"} <= keys
    assert any(k.startswith("direction.") for k in keys) and any(k.startswith("w0.") for k in keys)


# --------------------------------------------------------------------------- LP-FT


def _probe_objective(W, b, F, y, rho):
    z = F @ W.T + b
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean() + 0.5 * rho * np.sum(W**2)


def test_lp_ft_fits_the_head_to_the_probe_optimum():
    """After set-up the head minimises (1/N) Σ CE(y, h(g0(x))) + ρ/2 ‖W‖² on the frozen
    features: its value matches scipy's L-BFGS on the same objective, written independently."""
    from scipy.optimize import minimize

    model, ctx = _context(classes=3)
    rho = 1e-2
    method = make_method("lp_ft", ctx, probe_decay=rho)
    backbone = copy.deepcopy(model.backbone.state_dict())
    gen = torch.Generator().manual_seed(4)
    y = torch.arange(30) % 3
    x = torch.randn(30, 1, 12, 12, generator=gen, dtype=torch.float64) + y.double().view(-1, 1, 1, 1)  # separable
    model.train()
    method.setup(SetupData(x, y, batch_size=8, device=torch.device("cpu")))
    assert model.training  # modes restored
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone[k]), k  # the backbone (and its batch-norm statistics) untouched
    model.eval()
    with torch.no_grad():
        F = model.backbone(x).numpy()
    W, b = _np(model.head.weight), _np(model.head.bias)
    got = _probe_objective(W, b, F, y.numpy(), rho)
    d, kc = F.shape[1], 3
    ref = minimize(lambda v: _probe_objective(v[: kc * d].reshape(kc, d), v[kc * d:], F, y.numpy(), rho),
                   np.zeros(kc * d + kc), method="L-BFGS-B", options={"maxiter": 2000, "gtol": 1e-10})
    assert got == pytest.approx(ref.fun, abs=1e-7)
    assert got < _probe_objective(np.zeros_like(W), np.zeros_like(b), F, y.numpy(), rho) - 0.05


def test_lp_ft_composes_with_a_penalty():
    """lp_ft+l2_sp: the probe at set-up, then L2-SP's gradient term, unchanged."""
    model, ctx = _context()
    both = make_method("lp_ft+l2_sp", ctx, alpha=0.3, beta=0.02, probe_decay=1e-3)
    assert both.name == "lp_ft+l2_sp" and both.needs.setup and both.settings == {
        "probe_decay": 1e-3, "alpha": 0.3, "beta": 0.02}
    alone = make_method("l2_sp", ctx, alpha=0.3, beta=0.02)
    gen = torch.Generator().manual_seed(5)
    _displace(list(ctx.inherited.values()), 0.05, gen)
    params = list(ctx.inherited.values()) + list(ctx.head.values())
    for p in params:
        p.grad = torch.zeros_like(p)
    both.add_grad_()
    first = [p.grad.clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    alone.add_grad_()
    for a, p in zip(first, params):
        torch.testing.assert_close(a, p.grad, rtol=0, atol=0)

    # set-up: the composition's probe fits the head that lp_ft alone fits on the same data
    gen = torch.Generator().manual_seed(4)
    y = torch.arange(30) % 3
    x = torch.randn(30, 1, 12, 12, generator=gen, dtype=torch.float64) + y.double().view(-1, 1, 1, 1)
    heads = []
    for name, extra in (("lp_ft+l2_sp", dict(alpha=0.3, beta=0.02)), ("lp_ft", {})):
        model, ctx = _context()
        before = copy.deepcopy(model.head.state_dict())
        make_method(name, ctx, probe_decay=1e-3, **extra).setup(SetupData(x, y, batch_size=8, device=torch.device("cpu")))
        assert any(not torch.equal(v, before[k]) for k, v in model.head.state_dict().items()), name
        heads.append(model.head.state_dict())
    for k in heads[0]:
        torch.testing.assert_close(heads[0][k], heads[1][k], rtol=0, atol=1e-10)


def test_composition_refuses_what_it_cannot_combine():
    with pytest.raises(ValueError, match="both have the hyper-parameter 'alpha'"):
        compose("l2_sp", "delta")
    with pytest.raises(ValueError, match="teacher"):
        compose("lwf", "delta")
    with pytest.raises(ValueError, match="unknown method"):
        method_class("lp_ft+nope")
    with pytest.raises(ValueError, match="twice"):
        method_class("l2_sp+l2_sp")
    assert method_class("lp_ft+l2_sp") is method_class("lp_ft+l2_sp")
    assert "lp_ft+l2_sp" not in METHODS  # compositions are not registry entries
    RunSpec("s", "t", "lp_ft+l2_sp", {"lr": 0.1}, 0, 0)  # a run path may name one
    assert RunSpec.from_key("main/s/t/lp_ft+l2_sp/lr=0.1/freeze0/test/rep0").method == "lp_ft+l2_sp"


# --------------------------------------------------------------------------- WiSE-FT


@pytest.mark.parametrize("a", [0.0, 0.3, 1.0])
def test_wise_ft_interpolates_the_backbone_state(a):
    """w(a) = (1 − a) w0 + a w_ft for every floating tensor of the backbone's state (batch-norm
    statistics included); the head stays fine-tuned; integer counters untouched."""
    model, ctx = _context()
    method = make_method("wise_ft", ctx, mix=a)
    start = {k: _np(v) for k, v in model.backbone.state_dict().items()}
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                v.add_(0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype))
            else:
                v.add_(3)
    tuned = {k: _np(v) for k, v in model.state_dict().items()}
    method.finalize_()
    for k, v in model.state_dict().items():
        if k.startswith("backbone.") and v.is_floating_point():
            np.testing.assert_allclose(_np(v), (1 - a) * start[k[9:]] + a * tuned[k], rtol=0, atol=1e-14)
        else:
            np.testing.assert_array_equal(_np(v), tuned[k])  # head and counters


def test_wise_ft_validation_runs_train_once_per_setting():
    """A's values are post hoc: the grid's candidates differ only in a, so selection trains one
    setting per lr and each validation run scores every a."""
    raw = _tiny_raw()
    raw["grid"]["methods"]["wise_ft"] = {"mix": [0.0, 0.5, 1.0]}
    raw["selection"]["lr"] = [0.01, 0.05]
    config = validate_config(raw)
    assert training_candidates(config, "wise_ft") == [{"lr": 0.01}, {"lr": 0.05}]
    runs = [s for s in selection_runs(config) if s.method == "wise_ft"]
    assert [dict(s.setting) for s in runs] == [{"lr": 0.01}, {"lr": 0.05}]
    assert post_hoc_variants(config, runs[0]) == [{"mix": m, "lr": 0.01} for m in (0.0, 0.5, 1.0)]
    test_run = RunSpec("digits-src", "digits-mod3-k5", "wise_ft", {"mix": 0.5, "lr": 0.01}, 0, 0)
    assert post_hoc_variants(config, test_run) == []


def _tiny_raw():
    import yaml

    repo = Path(__file__).resolve().parents[1]
    return yaml.safe_load((repo / "config" / "tiny.yaml").read_text())


def test_wise_ft_scores_each_value_from_one_training(tmp_path, monkeypatch):
    """finetune_run on a validation fold: one training, a record whose variants equal the runs
    trained for each a alone (same seed, same data), and a run table with one row per a."""
    from spbench import pipeline
    from spbench.results import records_to_frame

    raw = _tiny_raw()
    raw["finetune"].update(steps=6, batch_size=8)
    raw["grid"]["methods"]["wise_ft"] = {"mix": [0.0, 0.5, 1.0]}
    config = validate_config(raw)
    src = prepare_tiny(config, tmp_path)
    calls = []
    real = pipeline.train_steps
    monkeypatch.setattr(pipeline, "train_steps", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    inputs = dict(source_model=src / "model.pt", source_info=src / "info.json",
                  target_dir=tmp_path / "data" / "digits-mod3-k5", source_dir=tmp_path / "data" / "digits-src")

    def run(setting, name):
        spec = RunSpec("digits-src", "digits-mod3-k5", "wise_ft", setting, 0, 0, evaluation="val0", experiment="select")
        return pipeline.finetune_run(config, spec, record_out=tmp_path / f"{name}.json", **inputs)[0]

    shared = run({"lr": 0.01}, "shared")
    assert len(calls) == 1 and [v["setting"] for v in shared["variants"]] == [
        "lr=0.01_mix=0.0", "lr=0.01_mix=0.5", "lr=0.01_mix=1.0"]
    for v in shared["variants"]:
        alone = run({"lr": 0.01, "mix": float(v["setting"].rsplit("=", 1)[1])}, v["setting"])
        assert alone["variants"] == []
        assert (v["test_accuracy"], v["source_accuracy"]) == (alone["test_accuracy"], alone["source_accuracy"])
    assert len(calls) == 4
    frame = records_to_frame([shared])
    assert list(frame["setting"]) == ["lr=0.01_mix=0.0", "lr=0.01_mix=0.5", "lr=0.01_mix=1.0"]
    assert frame["run_key"].str.endswith("/freeze0/val0/rep0").all() and frame["run_key"].is_unique
    # a = 0 is the starting backbone: the source task is scored as the pretrained network scores it
    assert frame["source_accuracy_drop"].iloc[0] == pytest.approx(0.0, abs=1e-12)


def test_a_new_post_hoc_value_changes_the_validation_runs_config():
    """The resolved config of a validation run names the values it scores, so listing another
    a reruns it (a stale record would miss that value); a test run's config holds its own a."""
    from spbench.pipeline import run_config

    raw = _tiny_raw()
    raw["grid"]["methods"]["wise_ft"] = {"mix": [0.5, 1.0]}
    before = validate_config(raw)
    raw["grid"]["methods"]["wise_ft"] = {"mix": [0.25, 0.5, 1.0]}
    after = validate_config(raw)
    val = RunSpec("digits-src", "digits-mod3-k5", "wise_ft", {"lr": 0.01}, 0, 0, evaluation="val0", experiment="select")
    assert run_config(before, val)["run"]["post_hoc_settings"] == ["lr=0.01_mix=0.5", "lr=0.01_mix=1.0"]
    assert run_config(before, val) != run_config(after, val)
    test = RunSpec("digits-src", "digits-mod3-k5", "wise_ft", {"lr": 0.01, "mix": 0.5}, 0, 0)
    assert run_config(before, test) == run_config(after, test) and "post_hoc_settings" not in run_config(before, test)["run"]
