"""Every registered method, set up for a few training steps on the demo network: the cases
and the set-up shared by the tests that run each method's step under another regime (the meta
device, a compiled backbone)."""

from __future__ import annotations

import torch

from spbench.methods import METHODS, MethodContext, make_method
from spbench.models import build_model, split_parameters
from spbench.train import sgd

#: The methods with a proximal variant (``nonsmooth: prox``) besides their smoothed one.
PROX_METHODS = ("l1_sp", "gl_sp", "gl_sp_fisher")


def method_cases(names=None) -> list[tuple[str, str]]:
    """(method, nonsmooth) of every method of ``names`` (default: the registry's), smoothed,
    and the proximal variants of those that have one."""
    names = sorted(METHODS) if names is None else list(names)
    return [(name, "smooth") for name in names] + [(name, "prox") for name in PROX_METHODS if name in names]


def trainee(name: str, nonsmooth: str, device: str | torch.device = "cpu"):
    """The demo network fine-tuned by ``name`` from a seeded source network: the model (the
    source's backbone), the method (with a Fisher in [0.5, 1.5) where it needs one) and an SGD
    optimizer over both's trainable parameters, everything on ``device``; the method's set-up
    state at its initial value (a set-up pass is not a step)."""
    torch.manual_seed(0)
    source = build_model("demo_resnet", 5, 1).eval()
    model = build_model("demo_resnet", 3, 1)
    model.backbone.load_state_dict(source.backbone.state_dict())
    source.to(device), model.to(device)  # before the method takes hold of the parameters
    inherited, head = split_parameters(model)
    fisher = ({n: torch.rand(p.shape, device=device) + 0.5 for n, p in inherited.items()}
              if METHODS[name].needs.fisher else None)
    context = MethodContext(model, inherited, head, source_model=source, fisher=fisher, epsilon=0.05,
                            nonsmooth=nonsmooth)
    method = make_method(name, context).to(device)
    optimizer = sgd([p for p in model.parameters() if p.requires_grad] + list(method.parameters()), lr=0.05,
                    momentum=0.9)
    return model, method, optimizer
