"""Analyses beyond accuracy: how far fine-tuning moved each unit (Fig. 4) and what a penalty
costs per training step (paper section 4.4.1; the seven penalties, as methods of
:mod:`spbench.methods`, stepped by :func:`spbench.train.training_step`)."""

from __future__ import annotations

import statistics
import time
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from .methods import MethodContext, make_method
from .models import build_model, split_parameters

__all__ = ["conv_layers", "unit_r2", "penalty_flops", "step_overhead", "FLOPS_PER_ELEMENT"]


def conv_layers(backbone: nn.Module) -> list[str]:
    """Names of the backbone's convolutions, in registration (= forward) order."""
    return [name for name, m in backbone.named_modules() if isinstance(m, nn.Conv2d)]


@torch.no_grad()
def _activations(backbone: nn.Module, images: Tensor, names: list[str], batch_size: int) -> dict[str, Tensor]:
    """Per layer: [units, samples], every image and spatial position a sample."""
    modules = dict(backbone.named_modules())
    store: dict[str, list[Tensor]] = {n: [] for n in names}
    hooks = [
        modules[n].register_forward_hook(lambda m, i, o, n=n: store[n].append(o.transpose(0, 1).flatten(1).double()))
        for n in names
    ]
    backbone.eval()
    try:
        for start in range(0, len(images), batch_size):
            backbone(images[start : start + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v, dim=1) for n, v in store.items()}


def unit_r2(
    pretrained: nn.Module, finetuned: nn.Module, images: Tensor, *, batch_size: int = 256
) -> list[dict]:
    """R² of each unit's fine-tuned activation regressed (least squares, with intercept) on the
    same unit's pretrained activation, over every image and spatial position (paper Fig. 4).
    Units are the output channels of every convolution. For a simple regression R² is the
    squared correlation; a unit whose activation is constant in either network gets R² = 1
    if both are constant, else 0."""
    names = conv_layers(pretrained)
    if names != conv_layers(finetuned):
        raise ValueError("the two backbones have different convolution layers")
    before = _activations(pretrained, images, names, batch_size)
    after = _activations(finetuned, images, names, batch_size)
    rows = []
    for index, name in enumerate(names, start=1):
        x, y = before[name], after[name]
        xc = x - x.mean(dim=1, keepdim=True)
        yc = y - y.mean(dim=1, keepdim=True)
        sxx, syy, sxy = (xc * xc).sum(1), (yc * yc).sum(1), (xc * yc).sum(1)
        tiny = 1e-12 * torch.maximum(sxx, syy).clamp_min(1e-300)
        r2 = torch.where((sxx > tiny) & (syy > tiny), sxy * sxy / (sxx * syy).clamp_min(1e-300), torch.zeros_like(sxx))
        both_constant = (sxx <= tiny) & (syy <= tiny)
        r2 = torch.where(both_constant, torch.ones_like(r2), r2)
        rows += [{"layer": name, "layer_index": index, "unit": u, "r2": float(v)} for u, v in enumerate(r2.tolist())]
    return rows


#: Elementwise floating-point operations per penalised element of one add_grad_ (analytic;
#: torch.utils.flop_counter counts only matrix products and convolutions).
FLOPS_PER_ELEMENT = {
    "none": 0,
    "l2": 2,  # grad += α·w
    "l2_sp": 3,  # d = w − w0; grad += α·d
    "l2_sp_fisher": 4,  # d = w − w0; d *= F; grad += α·d
    "l1_sp": 7,  # d; d²; +ε²; √; d/√; grad += α·(…)
    "gl_sp": 7,  # d; d² summed per group; +ε²; √ per group; scale; grad += α·s_g·(…)
    "gl_sp_fisher": 8,  # as gl_sp with F·d²
}


def penalty_flops(penalty) -> float:
    """Analytic FLOPs of one ``add_grad_``: per-element cost on S, 2 per element of S̄ (β·w).
    ``penalty``: a :class:`spbench.penalties.Penalty`, or the method that wraps one
    (:class:`spbench.methods.penalties.PenaltyMethod`, its ``.penalty``)."""
    penalty = getattr(penalty, "penalty", penalty)
    d = penalty.describe()
    per = FLOPS_PER_ELEMENT.get(penalty.name)
    if per is None:
        raise ValueError(f"no FLOP count for penalty {penalty.name!r}")
    head = 2 * d["n_head_elements"] if penalty.beta else 0
    return float(per * d["n_inherited_elements"] + head)


def step_overhead(
    arch: str,
    penalties: Iterable[str],
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    batch_size: int,
    repeats: int = 20,
    fisher: Mapping[str, Tensor] | None = None,
    device: str = "cpu",
) -> list[dict]:
    """FLOPs (torch.utils.flop_counter) and median wall time of one SGD training step of
    ``arch`` with each penalty (the training loop's own step,
    :func:`spbench.train.training_step`, on the penalty's method), and of the penalty's
    ``add_grad_`` alone."""
    from torch.utils.flop_counter import FlopCounterMode

    from .pipeline import device_name
    from .train import training_step

    dev = torch.device(device)
    torch.manual_seed(0)
    x = torch.randn(batch_size, in_channels, image_size, image_size, device=dev)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)
    rows = []
    for name in penalties:
        if name not in FLOPS_PER_ELEMENT:
            raise ValueError(f"step_overhead measures the parameter penalties {sorted(FLOPS_PER_ELEMENT)}, not {name!r}")
        model = build_model(arch, num_classes, in_channels).to(dev)
        inherited, head = split_parameters(model)
        fish = None
        if name.endswith("fisher"):
            fish = fisher or {n: torch.rand_like(p) for n, p in inherited.items()}
        hparams = {} if name == "none" else {"alpha": 0.01, "beta": 0.01}
        method = make_method(name, MethodContext(model, inherited, head, fisher=fish), **hparams).to(dev)
        penalty = method.penalty
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step():
            training_step(model, method, x, y, opt, lr=1e-3)

        step()  # warm-up
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        step_times, pen_times = [], []
        for _ in range(repeats):
            _sync(dev)
            t0 = time.perf_counter()
            step()
            _sync(dev)
            t1 = time.perf_counter()
            penalty.add_grad_()
            _sync(dev)
            t2 = time.perf_counter()
            step_times.append(t1 - t0)
            pen_times.append(t2 - t1)
        pf = penalty_flops(penalty)
        sf = float(counter.get_total_flops())
        rows.append(
            {
                "arch": arch,
                "penalty": name,
                "batch_size": batch_size,
                "image_size": image_size,
                "step_flops": sf + pf,
                "penalty_flops": pf,
                "flops_ratio": pf / (sf + pf),
                "step_seconds": statistics.median(step_times),
                "penalty_seconds": statistics.median(pen_times),
                "device": device_name(dev),
            }
        )
    return rows


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
