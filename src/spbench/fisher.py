"""Diagonal Fisher information of the source network (paper eq. 4; SPEC §3).

    F̂_jj = 1/m Σ_i Σ_k f_k(x_i; w0) (∂/∂w_j log f_k(x_i; w0))²

computed with the source network and its own source head, batch norm in eval mode. The
``exact`` estimator takes the expectation over all K classes of the model's predictive
distribution (the "true" Fisher). The ``mc`` estimator samples S labels per image from that
distribution and averages their squared gradients (unbiased, cheaper for large K). Neither is
the empirical Fisher (true labels) nor the square of a mini-batch mean gradient.

Per-example gradients come from ``torch.func`` (``vmap`` of ``grad``) over chunks of images.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .methods.base import eval_mode
from .progress import Progress

log = logging.getLogger(__name__)

__all__ = ["estimate_fisher", "normalize_fisher", "save_fisher", "load_fisher", "ESTIMATORS"]

ESTIMATORS = ("exact", "mc")


def estimate_fisher(
    model: nn.Module,
    images: Tensor,
    param_names: Iterable[str],
    *,
    estimator: str = "exact",
    samples: int = 1,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Fisher diagonal of ``model`` over ``images`` for the parameters ``param_names``.

    ``model`` maps a batch of images to logits over the K source classes. It is used in eval
    mode (batch-norm statistics fixed); every submodule's mode is restored afterwards.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, not {estimator!r}")
    if samples < 1:
        raise ValueError("samples must be at least 1")
    names = list(param_names)
    all_params = dict(model.named_parameters())
    unknown = [n for n in names if n not in all_params]
    if unknown:
        raise ValueError(f"model has no parameters {unknown[:3]}")
    params = {n: all_params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in all_params.items() if n not in params}
    buffers = dict(model.named_buffers())

    def log_prob(p: dict[str, Tensor], x: Tensor, k: Tensor) -> Tensor:
        logits = functional_call(model, ({**frozen, **p}, buffers), (x.unsqueeze(0),))
        return torch.log_softmax(logits[0], dim=-1).gather(0, k.reshape(1))[0]

    per_example_grad = vmap(grad(log_prob), in_dims=(None, 0, 0))
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    m = len(images)
    # batch norm on the source statistics; every module's flag restored afterwards
    with eval_mode(model), Progress(m, "Fisher", unit="images", logger=log) as bar:
        for start in range(0, m, batch_size):
            x = images[start : start + batch_size]
            with torch.no_grad():
                probs = torch.softmax(model(x), dim=-1)
            if estimator == "exact":
                labels = torch.arange(probs.shape[1], device=x.device).expand(len(x), -1)
                weights = probs
            else:
                # Sampled where the generator lives: the same seed gives the same labels on
                # any device.
                where = generator.device if generator is not None else probs.device
                labels = torch.multinomial(probs.to(where), samples, replacement=True, generator=generator).to(x.device)
                weights = torch.full(labels.shape, 1.0 / samples, dtype=probs.dtype, device=x.device)
            for j in range(labels.shape[1]):
                g = per_example_grad(params, x, labels[:, j])
                w = weights[:, j]
                for n, gn in g.items():
                    fisher[n] += torch.einsum("b,b...->...", w, gn.pow(2))
            bar.update(len(x))
    return {n: f / m for n, f in fisher.items()}


def normalize_fisher(fisher: Mapping[str, Tensor], mode: str) -> dict[str, Tensor]:
    """``none``: as estimated. ``mean``: divided by its mean over all given elements, so that
    α means the same for l2_sp_fisher as for l2_sp on average (the raw diagonal is tiny)."""
    if mode == "none":
        return dict(fisher)
    if mode != "mean":
        raise ValueError(f"Fisher normalisation must be 'none' or 'mean', not {mode!r}")
    total = sum(f.sum() for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())
    mean = total / count
    if not mean > 0:
        raise ValueError("the Fisher diagonal is zero: nothing to normalise by")
    return {n: f / mean for n, f in fisher.items()}


def save_fisher(path, fisher: Mapping[str, Tensor], meta: Mapping) -> None:
    """The Fisher diagonal and its metadata, sealed with their content digest."""
    from .integrity import save_sealed

    save_sealed(path, {"fisher": {n: f.detach().cpu() for n, f in fisher.items()}, "meta": dict(meta)})


def load_fisher(path) -> tuple[dict[str, Tensor], dict]:
    """(diagonal, metadata) of :func:`save_fisher`'s file, after checking its digest."""
    from .integrity import load_sealed

    blob = load_sealed(path)
    return blob["fisher"], blob["meta"]
