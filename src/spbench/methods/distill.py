"""Methods that keep a trainable copy h_s of the source head close to the source network's
outputs: Learning without Forgetting and Co-Tuning (SPEC §7).

Notation: ``g`` the fine-tuned backbone, ``h`` the new head, ``f0`` the frozen source network
(backbone and source head), ``h_s`` a trainable copy of the source head (initialised from it and
stepped with the model), K_s source classes. LwF scores Table 3 with its ``h_s`` (its
:meth:`retention_head`): LwF trains it to keep answering the source task. Co-Tuning does not:
its ``h_s`` learns p(y_s | y_t), the source classes a target class resembles, whatever the image
shows, so Table 3 scores it with the original source head, like every other method.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from .base import Forward, HParam, Method, MethodContext, Needs, SetupData, eval_mode, full_precision, register

__all__ = ["LwF", "CoTuning"]


def _trainable_copy(head: nn.Module) -> nn.Module:
    out = copy.deepcopy(head)
    out.requires_grad_(True)
    return out


def soft_cross_entropy(target: Tensor, logits: Tensor) -> Tensor:
    """Mean over the batch of −Σ_k target_k · log softmax(logits)_k."""
    return -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


@register
class LwF(Method):
    """Learning without Forgetting (Li & Hoiem, TPAMI 2017):

        CE(y, h(g(x))) + λ · (1/B) Σ_i −Σ_k softmax(f0(x_i)/T)_k · log softmax(h_s(g(x_i))/T)_k

    the cross-entropy between the source network's outputs softened at temperature T
    (recorded by one no-grad forward of the frozen f0 per step) and the same softened outputs
    of the fine-tuned backbone under the trainable copy ``h_s`` of the source head. The paper's
    defaults: T = 2, λ = 1 (its λ_o). No T² factor, as in the paper's equation; the paper's
    warm-up (the new head alone first) is not part of this method: LP-FT is the suite's
    head-first protocol. Tensors touched: the backbone and h (through the loss), h_s.
    """

    name = "lwf"
    hparams = (
        HParam("lambda", float, 1.0, doc="weight λ of the distillation term"),
        HParam("temperature", float, 2.0, low=1e-3, doc="softmax temperature T"),
    )
    needs = Needs(teacher=True, parameters=True)

    def __init__(self, context: MethodContext, **hparams: Any):
        super().__init__(context, **hparams)
        self.source_head = _trainable_copy(context.source_model.head)

    def loss(self, out: Forward) -> Tensor:
        t = self.settings["temperature"]
        target = torch.softmax(full_precision(out.teacher_logits) / t, dim=1)
        student = full_precision(self.source_head(out.features)) / t
        return self.settings["lambda"] * soft_cross_entropy(target, student)

    def retention_head(self) -> nn.Module:
        return self.source_head


@register
class CoTuning(Method):
    """Co-Tuning (You et al., NeurIPS 2020):

        CE(y, h(g(x))) + λ · (1/B) Σ_i −Σ_s p(y_s = s | y_i) · log softmax(h_s(g(x_i)))_s

    with the category relationship p(y_s | y_t) learned once, before step 0, from the frozen
    source network on the target's training images: row t is the mean of softmax(f0(x)) over
    the training images of target class t (the paper's "direct" estimate; its calibrated
    "reverse" estimate is not implemented). The relationship is a buffer (checkpointed); f0
    is not needed after set-up. The paper's default λ = 2.3. Tensors touched: the backbone
    and h (through the losses), h_s.
    """

    name = "co_tuning"
    hparams = (HParam("lambda", float, 2.3, doc="weight λ of the source-label term"),)
    needs = Needs(source_model=True, setup=True, parameters=True)

    def __init__(self, context: MethodContext, **hparams: Any):
        super().__init__(context, **hparams)
        source = context.source_model
        self.source_head = _trainable_copy(source.head)
        self._source = [source]  # used by setup() only; not part of this module's state
        k_t = context.model.head.out_features
        k_s = source.head.out_features
        self.register_buffer("relationship", torch.full((k_t, k_s), 1.0 / k_s))

    @torch.no_grad()
    def setup(self, data: SetupData) -> None:
        sums = torch.zeros_like(self.relationship, dtype=torch.float64)
        counts = torch.zeros(len(sums), dtype=torch.float64, device=sums.device)
        with eval_mode(self._source[0]) as source:
            for xb, yb in data.batches():
                probs = torch.softmax(source(xb).double(), dim=1)
                sums.index_add_(0, yb, probs)
                counts.index_add_(0, yb, torch.ones_like(yb, dtype=torch.float64))
        if (counts == 0).any():
            missing = torch.nonzero(counts == 0).flatten().tolist()
            raise ValueError(f"co_tuning: target classes {missing[:5]} have no training images")
        self.relationship.copy_(sums / counts[:, None])

    def loss(self, out: Forward) -> Tensor:
        target = self.relationship[out.y]
        return self.settings["lambda"] * soft_cross_entropy(target, full_precision(self.source_head(out.features)))
