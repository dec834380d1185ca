"""L2-SP's descendants, the robust fine-tuning methods that keep the weights near the starting
point w0 by other means than a penalty: a decay applied selectively (SPD), a projection onto
a ball whose radius is learned (FTP), a head fitted first (LP-FT), an interpolation after
training (WiSE-FT).

Notation as in :mod:`.penalties`: S the inherited tensors in scope (trainable, under
``backbone.``), w0 their values when the run starts, g_t the gradient of the training loss at
step t, w̃_t the weights after the optimizer step (SGD with momentum) and before the method's
``prox_``. "Layer" means one tensor of S, as in the authors' code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..penalties import TensorStore
from .base import HParam, Method, MethodContext, Needs, SetupData, eval_mode, register
from .features import _fit_probe

__all__ = ["SPD", "FTP", "LPFT", "WiSEFT", "row_l1_norms"]


class _Anchored(Method):
    """A method holding w0, the inherited tensors S at construction (buffers: checkpointed)."""

    def __init__(self, context: MethodContext, **hparams: Any):
        super().__init__(context, **hparams)
        self.w0 = TensorStore(dict(context.inherited))

    def _diffs(self) -> list[Tensor]:
        return [p - w0 for p, w0 in zip(self._inherited, self.w0.values())]


@register
class SPD(_Anchored):
    """Selective projection decay (Tian et al., NeurIPS 2024), for each layer at each step:

        c_t = −g_tᵀ (w_{t−1} − w0)
        if c_t < 0:  r_t = clamp((γ_t − γ_{t−1}) / γ_t, 0, 1),  γ_t = ‖w̃_t − w0‖₂, γ_{t−1} = ‖w_{t−1} − w0‖₂
                     w_t = w̃_t − λ r_t (w̃_t − w0)
        else:        w_t = w̃_t

    The condition c_t < 0 selects the layers whose descent direction −g_t opposes their
    progress away from w0 (inconsistent layers); r_t is non-zero only when the optimizer's
    step (with momentum, not −g_t alone) nonetheless moved the layer away from w0, and then
    the decay toward w0 takes back the fraction λ r_t of the displacement. g_t is the gradient
    before clipping. The authors pair it with Adam; the suite's optimizer is SGD with
    momentum. Strength λ (the authors' code calls it ``weight_decay``). Tensors touched: S.
    """

    name = "spd"
    hparams = (HParam("lambda", float, 1.0, doc="strength λ of the selective decay toward w0"),)

    def __init__(self, context: MethodContext, **hparams: Any):
        super().__init__(context, **hparams)
        self._pending: list[tuple[Tensor, Tensor]] = []

    @torch.no_grad()
    def add_grad_(self) -> None:
        # before the step: the condition c_t and γ_{t−1}, per layer (no state: a skipped step
        # leaves nothing behind)
        self._pending = []
        for p, d in zip(self._inherited, self._diffs()):
            c = -(p.grad * d).sum() if p.grad is not None else d.new_zeros(())
            self._pending.append((c, torch.linalg.vector_norm(d)))

    @torch.no_grad()
    def prox_(self, lr: float) -> None:
        lam = self.settings["lambda"]
        for p, w0, (c, before) in zip(self._inherited, self.w0.values(), self._pending):
            d = p - w0
            after = torch.linalg.vector_norm(d)
            r = torch.where(after > 0, (after - before) / after.clamp_min(torch.finfo(d.dtype).tiny), 0.0).clamp(0, 1)
            p.sub_(d * (lam * r * (c < 0)))
        self._pending = []


def row_l1_norms(t: Tensor) -> Tensor:
    """FTP's per-row norms: Σ |t| over every dimension but the first (one per output channel
    or row; the whole tensor for a 1-D one), plus 10⁻⁸, shaped to broadcast against ``t``."""
    if t.ndim < 2:
        return t.abs().sum().reshape([1] * t.ndim) + 1e-8
    return t.abs().sum(dim=tuple(range(1, t.ndim)), keepdim=True) + 1e-8


def _recount_steps(module: "FTP", incompatible_keys) -> None:
    """After a state is loaded, FTP reads its step count from the buffer again."""
    module._steps = None


@register
class FTP(_Anchored):
    """Fast trainable projection (Tian et al., NeurIPS 2023): each layer is projected after the
    optimizer step onto a ball around w0 whose radius γ (one per layer) is learned during
    training, without validation data:

        c_t = w̃_t − w0,  n_t = row_l1_norms(c_t)   (one norm per output row)
        γ_t = clip(γ_{t−1} − μ Adam(∇γ_t), 10⁻⁸, max n_t),  ∇γ_t = g_tᵀ (c_{t−1} / n_{t−1})  (× k when > 0)
        w_t = w0 + clamp(γ_t / n_t, 0, 1) · c_t

    ∇γ_t is the derivative of the loss in γ through the previous projection
    (w_{t−1} = w0 + γ c_{t−1} / n_{t−1}), evaluated with the current gradient g_t at w_{t−1}.
    As in the authors' code: γ starts at 10⁻⁸ (the first step is projected back to w0), the
    radius is updated by Adam (β = 0.9, 0.999, step μ = 0.01, ε = 10⁻⁸; bias-corrected by the
    number of radius updates) and clipped to the largest row norm, and a positive ∇γ is
    annealed by the factor k (k = 1: none; the authors' default). State (checkpointed): γ,
    its Adam moments, c_{t−1}/n_{t−1} and the step count. Tensors touched: S.
    """

    name = "ftp"
    hparams = (HParam("k", float, 1.0, high=1.0, doc="annealing factor k of a positive radius gradient"),)

    MU, BETA1, BETA2, EPS, GAMMA0 = 1e-2, 0.9, 0.999, 1e-8, 1e-8

    def __init__(self, context: MethodContext, **hparams: Any):
        super().__init__(context, **hparams)
        n = len(self._inherited)
        ref = self._inherited[0] if n else torch.zeros(())
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        for name in ("gamma", "moment1", "moment2"):
            self.register_buffer(name, torch.zeros(n, dtype=ref.dtype, device=ref.device))
        self.direction = TensorStore({name: torch.zeros_like(p) for name, p in context.inherited.items()})
        self._grad_gamma: Tensor | None = None
        # steps_done counted here as well: reading the buffer at every step would make the host
        # wait for the device; a loaded state makes it read once again
        self._steps: int | None = 0
        self.register_load_state_dict_post_hook(_recount_steps)

    @torch.no_grad()
    def add_grad_(self) -> None:
        # ∇γ_t at w_{t−1}, kept until prox_ (no state changes before the step is taken)
        grads = [(p.grad * d).sum() if p.grad is not None else d.new_zeros(())
                 for p, d in zip(self._inherited, self.direction.values())]
        self._grad_gamma = torch.stack(grads) if grads else None

    @torch.no_grad()
    def prox_(self, lr: float) -> None:
        if not self._inherited:
            return
        diffs = self._diffs()
        norms = [row_l1_norms(d) for d in diffs]
        largest = torch.stack([n.max() for n in norms])
        if self._steps is None:
            self._steps = int(self.steps_done)
        if self._steps == 0:
            gamma = torch.full_like(self.gamma, self.GAMMA0)
        else:
            grad = self._grad_gamma
            grad = torch.where(grad > 0, grad * self.settings["k"], grad)
            self.moment1.mul_(self.BETA1).add_(grad, alpha=1 - self.BETA1)
            self.moment2.mul_(self.BETA2).addcmul_(grad, grad, value=1 - self.BETA2)
            t = self._steps  # radius updates so far, this one included
            m_hat = self.moment1 / (1 - self.BETA1**t)
            v_hat = self.moment2 / (1 - self.BETA2**t)
            gamma = self.gamma - self.MU * m_hat / (v_hat.sqrt() + self.EPS)
        gamma = torch.minimum(torch.maximum(gamma, torch.full_like(gamma, self.GAMMA0)), largest)
        self.gamma.copy_(gamma)
        for i, (p, w0, d, n, direction) in enumerate(zip(self._inherited, self.w0.values(), diffs, norms,
                                                         self.direction.values())):
            p.copy_(w0 + (gamma[i] / n).clamp(0, 1) * d)
            direction.copy_(d / n)
        self.steps_done += 1
        self._steps += 1
        self._grad_gamma = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "ftp_mu": self.MU}


@register
class LPFT(Method):
    """LP-FT (Kumar et al., ICLR 2022): linear probing, then fine-tuning. Before step 0 the new
    head h is fitted on the frozen features of the starting backbone g0 (eval mode: batch
    norms keep their source statistics) of the target's training images (central crops, no
    augmentation):

        h = argmin_h  (1/N) Σ_i CE(y_i, h(g0(x_i))) + (ρ/2) ‖W_h‖²

    multinomial logistic regression solved by L-BFGS from zero (the authors fit it with
    scikit-learn's L-BFGS logistic regression, ρ their 1/C); then the whole network is
    fine-tuned from that head by the suite's protocol, with no term of its own. It composes
    with any method (``lp_ft+l2_sp``: the probe first, then L2-SP's penalty; see
    :func:`spbench.methods.compose`). Default ρ = 10⁻⁴. Tensors touched: the head (once).
    """

    name = "lp_ft"
    hparams = (HParam("probe_decay", float, 1e-4, doc="L2 weight ρ of the linear probe"),)
    needs = Needs(setup=True)

    PROBE_ITERATIONS = 100

    @torch.no_grad()
    def setup(self, data: SetupData) -> None:
        model = self._model[0]
        with eval_mode(model):  # batch by batch: the images are never all in memory at once
            pairs = [(model.backbone(xb), yb) for xb, yb in data.batches()]
        features, y = torch.cat([f for f, _ in pairs]), torch.cat([yb for _, yb in pairs])
        probe = _fit_probe(features.to(model.head.weight.dtype), y, model.head.out_features,
                           iterations=self.PROBE_ITERATIONS, weight_decay=self.settings["probe_decay"])
        model.head.weight.copy_(probe.weight)
        model.head.bias.copy_(probe.bias)


@register
class WiSEFT(Method):
    """WiSE-FT, weight-space ensembling (Wortsman et al., CVPR 2022): after fine-tuning, the
    backbone is replaced by the interpolation

        w(a) = (1 − a) · w0 + a · w_ft

    of its starting point w0 and its fine-tuned weights w_ft, over every tensor of the backbone's
    state (parameters and batch-norm statistics; frozen units are equal at both ends). a is a
    ``post_hoc`` hyper-parameter: one fine-tune serves every a (a validation run scores each
    listed value; the test run interpolates at the chosen one). a = 1 is plain fine-tuning,
    a = 0 the starting backbone under the fine-tuned head.

    The head: the paper interpolates it too, from a zero-shot head (CLIP's text embeddings of
    the class names). A new target's head has no pretrained counterpart here (its starting
    point is random), so the suite keeps the fine-tuned head h_ft at every a. Training itself
    has no term of its own; it composes with any method (``wise_ft+l2_sp``). Tensors touched:
    the backbone (after training).
    """

    name = "wise_ft"
    hparams = (HParam("mix", float, 0.5, high=1.0, post_hoc=True,
                      doc="weight a of the fine-tuned backbone in the interpolation"),)

    def __init__(self, context: MethodContext, **hparams: Any):
        super().__init__(context, **hparams)
        state = {k: v for k, v in context.model.backbone.state_dict().items() if v.is_floating_point()}
        self.start = TensorStore(state)

    @torch.no_grad()
    def finalize_(self) -> None:
        a = self.settings["mix"]
        state = self._model[0].backbone.state_dict()
        for name in self.start.names:
            state[name].mul_(a).add_(self.start[name], alpha=1 - a)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "n_interpolated_tensors": len(self.start.names)}
