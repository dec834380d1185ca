"""The README's library example runs as written and does what it says."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def example(name: str) -> str:
    match = re.search(rf"<!-- example: {name} -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no example marked {name!r}"
    return match.group(1)


def test_l2sp_example_runs_and_pulls_toward_w0():
    """The example trains 3 steps; afterwards the backbone has left w0 and Ω > 0, and the
    gradient it added equals autograd's of the explicit penalty."""
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(example("l2sp"), str(README), "exec"), scope)
    model, penalty = scope["model"], scope["penalty"]
    assert penalty.value().detach().item() > 0
    moved = [n for n, p in model.named_parameters() if not n.startswith("fc.") and not torch.equal(p, penalty.w0[n])]
    assert moved
    for p in model.parameters():
        p.grad = None
    penalty.value().backward()
    autograd = {n: p.grad.clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    penalty.add_grad_()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, autograd[n])
