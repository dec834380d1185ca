"""Every registered penalty on a real torchvision ResNet-18 with a new head, in float64:
fast path == per-tensor reference == autograd of the explicit Ω (value and gradient; for the
group penalties also their all-tensors-at-once path), and
20 SGD-momentum steps with the in-place gradient land on the same weights as 20 steps on J + Ω."""

from __future__ import annotations

import copy

import pytest
import torch

from spbench.models import build_model, split_parameters
from spbench.penalties import PENALTIES, make_penalty

NAMES = sorted(PENALTIES)


def _setup(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("resnet18", 5, 3).double()
    inherited, head = split_parameters(model)
    fisher = None
    if PENALTIES[name].uses_fisher:
        g = torch.Generator().manual_seed(seed + 1)
        fisher = {n: torch.rand(p.shape, generator=g, dtype=torch.float64) for n, p in inherited.items()}
    # The group penalties weigh each group by √(its size) (up to 68 here): a smaller α keeps
    # their SGD stable at the test's step size.
    ab = (0.0, 0.0) if name == "none" else (0.3, 0.05) if name.startswith("l2") else (0.003, 0.05)
    # eps = 0.05 for the smoothed penalties: with the default 1e-3 their curvature α/ε makes
    # SGD chaotic near w0 at this step size, and two correct formulas' rounding would diverge.
    penalty = make_penalty(name, inherited, head, alpha=ab[0], beta=ab[1], fisher=fisher, eps=0.05)
    with torch.no_grad():  # leave w0, so that every term is non-trivial
        g = torch.Generator().manual_seed(seed + 2)
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model, penalty


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(42)
    return torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("name", NAMES)
def test_fast_path_reference_and_autograd_agree(name):
    model, penalty = _setup(name)
    params = list(model.parameters())
    for p in params:
        p.grad = None
    value = penalty.value()
    if name != "none":
        value.backward()
    autograd = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    results = {}
    for foreach in (False, True):
        for p in params:
            p.grad = None
        penalty.add_grad_(foreach=foreach)
        results[foreach] = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    if name.startswith("gl_sp"):  # the group penalties' all-at-once path (accelerators), here on the CPU
        from spbench.penalties import _group_grad_flat_

        for p in params:
            p.grad = torch.zeros_like(p)
        inherited = penalty._inherited
        fishers = penalty.fisher.values() if penalty.uses_fisher else None
        with torch.no_grad():
            _group_grad_flat_([p.grad for p in inherited], inherited, penalty.w0.values(), fishers, penalty.alpha, penalty.eps)
            for p in penalty._head:
                p.grad.add_(p, alpha=penalty.beta)
        results["flat"] = [p.grad.clone() for p in params]
    for i, (loop, fast, auto) in enumerate(zip(results[False], results[True], autograd)):
        torch.testing.assert_close(fast, loop, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(loop, auto, rtol=1e-10, atol=1e-12)
        if "flat" in results:
            torch.testing.assert_close(results["flat"][i], loop, rtol=1e-12, atol=1e-14)
    if name != "none":
        assert float(value.detach()) > 0
        assert any(float(g.abs().max()) > 0 for g in autograd)


def _sgd(model, penalty, batch, mode: str, steps: int = 20) -> list[torch.Tensor]:
    x, y = batch
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # Batch norm in eval mode: on 16×16 inputs the deep layers see 1×1 maps, and batch
    # statistics over 4 values would amplify rounding; the penalty is what is under test.
    model.eval()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if mode == "explicit":
            (loss + penalty.value()).backward()
        else:
            loss.backward()
            penalty.add_grad_(foreach=(mode == "foreach"))
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", NAMES)
def test_in_place_gradient_follows_the_explicit_objective(name, batch):
    model, penalty = _setup(name)
    twin_model = copy.deepcopy(model)
    inherited, head = split_parameters(twin_model)
    # the twin's penalty holds the same reference state, built on the twin's parameters
    fisher = {n: penalty.fisher[n] for n in inherited} if penalty.uses_fisher else None
    twin = make_penalty(name, inherited, head, alpha=penalty.alpha, beta=penalty.beta, fisher=fisher, eps=0.05)
    twin.load_state_dict(penalty.state_dict())
    explicit = _sgd(twin_model, twin, batch, "explicit")
    in_place = _sgd(model, penalty, batch, "foreach")
    rtol, atol = (1e-8, 1e-10) if getattr(penalty, "eps", 0.0) else (1e-9, 1e-11)
    for a, b in zip(in_place, explicit):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
