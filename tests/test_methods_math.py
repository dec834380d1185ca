"""LwF, Co-Tuning, BSS and DELTA against brute force written from their papers' formulas
(float64, plain Python loops over images, classes, channels and pixels), and their
gradients against the closed-form derivative of that formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from spbench.methods import Forward, MethodContext, SetupData, make_method
from spbench.methods import features as features_module
from spbench.models import build_model, split_parameters


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _setup(arch="demo_resnet", source_classes=7, classes=3):
    torch.manual_seed(0)
    src = build_model(arch, source_classes, 1).double().eval()
    model = build_model(arch, classes, 1).double()
    model.backbone.load_state_dict(src.backbone.state_dict())
    inherited, head = split_parameters(model)
    return src, model, MethodContext(model, inherited, head, source_model=src)


def _forward(model, method, x, y):
    from spbench.methods import record_outputs

    with record_outputs(model, method.taps) as taps:
        features = model.backbone(x)
        logits = model.head(features)
    out = Forward(x, y, features, logits, taps=dict(taps))
    if method.needs.teacher:
        out.teacher_logits, out.teacher_taps = method.teacher_forward(x)
    return out


# --------------------------------------------------------------------------- LwF


def test_lwf_loss_and_gradient_match_the_formula():
    """λ · (1/B) Σ_i −Σ_k softmax(f0(x_i)/T)_k log softmax(h_s(g(x_i))/T)_k; its gradient in
    the logits z of h_s is λ/(B T) (softmax(z/T) − softmax(f0/T))."""
    src, model, ctx = _setup()
    lam, t = 0.7, 2.5
    method = make_method("lwf", ctx, **{"lambda": lam, "temperature": t}).double()
    with torch.no_grad():
        method.source_head.weight.add_(0.1 * torch.randn_like(method.source_head.weight))
    x = torch.randn(5, 1, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    out = _forward(model, method, x, y)
    loss = method.loss(out)

    with torch.no_grad():
        f0 = src(x).tolist()
        g = out.features.detach()
        z = method.source_head(g).tolist()
    b = len(f0)
    brute = 0.0
    for i in range(b):
        p = _softmax([v / t for v in f0[i]])
        q = _softmax([v / t for v in z[i]])
        brute += -sum(pk * math.log(qk) for pk, qk in zip(p, q))
    brute *= lam / b
    assert loss.item() == pytest.approx(brute, rel=1e-12)

    # gradient in h_s's weight: Σ_i λ/(B T) (q_i − p_i) g_iᵀ
    grad_w = np.zeros(tuple(method.source_head.weight.shape))
    for i in range(b):
        p = np.array(_softmax([v / t for v in f0[i]]))
        q = np.array(_softmax([v / t for v in z[i]]))
        grad_w += lam / (b * t) * np.outer(q - p, g[i].numpy())
    (auto,) = torch.autograd.grad(loss, method.source_head.weight)
    np.testing.assert_allclose(auto.numpy(), grad_w, rtol=1e-10, atol=1e-14)
    assert method.retention_head() is method.source_head


# --------------------------------------------------------------------------- Co-Tuning


def test_co_tuning_relationship_loss_and_gradient_match_the_formula():
    """p(y_s | y_t = c) = mean of softmax(f0(x)) over the training images of class c; the
    loss λ · (1/B) Σ_i −Σ_s p(s | y_i) log softmax(h_s(g(x_i)))_s."""
    src, model, ctx = _setup()
    lam = 2.3
    method = make_method("co_tuning", ctx, **{"lambda": lam}).double()
    xs = torch.randn(9, 1, 16, 16, dtype=torch.float64)
    ys = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1])
    method.setup(SetupData(xs, ys, batch_size=4, device=torch.device("cpu")))
    with torch.no_grad():
        probs = [_softmax(r) for r in src(xs).tolist()]
    for c in range(3):
        rows = [probs[i] for i in range(len(ys)) if int(ys[i]) == c]
        expect = [sum(r[s] for r in rows) / len(rows) for s in range(7)]
        np.testing.assert_allclose(method.relationship[c].numpy(), expect, rtol=1e-12)

    x, y = xs[:4], ys[:4]
    out = _forward(model, method, x, y)
    loss = method.loss(out)
    g = out.features.detach()
    with torch.no_grad():
        z = method.source_head(g).tolist()
    rel = method.relationship.tolist()
    brute, grad_w = 0.0, np.zeros(tuple(method.source_head.weight.shape))
    for i in range(4):
        q = _softmax(z[i])
        r = rel[int(y[i])]
        brute += -sum(rs * math.log(qs) for rs, qs in zip(r, q))
        grad_w += lam / 4 * np.outer(np.array(q) - np.array(r), g[i].numpy())  # Σ_s r_s = 1
    assert loss.item() == pytest.approx(lam * brute / 4, rel=1e-12)
    (auto,) = torch.autograd.grad(loss, method.source_head.weight)
    np.testing.assert_allclose(auto.numpy(), grad_w, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------- BSS


@pytest.mark.parametrize("b,d,k", [(6, 4, 1), (6, 4, 2), (3, 5, 1)])
def test_bss_matches_the_eigenvalues_of_the_gram_matrix(b, d, k):
    """η Σ_{i≤k} σ²_{−i}: the k smallest eigenvalues of FᵀF (or FFᵀ when B < D); the gradient
    of σ_i² in F is 2 F v_i v_iᵀ (v_i the eigenvector of FᵀF; 2 u_i u_iᵀ F for FFᵀ)."""
    src, model, ctx = _setup()
    eta = 0.37
    method = make_method("bss", ctx, eta=eta, k=k)
    gen = torch.Generator().manual_seed(b * 10 + d)
    f = torch.randn(b, d, dtype=torch.float64, generator=gen, requires_grad=True)
    out = Forward(None, None, f, None)
    loss = method.loss(out)
    fn = f.detach().numpy()
    gram = fn.T @ fn if b >= d else fn @ fn.T
    w, v = np.linalg.eigh(gram)  # ascending
    assert loss.item() == pytest.approx(eta * w[:k].sum(), rel=1e-10)
    expect = np.zeros_like(fn)
    for i in range(k):
        vi = v[:, i : i + 1]
        expect += 2 * eta * (fn @ vi @ vi.T if b >= d else vi @ vi.T @ fn)
    (auto,) = torch.autograd.grad(loss, f)
    np.testing.assert_allclose(auto.numpy(), expect, rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------- DELTA


def test_delta_loss_and_gradient_match_the_formula():
    """α Σ_i Σ_j ½ Σ_c C_j W_jc ‖FM_jc(w, x_i) − FM_jc(w0, x_i)‖² / (H_j W_j); its gradient
    in FM_jc(w, x_i) is α C_j W_jc (FM_jc(w) − FM_jc(w0)) / (H_j W_j)."""
    src, model, ctx = _setup()
    alpha = 0.05
    method = make_method("delta", ctx, alpha=alpha, beta=0.0).double()
    gen = torch.Generator().manual_seed(4)
    for w in method.attention():
        w.copy_(torch.softmax(torch.randn(len(w), generator=gen, dtype=torch.float64), 0))
    with torch.no_grad():  # move the student away from w0
        for p in model.backbone.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    out = _forward(model, method, x, torch.tensor([0, 1, 2]))
    # the taps as leaves: the gradient of the term in each feature map alone (in the network,
    # an early map also reaches the later ones)
    out.taps = {n: t.detach().requires_grad_(True) for n, t in out.taps.items()}
    loss = method.loss(out)
    brute = 0.0
    for name, w in zip(method.taps, method.attention()):
        a = out.taps[name].detach().numpy()
        t = out.teacher_taps[name].numpy()
        bsz, c, h, wd = a.shape
        for i in range(bsz):
            for ch in range(c):
                sq = sum((a[i, ch, r, s] - t[i, ch, r, s]) ** 2 for r in range(h) for s in range(wd))
                brute += 0.5 * c * float(w[ch]) * sq / (h * wd)
    assert loss.item() == pytest.approx(alpha * brute, rel=1e-12)
    loss.backward()
    for name, w in zip(method.taps, method.attention()):
        a, t = out.taps[name].detach(), out.teacher_taps[name]
        _, c, h, wd = a.shape
        expect = alpha * c * w.view(1, -1, 1, 1) * (a - t) / (h * wd)
        torch.testing.assert_close(out.taps[name].grad, expect, rtol=1e-10, atol=1e-14)


def test_delta_attention_is_the_softmax_of_standardised_loss_increases(monkeypatch):
    """Brute force of DELTA's attention with a fixed probe: zero convolution j's output filter
    c through its weights (an independent route to the same network), measure the probe's
    cross-entropy increase, standardise over the layer's channels, softmax at temperature 5."""
    src, model, ctx = _setup()
    gen = torch.Generator().manual_seed(8)
    probe = nn.Linear(src.backbone.out_features, 3).double()
    with torch.no_grad():
        probe.weight.copy_(torch.randn(probe.weight.shape, generator=gen, dtype=torch.float64))
    monkeypatch.setattr(features_module, "_fit_probe", lambda f, y, k: probe)
    x = torch.randn(10, 1, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    method = make_method("delta", ctx).double()
    method.setup(SetupData(x, y, batch_size=4, device=torch.device("cpu")))

    teacher = method.teacher
    with torch.no_grad():
        base = nn.functional.cross_entropy(probe(teacher.backbone(x)), y).item()
        for name, found in zip(method.taps, method.attention()):
            conv = teacher.get_submodule(name)
            deltas = []
            for c in range(conv.out_channels):
                kept = conv.weight[c].clone()
                conv.weight[c] = 0
                deltas.append(nn.functional.cross_entropy(probe(teacher.backbone(x)), y).item() - base)
                conv.weight[c] = kept
            d = np.array(deltas)
            z = (d - d.mean()) / d.std(ddof=1)
            e = np.exp(z / 5.0 - (z / 5.0).max())
            np.testing.assert_allclose(found.numpy(), e / e.sum(), rtol=1e-5)
            assert found.sum().item() == pytest.approx(1.0, rel=1e-6)


def test_delta_head_term_is_beta_on_the_head_only():
    src, model, ctx = _setup()
    method = make_method("delta", ctx, alpha=0.0, beta=0.3).double()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    method.add_grad_()
    for n, p in model.named_parameters():
        expect = 0.3 * p.detach() if n.startswith("head.") else torch.zeros_like(p)
        torch.testing.assert_close(p.grad, expect)
