"""Parameter penalties Ω(w) for fine-tuning (paper eqs. 1-4; SPEC §2).

Each penalty acts on two explicit groups of parameters: the inherited tensors S (weighted by
α) and the new head S̄ (weighted by β). It is applied the way an optimizer applies weight
decay: after ``loss.backward()``, :meth:`Penalty.add_grad_` adds ∇Ω to each ``.grad`` in
place, so no autograd graph is built over the weights. :meth:`Penalty.value` computes the
explicit Ω with autograd support; the tests check that both give the same SGD trajectory.

Reference state (the starting point ``w0`` and the Fisher diagonal ``F``) is registered as
buffers of the penalty module: ``.to()``, ``state_dict()`` and checkpoints carry it.

Adding a penalty is one subclass decorated with :func:`register`.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import ClassVar, Mapping

import torch
from torch import Tensor, nn

__all__ = [
    "Penalty",
    "NoPenalty",
    "L2",
    "L2SP",
    "L2SPFisher",
    "L1SP",
    "GroupLassoSP",
    "GroupLassoSPFisher",
    "VARIANTS",
    "PENALTIES",
    "register",
    "make_penalty",
]

#: Penalty registry: name -> class.
PENALTIES: dict[str, type["Penalty"]] = {}


def register(cls: type["Penalty"]) -> type["Penalty"]:
    if cls.name in PENALTIES:
        raise ValueError(f"penalty {cls.name!r} registered twice")
    PENALTIES[cls.name] = cls
    return cls


class TensorStore(nn.Module):
    """Named tensors as buffers (parameter names contain dots, buffer names may not)."""

    def __init__(self, tensors: Mapping[str, Tensor]):
        super().__init__()
        self.names = list(tensors)
        for name, t in tensors.items():
            self.register_buffer(name.replace(".", "__"), t.detach().clone())

    def __getitem__(self, name: str) -> Tensor:
        return getattr(self, name.replace(".", "__"))

    def values(self) -> list[Tensor]:
        return [self[n] for n in self.names]


def _group_by_device_dtype(*lists: list[Tensor]) -> list[tuple[list[Tensor], ...]]:
    """Split parallel tensor lists into groups of one device and dtype (foreach needs that)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(lists[0]):
        groups[(t.device, t.dtype)].append(i)
    return [tuple([lst[i] for i in idx] for lst in lists) for idx in groups.values()]


def _workspace(params: list[Tensor], copies: int = 1) -> Tensor:
    """Scratch space for ``copies`` tensors as large as the largest of ``params`` (one device
    and dtype): the CPU paths form each tensor's intermediate results in it, one tensor after
    the other, instead of allocating temporaries the size of the model."""
    size = max(p.numel() for p in params)
    return torch.empty(copies * size, dtype=params[0].dtype, device=params[0].device)


class Penalty(nn.Module):
    """Ω(w) = α·R(w_S) + β/2 ‖w_S̄‖², with R defined by the subclass.

    Args:
        inherited: name -> parameter of the inherited set S (trainable, in scope).
        head: name -> parameter of the new head S̄.
        alpha, beta: non-negative weights, keyword only.
        fisher: name -> Fisher diagonal, for the penalties that use it.
    """

    name: ClassVar[str]
    uses_reference: ClassVar[bool] = False
    uses_fisher: ClassVar[bool] = False

    def __init__(
        self,
        inherited: Mapping[str, nn.Parameter],
        head: Mapping[str, nn.Parameter],
        *,
        alpha: float,
        beta: float,
        fisher: Mapping[str, Tensor] | None = None,
    ):
        super().__init__()
        for key, value in (("alpha", alpha), ("beta", beta)):
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"{key} must be a non-negative number, not {value!r}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.inherited_names = list(inherited)
        self.head_names = list(head)
        # The parameters are the model's: kept in plain lists so that they are not registered
        # twice (the model's state_dict owns them, this module's holds the reference state).
        self._inherited = list(inherited.values())
        self._head = list(head.values())
        if self.uses_reference:
            self.w0 = TensorStore({n: p for n, p in inherited.items()})
        if self.uses_fisher:
            if fisher is None:
                raise ValueError(f"penalty {self.name!r} needs a Fisher diagonal")
            missing = [n for n in inherited if n not in fisher]
            if missing:
                raise ValueError(f"the Fisher diagonal lacks {len(missing)} inherited tensors, e.g. {missing[:3]}")
            for n, p in inherited.items():
                if fisher[n].shape != p.shape:
                    raise ValueError(f"Fisher shape {tuple(fisher[n].shape)} != parameter shape {tuple(p.shape)} for {n}")
            # in each parameter's dtype, device and memory layout (channels_last too), as w0 is
            self.fisher = TensorStore({n: torch.empty_like(p).copy_(fisher[n]) for n, p in inherited.items()})

    def describe(self) -> dict[str, int | float | str]:
        """Counts worth logging at start: which tensors get which weight."""
        return {
            "penalty": self.name,
            "alpha": self.alpha,
            "beta": self.beta,
            "n_inherited_tensors": len(self._inherited),
            "n_inherited_elements": sum(p.numel() for p in self._inherited),
            "n_head_tensors": len(self._head),
            "n_head_elements": sum(p.numel() for p in self._head),
        }

    # -- the explicit penalty (autograd) ------------------------------------------------------
    def value(self) -> Tensor:
        """Ω(w) as a differentiable scalar."""
        head = sum((p.pow(2).sum() for p in self._head), torch.zeros(()))
        return self.alpha * self._inherited_value() + 0.5 * self.beta * head

    def _inherited_value(self) -> Tensor:
        raise NotImplementedError

    # -- the gradient, added in place ---------------------------------------------------------
    @torch.no_grad()
    def add_grad_(self, *, foreach: bool | None = None) -> None:
        """``p.grad += ∂Ω/∂p`` for every penalised parameter (a missing grad counts as zero).

        ``foreach=None`` (or ``True``) picks the fast path: on accelerators a few
        ``torch._foreach_*`` (or flat) kernels over all tensors at once; on the CPU, for the
        -SP penalties, tensor by tensor (in blocks of rows) through a reused workspace, which
        keeps each pass in the cache and allocates nothing the size of the model. ``False``
        picks the plain per-tensor loop, the reference the fast path is tested against.
        """
        params = self._inherited + self._head
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if foreach is None:
            foreach = True
        if foreach:
            self._add_grad_foreach()
        else:
            self._add_grad_loop()

    def _add_grad_loop(self) -> None:
        for i, p in enumerate(self._inherited):
            p.grad.add_(self._inherited_grad(i, p), alpha=self.alpha)
        if self.beta:
            for p in self._head:
                p.grad.add_(p, alpha=self.beta)

    def _add_grad_foreach(self) -> None:
        if self._inherited and self.alpha:
            self._inherited_grad_foreach()
        if self._head and self.beta:
            for params, grads in _group_by_device_dtype(self._head, [p.grad for p in self._head]):
                torch._foreach_add_(grads, params, alpha=self.beta)

    def _inherited_grad(self, i: int, p: Tensor) -> Tensor:
        """∂R/∂w for the i-th inherited tensor (reference path)."""
        raise NotImplementedError

    # -- the proximal step (forward-backward splitting) -------------------------------------------
    @torch.no_grad()
    def prox_(self, lr: float) -> None:
        """Apply the proximal map of ``lr·α·R`` to the inherited tensors, after the optimizer
        step. Only the proximal variants of the non-smooth penalties do anything here."""
        return None

    @property
    def has_prox_step(self) -> bool:
        """Whether :meth:`prox_` does anything."""
        return False

    def _inherited_grad_foreach(self) -> None:
        """``grad += α ∂R/∂w`` over all inherited tensors at once (fast path)."""
        raise NotImplementedError


@register
class NoPenalty(Penalty):
    """Ω(w) = 0: plain fine-tuning (early stopping aside). α and β must be 0."""

    name = "none"

    def __init__(self, inherited, head, *, alpha: float = 0.0, beta: float = 0.0, fisher=None):
        if alpha or beta:
            raise ValueError("the 'none' penalty takes alpha = beta = 0")
        super().__init__(inherited, head, alpha=0.0, beta=0.0)

    def value(self) -> Tensor:
        return torch.zeros(())

    @torch.no_grad()
    def add_grad_(self, *, foreach: bool | None = None) -> None:
        return None


@register
class L2(Penalty):
    """Ω(w) = α/2 ‖w_S‖² + β/2 ‖w_S̄‖²: weight decay toward the origin (the baseline).
    ∂Ω/∂w_S = α w_S."""

    name = "l2"

    def _inherited_value(self) -> Tensor:
        return 0.5 * sum(p.pow(2).sum() for p in self._inherited)

    def _inherited_grad(self, i: int, p: Tensor) -> Tensor:
        return p

    def _inherited_grad_foreach(self) -> None:
        for params, grads in _group_by_device_dtype(self._inherited, [p.grad for p in self._inherited]):
            torch._foreach_add_(grads, params, alpha=self.alpha)


@register
class L2SP(Penalty):
    """Ω(w) = α/2 ‖w_S − w0_S‖² + β/2 ‖w_S̄‖²: decay toward the starting point (eq. 3).
    ∂Ω/∂w_S = α (w_S − w0_S). ``w0`` is a copy of S taken when the penalty is built."""

    name = "l2_sp"
    uses_reference = True

    def _inherited_value(self) -> Tensor:
        return 0.5 * sum((p - w0).pow(2).sum() for p, w0 in zip(self._inherited, self.w0.values()))

    def _inherited_grad(self, i: int, p: Tensor) -> Tensor:
        return p - self.w0[self.inherited_names[i]]

    def _inherited_grad_foreach(self) -> None:
        # grad += α·w, then grad −= α·w0: two in-place passes and no temporary, about twice as
        # fast on a CPU as forming w − w0 first (same value up to rounding). On the CPU tensor
        # by tensor, so that the second pass finds the tensor's gradient still in the cache
        # (the same operations, so the same result to the bit).
        lists = (self._inherited, [p.grad for p in self._inherited], self.w0.values())
        for params, grads, refs in _group_by_device_dtype(*lists):
            if params[0].device.type == "cpu":
                for g, p, w0 in zip(grads, params, refs):
                    g.add_(p, alpha=self.alpha).add_(w0, alpha=-self.alpha)
                continue
            torch._foreach_add_(grads, params, alpha=self.alpha)
            torch._foreach_add_(grads, refs, alpha=-self.alpha)


@register
class L2SPFisher(Penalty):
    """Ω(w) = α/2 Σ_{j∈S} F_jj (w_j − w0_j)² + β/2 ‖w_S̄‖² (eq. 4, the EWC form).
    ∂Ω/∂w_S = α F ⊙ (w_S − w0_S). ``F`` is the Fisher diagonal estimated on the source."""

    name = "l2_sp_fisher"
    uses_reference = True
    uses_fisher = True

    def _inherited_value(self) -> Tensor:
        terms = zip(self._inherited, self.w0.values(), self.fisher.values())
        return 0.5 * sum((f * (p - w0).pow(2)).sum() for p, w0, f in terms)

    def _inherited_grad(self, i: int, p: Tensor) -> Tensor:
        name = self.inherited_names[i]
        return self.fisher[name] * (p - self.w0[name])

    def _inherited_grad_foreach(self) -> None:
        lists = (self._inherited, [p.grad for p in self._inherited], self.w0.values(), self.fisher.values())
        for params, grads, refs, fishers in _group_by_device_dtype(*lists):
            if params[0].device.type == "cpu":  # tensor by tensor, w − w0 in one reused workspace
                work = _workspace(params)
                for g, p, w0, f in zip(grads, params, refs, fishers):
                    g.addcmul_(f, torch.sub(p, w0, out=work[: p.numel()].view(p.shape)), value=self.alpha)
                continue
            diff = torch._foreach_sub(params, refs)
            torch._foreach_addcmul_(grads, fishers, diff, value=self.alpha)


# -- the non-smooth -SP penalties (paper eqs. 5-6) ---------------------------------------------------

VARIANTS = ("smooth", "prox")


def _groups(t: Tensor) -> Tensor:
    """A tensor as rows of groups (SPEC §2): a tensor of two or more dimensions is cut along
    dim 0, one group per index of dim 0 holding everything else; a 1-D tensor gives one
    group per element. What that means, by kind of tensor:

    - convolution kernels [C_out, C_in, kh, kw]: one group per output channel, its fan-in
      (kh·kw·C_in elements; a depthwise kernel [C, 1, 7, 7]: 49);
    - linear and attention weights [out, in]: one group per output row (``in`` elements), e.g.
      ViT's ``in_proj_weight`` [3·768, 768] (the query, key and value projections stacked:
      2304 groups of 768) and its MLP weights [3072, 768], [768, 3072];
    - 1-D tensors (biases, batch-norm and LayerNorm scales and shifts): groups of one element;
    - other tensors by the same rule: ViT's ``class_token`` [1, 1, D] and ``pos_embedding``
      [1, N, D] have size 1 on dim 0, so each is a single group, the whole tensor (D and N·D
      elements, s_g = √D and √(N·D)); ConvNeXt's ``layer_scale`` [C, 1, 1] is C groups of one
      element, as a 1-D tensor would be."""
    return t.reshape(t.shape[0], -1) if t.ndim >= 2 else t.reshape(-1, 1)


class NonSmoothSP(Penalty):
    """Base of the penalties that are not differentiable at w = w0, where fine-tuning starts.

    ``variant='smooth'``: plain SGD on the smoothed penalty, |x| → √(x² + ε²) and
    ‖v‖ → √(‖v‖² + ε²) (the paper's choice); :meth:`value` is then the smoothed Ω.
    ``variant='prox'``: forward-backward splitting; the optimizer steps on J + β/2‖w_S̄‖², then
    :meth:`prox_` applies the exact proximal map of lr·α·R to S. :meth:`value` is the exact Ω.
    The attribute ``eps`` is the smoothing in effect (0 for the proximal variant).
    """

    uses_reference = True

    def __init__(self, inherited, head, *, alpha, beta, fisher=None, variant: str = "smooth", eps: float = 1e-3):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
        if variant == "smooth" and not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"the smoothed variant needs eps > 0, not {eps!r}")
        super().__init__(inherited, head, alpha=alpha, beta=beta, fisher=fisher)
        self.variant = variant
        self.eps = float(eps) if variant == "smooth" else 0.0

    def describe(self):
        return {**super().describe(), "variant": self.variant, "eps": self.eps}

    def _fishers(self) -> list[Tensor | None]:
        return self.fisher.values() if self.uses_fisher else [None] * len(self._inherited)

    def _inherited_value(self) -> Tensor:
        terms = zip(self._inherited, self.w0.values(), self._fishers())
        return sum((self._r(p - w0, f) for p, w0, f in terms), torch.zeros(()))

    def _r(self, d: Tensor, f: Tensor | None) -> Tensor:
        """R of one tensor's departure d = w − w0 (smoothed by ``self.eps``)."""
        raise NotImplementedError

    def _dr(self, d: Tensor, f: Tensor | None) -> Tensor:
        """∂R/∂d for one tensor (smoothed variant)."""
        raise NotImplementedError

    def _prox(self, d: Tensor, t: float, f: Tensor | None) -> Tensor:
        """argmin_u ½‖u − d‖² + t·R(u) for one tensor (``d`` is left as it is)."""
        return self._prox_(d.clone(), t, f)

    def _prox_(self, d: Tensor, t: float, f: Tensor | None) -> Tensor:
        """:meth:`_prox`, free to write the result over ``d`` (:meth:`prox_` hands it a
        temporary of its own); returns the result."""
        raise NotImplementedError

    def _inherited_grad(self, i: int, p: Tensor) -> Tensor:
        if self.variant == "prox":
            return torch.zeros_like(p)
        name = self.inherited_names[i]
        return self._dr(p - self.w0[name], self.fisher[name] if self.uses_fisher else None)

    def _inherited_grad_foreach(self) -> None:
        if self.variant == "prox":
            return
        lists = (self._inherited, [p.grad for p in self._inherited], self.w0.values(), self._fishers())
        for params, grads, refs, fishers in _group_by_device_dtype(*lists):
            diffs = torch._foreach_sub(params, refs)
            torch._foreach_add_(grads, self._dr_foreach(diffs, fishers), alpha=self.alpha)

    def _dr_foreach(self, diffs: list[Tensor], fishers: list[Tensor | None]) -> list[Tensor]:
        return [self._dr(d, f) for d, f in zip(diffs, fishers)]

    @property
    def has_prox_step(self) -> bool:
        return self.variant == "prox" and bool(self.alpha)

    @torch.no_grad()
    def prox_(self, lr: float) -> None:
        if not self.has_prox_step:
            return
        t = lr * self.alpha
        for p, w0, f in zip(self._inherited, self.w0.values(), self._fishers()):
            if p.device.type == "cpu" and p.ndim and p.numel() and p.is_contiguous():
                # in place, by blocks of rows (whole groups): each block's temporaries stay in
                # the cache; the same operations row by row, so the same result to the bit
                for sl in _row_slices(p):
                    u = self._prox_(p[sl] - w0[sl], t, None if f is None else f[sl])
                    torch.add(w0[sl], u, out=p[sl])
            else:
                p.copy_(w0 + self._prox_(p - w0, t, f))


@register
class L1SP(NonSmoothSP):
    """Ω(w) = α ‖w_S − w0_S‖₁ + β/2 ‖w_S̄‖² (Lasso-SP, eq. 5).
    Smoothed: α Σ_j √((w_j − w0_j)² + ε²), gradient α d/√(d² + ε²).
    Proximal map: soft-thresholding of d = w − w0 at lr·α."""

    name = "l1_sp"

    def _r(self, d, f):
        return torch.sqrt(d * d + self.eps**2).sum()

    def _dr(self, d, f):
        return d / torch.sqrt(d * d + self.eps**2)

    def _dr_foreach(self, diffs, fishers):
        den = torch._foreach_mul(diffs, diffs)
        torch._foreach_add_(den, self.eps**2)
        torch._foreach_sqrt_(den)
        return torch._foreach_div(diffs, den)

    def _inherited_grad_foreach(self) -> None:
        if self.variant == "prox":
            return
        lists = (self._inherited, [p.grad for p in self._inherited], self.w0.values())
        for params, grads, refs in _group_by_device_dtype(*lists):
            if params[0].device.type != "cpu":
                diffs = torch._foreach_sub(params, refs)
                torch._foreach_add_(grads, self._dr_foreach(diffs, None), alpha=self.alpha)
                continue
            work = _workspace(params, 2)  # tensor by tensor: d and 1/√(d² + ε²) in a workspace
            half = work.numel() // 2
            for g, p, w0 in zip(grads, params, refs):
                n = p.numel()
                d = torch.sub(p, w0, out=work[:n].view(p.shape))
                den = torch.mul(d, d, out=work[half : half + n].view(p.shape)).add_(self.eps**2).rsqrt_()
                g.addcmul_(d, den, value=self.alpha)

    def _prox(self, d, t, f):
        # soft-thresholding in one kernel: d − t where d > t, d + t where d < −t, else 0 (the
        # values of sign(d)·max(|d| − t, 0), in one pass instead of five)
        return nn.functional.softshrink(d, t)

    _prox_ = _prox  # it does not write d


@register
class GroupLassoSP(NonSmoothSP):
    """Ω(w) = α Σ_g s_g ‖w_Gg − w0_Gg‖₂ + β/2 ‖w_S̄‖² (Group-Lasso-SP, eq. 6), groups as in
    :func:`_groups`, s_g = √(group size).
    Smoothed: ‖v‖ → √(‖v‖² + ε²), gradient α s_g d_g / √(‖d_g‖² + ε²).
    Proximal map: group soft-thresholding, d_g · max(0, 1 − lr·α·s_g/‖d_g‖)."""

    name = "gl_sp"

    def _norms(self, d, f):
        rows = _groups(d)
        sq = rows.pow(2) if f is None else _groups(f) * rows.pow(2)
        return rows, torch.sqrt(sq.sum(dim=1) + self.eps**2), math.sqrt(rows.shape[1])

    def _r(self, d, f):
        _, norms, s = self._norms(d, f)
        return s * norms.sum()

    def _dr(self, d, f):
        rows, norms, s = self._norms(d, f)
        g = rows if f is None else _groups(f) * rows
        return (s * g / norms.unsqueeze(1)).reshape(d.shape)

    def _inherited_grad_foreach(self) -> None:
        if self.variant == "prox":
            return
        lists = (self._inherited, [p.grad for p in self._inherited], self.w0.values(), self._fishers())
        for params, grads, refs, fishers in _group_by_device_dtype(*lists):
            fast = _group_grad_per_tensor_ if params[0].device.type == "cpu" else _group_grad_flat_
            fast(grads, params, refs, fishers if self.uses_fisher else None, self.alpha, self.eps)

    def _prox_(self, d, t, f):
        rows = _groups(d)
        norms = rows.norm(dim=1, keepdim=True)
        threshold = t * math.sqrt(rows.shape[1])
        scale = torch.clamp(1 - threshold / norms.clamp_min(torch.finfo(d.dtype).tiny), min=0)
        return rows.mul_(scale).reshape(d.shape)  # over d: no temporary, one pass fewer


@register
class GroupLassoSPFisher(GroupLassoSP):
    """Ω(w) = α Σ_g s_g (Σ_{j∈Gg} F_jj (w_j − w0_j)²)^½ + β/2 ‖w_S̄‖² (eq. 6 with the Fisher
    metric). Smoothed as gl_sp, gradient α s_g F_j d_j / √(Σ F d² + ε²).
    Proximal map: u_j = d_j/(1 + λF_j), where λ > 0 solves λ‖F^½u(λ)‖ = lr·α·s_g (found by
    a safeguarded Newton iteration, see :func:`_fisher_prox_mu`; on the CPU by a native kernel
    where :data:`NATIVE` selects it), and u = 0 when Σ_j d_j²/F_j ≤ (lr·α·s_g)²."""

    name = "gl_sp_fisher"
    uses_fisher = True

    def _prox(self, d, t, f):
        return _fisher_group_prox_rows(d, f, t)

    _prox_ = _prox  # it does not write d

    def _floored(self, f: Tensor) -> bool:
        """Whether F ≥ 1e-30 everywhere in ``f`` (the solver then need not floor it), checked
        once per tensor and version: the Fisher does not change while training."""
        cache = self.__dict__.setdefault("_floored_cache", {})
        key = (id(f), f._version, f.device)
        if key not in cache:
            cache[key] = bool(f.min() >= 1e-30)
        return cache[key]

    def runs_native(self, lr: float) -> bool:
        """Whether :meth:`prox_` at this ``lr`` runs the native kernel (on the CPU tensors,
        where :data:`NATIVE` selects it)."""
        if self.variant != "prox" or not self.alpha:
            return False
        lists = (self._inherited, self.w0.values(), self.fisher.values())
        return any(params[0].device.type == "cpu"
                   and _native_kernel(_tensors_of_rows(params, refs, fishers), lr * self.alpha) is not None
                   for params, refs, fishers in _group_by_device_dtype(*lists))

    @torch.no_grad()
    def prox_(self, lr: float) -> None:
        if not self.has_prox_step:
            return
        lists = (self._inherited, self.w0.values(), self.fisher.values())
        for params, refs, fishers in _group_by_device_dtype(*lists):
            if params[0].device.type == "cpu":  # per tensor: no launch cost to save on the CPU
                single = [i for i, p in enumerate(params) if p.ndim < 2]
                if single:  # groups of one element, in closed form, all such tensors together
                    diffs = torch._foreach_sub([params[i] for i in single], [refs[i] for i in single])
                    us = _fisher_prox_single(diffs, [fishers[i] for i in single], lr * self.alpha)
                    for i, u in zip(single, us):
                        torch.add(refs[i], u, out=params[i])
                multi = _tensors_of_rows(params, refs, fishers)
                # each tensor's rows as dense blocks where its layout allows (channels_last too)
                dense = [_in_dense_rows_order(*triple) for triple in multi]
                kernel = _native_kernel(multi, lr * self.alpha)
                if kernel is not None:
                    for p, w0, f in dense:
                        _fisher_prox_native_(kernel, p, w0, f, lr * self.alpha)
                    continue
                if not multi:
                    continue
                # one workspace: a block's departure d and the solver's three scratch tensors
                size = max(p.numel() if not p.is_contiguous() else _block_numel(p) for p, _, _ in dense)
                work = torch.empty(4 * size, dtype=params[0].dtype, device=params[0].device)
                for (p, w0, f), (_, _, fisher) in zip(dense, multi):
                    floored = self._floored(fisher)  # cached per stored tensor, not per view
                    if p.is_contiguous():  # by blocks of rows, in place
                        for sl in _row_slices(p):
                            n = (sl.stop - sl.start) * p[0].numel()
                            d = torch.sub(p[sl], w0[sl], out=work[:n].view(p[sl].shape))
                            _fisher_prox_rows_add(w0[sl], d, f[sl], lr * self.alpha, out=p[sl], work=work[size:],
                                                  floor_checked=floored)
                    else:
                        p.copy_(_fisher_prox_rows_add(w0, p - w0, f, lr * self.alpha, work=work[size:],
                                                      floor_checked=floored))
                continue
            diffs = torch._foreach_sub(params, refs)
            for p, w0, u in zip(params, refs, _fisher_group_prox(diffs, fishers, lr * self.alpha)):
                p.copy_(w0 + u)


# -- fast paths of the group penalties ---------------------------------------------------------------

#: The CPU paths take a tensor of groups in blocks of rows of at most this many bytes, so that
#: the several passes over a block find it in the core's (L2) cache.
_BLOCK_BYTES = 1 << 20


def _block_numel(t: Tensor) -> int:
    """Elements of the largest block of :func:`_row_slices` of ``t``."""
    sl = _row_slices(t)[0]
    return (sl.stop - sl.start) * t[0].numel()


def _row_slices(t: Tensor) -> list[slice]:
    """Slices of dim 0 of ``t`` (not 0-d, not empty) covering at most :data:`_BLOCK_BYTES`
    each (at least one row: one group of :func:`_groups`, one element of a 1-D tensor)."""
    step = max(1, _BLOCK_BYTES // max(1, t[0].numel() * t.element_size()))
    return [slice(s, min(s + step, t.shape[0])) for s in range(0, t.shape[0], step)]


def _group_grad_per_tensor_(
    grads: list[Tensor], params: list[Tensor], refs: list[Tensor], fishers: list[Tensor] | None, alpha: float, eps: float
) -> None:
    """``grad += α s_g F_g d_g / (Σ_{j∈g} F_j d_j² + ε²)^½`` for every group of every tensor
    (F = 1 without ``fishers``; d = w − w0): the smoothed gl_sp / gl_sp_fisher gradient, fast
    path on the CPU. Tensors of two or more dimensions are taken one block of rows
    (:func:`_row_slices`) at a time through one small workspace: a block's passes (d, its
    group norms, the scaled update) find it in the cache, and no temporary the size of a
    tensor is allocated. The 1-D tensors (groups of one element) go through a few
    ``torch._foreach_*`` calls together."""
    multi = [i for i, p in enumerate(params) if p.ndim >= 2 and p.numel()]
    single = [i for i, p in enumerate(params) if p.ndim < 2]
    if multi:
        size = max((s.stop - s.start) * params[i][0].numel() for i in multi for s in _row_slices(params[i])[:1])
        work = torch.empty(size if fishers is None else 2 * size, dtype=params[0].dtype, device=params[0].device)
    for i in multi:
        g, p = grads[i], params[i]
        rows, k = p.shape[0], p[0].numel()
        p_rows, w0_rows = p.reshape(rows, k), refs[i].reshape(rows, k)
        f_rows = None if fishers is None else fishers[i].reshape(rows, k)
        g_rows = g.view(rows, k) if g.is_contiguous() else None
        for sl in _row_slices(p):
            n = (sl.stop - sl.start) * k
            d = torch.sub(p_rows[sl], w0_rows[sl], out=work[:n].view(-1, k))
            if f_rows is None:
                e, sq = d, torch.linalg.vector_norm(d, dim=1).square_()
            else:
                e = torch.mul(f_rows[sl], d, out=work[size : size + n].view(-1, k))
                sq = d.mul_(e).sum(dim=1)  # Σ F d² (d itself is not needed any more)
            scale = sq.add_(eps * eps).rsqrt_().mul_(alpha * math.sqrt(k)).unsqueeze(1)
            if g_rows is not None:
                g_rows[sl].addcmul_(e, scale)
            else:
                g[sl].add_((e * scale).view(g[sl].shape))
    if single:
        d = torch._foreach_sub([params[i] for i in single], [refs[i] for i in single])
        e = d if fishers is None else torch._foreach_mul(d, [fishers[i] for i in single])
        den = torch._foreach_mul(e, d)
        torch._foreach_add_(den, eps * eps)
        torch._foreach_rsqrt_(den)
        torch._foreach_addcmul_([grads[i] for i in single], e, den, value=alpha)


@functools.lru_cache(maxsize=64)
def _row_blocks(shapes: tuple[torch.Size, ...]) -> tuple[list[int], list[tuple[int, int, int]], int]:
    """A flat layout of tensors of these shapes in which tensors whose groups (:func:`_groups`)
    have the same size K lie next to each other. Returns each tensor's offset, the blocks
    ``(start, rows, K)`` (each a ``(rows, K)`` matrix of the flat vector, one per group size)
    and the total length."""
    by_size: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(shapes):
        by_size[math.prod(s[1:]) if len(s) >= 2 else 1].append(i)
    offsets, blocks, pos = [0] * len(shapes), [], 0
    for k, members in by_size.items():
        start = pos
        for i in members:
            offsets[i] = pos
            pos += math.prod(shapes[i])
        if pos > start:
            blocks.append((start, (pos - start) // k, k))
    return offsets, blocks, pos


def _group_grad_flat_(
    grads: list[Tensor], params: list[Tensor], refs: list[Tensor], fishers: list[Tensor] | None, alpha: float, eps: float
) -> None:
    """:func:`_group_grad_per_tensor_` for all tensors at once (fast path on accelerators,
    where the cost is the number of kernel launches): the departures are gathered by two
    ``torch._foreach_*`` calls into one flat vector laid out by :func:`_row_blocks`, each block
    of equal group size gets its group norms and scaling from a few kernels, and one
    ``torch._foreach_add_`` adds the result to the gradients — about 5 launches per distinct
    group size (12 on a ResNet-50) instead of several per tensor."""
    offsets, blocks, total = _row_blocks(tuple(p.shape for p in params))

    def views(flat: Tensor) -> list[Tensor]:
        return [flat[o : o + p.numel()].view(p.shape) for o, p in zip(offsets, params)]

    d = torch.empty(total, dtype=params[0].dtype, device=params[0].device)
    d_views = views(d)
    torch._foreach_copy_(d_views, params)
    torch._foreach_sub_(d_views, refs)
    if fishers is None:
        e, e_views = d, d_views
    else:
        e = torch.empty_like(d)
        e_views = views(e)
        torch._foreach_copy_(e_views, fishers)
        torch._foreach_mul_(e_views, d_views)
    for start, rows, k in blocks:
        dm, em = d[start : start + rows * k].view(rows, k), e[start : start + rows * k].view(rows, k)
        sq = torch.linalg.vector_norm(dm, dim=1).square_() if fishers is None else torch.linalg.vecdot(dm, em)
        em.mul_(sq.add_(eps * eps).rsqrt_().mul_(alpha * math.sqrt(k)).unsqueeze(1))
    torch._foreach_add_(grads, e_views)


# -- the proximal map of the Fisher-weighted group norm ----------------------------------------------


def _fisher_prox_mu(a: Tensor, f: Tensor, ts, group_sum=None, expand=None, max_iterations: int = 100,
                    work: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Per group g, the root μ ≥ 0 of N(μ) = ts_g, where N(μ)² = Σ_{j∈g} a_j/(μ + f_j)²,
    a = F d², f = F > 0. μ = 1/λ of the proximal map (λ‖F^½u(λ)‖ = ‖F^½d/(μ + F)‖); N falls
    from N(0) = (Σ d²/F)^½ to 0, so the root is positive where N(0) > ts_g; elsewhere (the zero
    groups) the result is 0. The groups are the rows of ``a`` and ``f`` (``ts`` a number), or
    any layout given by ``group_sum`` (elementwise tensor → one value per group) and ``expand``
    (one value per group → elementwise), with ``ts`` per group. ``work``: two scratch tensors
    shaped like ``a`` (allocated when None).

    Newton's method on φ(μ) = 1/N(μ) − 1/ts_g: φ increases and is concave (Cauchy–Schwarz:
    (Σ a/x³)² ≤ Σ a/x² · Σ a/x⁴), so from any point left of the root the iterates rise
    monotonically, and quadratically, to it. The start μ0 = max(0, ‖F^½d‖/ts − F̄), with F̄ the
    a-weighted mean of F over the group, is such a point (Jensen: 1/(μ + F)² is convex in F, so
    N(μ) ≥ ‖F^½d‖/(μ + F̄)), and the root itself when F is constant over the group. A bracket
    [lo, hi] with φ(lo) ≤ 0 ≤ φ(hi), from [0, ‖F^½d‖/ts], is kept: a step that rounding would
    send outside it is replaced by bisection. The iteration stops when, for every group, the
    last step was below ½·(4 ulp)^½ of μ (convergence being quadratic, the error left after
    it is of the order of 4 ulp), or N(μ) = ts holds to 32 ulp (the level of rounding in N
    summed over a group; near the zero threshold, where μ is tiny, the steps relative to μ
    stay at that noise): a handful of iterations (at most 9 in float64 on the tests' cases with
    F over 1e-8 .. 1e4, at most 4 on a ResNet-50 step in float32), where bisection on log λ
    took 64."""
    if group_sum is None:
        group_sum, expand = (lambda x: x.sum(dim=1)), (lambda m: m.unsqueeze(1))
    mu, lo, hi = _newton_start(group_sum(a), group_sum(a * f), ts)
    r, v = work if work is not None else (torch.empty_like(a), torch.empty_like(a))
    for _ in range(max_iterations):
        torch.add(f, expand(mu), out=r)  # μ + F
        s2 = group_sum(torch.div(a, r, out=v).div_(r))
        s3 = group_sum(v.div_(r))
        mu, lo, hi, done = _newton_update(mu, lo, hi, s2, s3, ts)
        if bool(done.all()):
            break
    return mu


def _newton_start(sum_a: Tensor, sum_af: Tensor, ts) -> tuple[Tensor, Tensor, Tensor]:
    """The start μ0 = max(0, ‖F^½d‖/ts − F̄) of :func:`_fisher_prox_mu` and its bracket
    [lo, hi] = [0, ‖F^½d‖/ts], from the group sums Σ a and Σ a·F (μ0 = 0 where d = 0)."""
    hi = sum_a.sqrt() / ts
    mu = (hi - sum_af / sum_a.clamp_min(torch.finfo(sum_a.dtype).tiny)).clamp_min(0)
    return mu, torch.zeros_like(hi), hi


def _newton_update(mu: Tensor, lo: Tensor, hi: Tensor, s2: Tensor, s3: Tensor, ts) -> tuple[Tensor, ...]:
    """One safeguarded Newton step of :func:`_fisher_prox_mu` per group, from the group sums
    s2 = Σ a/(μ + F)² and s3 = Σ a/(μ + F)³ at μ: the new μ, the new bracket, and which groups
    have converged (the stopping rule of :func:`_fisher_prox_mu`)."""
    eps = torch.finfo(mu.dtype).eps
    n = s2.sqrt()
    left = n > ts
    lo = torch.where(left, mu, lo)
    hi = torch.where(left, hi, mu)
    new = mu + (n - ts) / ts * s2 / s3
    new = torch.where((new >= lo) & (new <= hi), new, (lo + hi) / 2)  # also when NaN (0/0)
    # converged: the step is small enough for the next one to be below rounding, or the
    # equation holds to rounding (near the zero threshold, where μ is tiny, its relative steps
    # stay at the noise of N − ts)
    done = ((new - mu).abs() <= 0.5 * math.sqrt(4 * eps) * new) | ((n - ts).abs() <= 32 * eps * ts)
    return new, lo, hi, done


#: Whether :meth:`GroupLassoSPFisher.prox_` runs its native kernel on the CPU
#: (``spbench/csrc/fisher_group_prox.cpp``: the same Newton solve one group at a time, the group
#: held in the cache from its first pass to its last; several times faster than the torch
#: operations, which make a pass over the whole tensor per operation): ``"auto"`` where its
#: tensors of groups hold at least :data:`NATIVE_MIN_ELEMENTS` elements (a network whose steps
#: amortise building the kernel, about a minute once per machine, see :mod:`spbench.native`),
#: ``"always"``, or ``"never"`` (the torch operations). Where the kernel cannot be built (no C++
#: compiler) a warning says so, once, and the torch operations are used. Both agree to rounding.
NATIVE = "auto"
NATIVE_MIN_ELEMENTS = 1 << 20


def _tensors_of_rows(params: list[Tensor], refs: list[Tensor], fishers: list[Tensor]) -> list[tuple[Tensor, ...]]:
    """The (parameter, w0, F) triples whose groups are rows of several elements (two or more
    dimensions, not empty): those of the Newton solve; 1-D tensors have a closed form."""
    return [(p, w0, f) for p, w0, f in zip(params, refs, fishers) if p.ndim >= 2 and p.numel()]


def _native_kernel(multi: list[tuple[Tensor, ...]], t: float):
    """The native module to run the proximal map of threshold ``t`` on these (parameter, w0, F)
    triples of the CPU (:data:`NATIVE`), or None. It takes float32 and float64, t > 0."""
    if NATIVE not in ("auto", "always", "never"):
        raise ValueError(f"spbench.penalties.NATIVE must be 'auto', 'always' or 'never', not {NATIVE!r}")
    if NATIVE == "never" or not multi or not t > 0 or multi[0][0].dtype not in (torch.float32, torch.float64):
        return None
    if NATIVE == "auto" and sum(p.numel() for p, _, _ in multi) < NATIVE_MIN_ELEMENTS:
        return None
    from . import native

    return native.load()


def _in_dense_rows_order(p: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """``p`` and tensors of its shape, as views whose dimensions after the first are in the
    order under which ``p`` is contiguous, where one exists (each row, a group, then a dense
    block: a channels_last kernel's [O, kh, kw, I]); else as they are. A group's proximal map
    does not depend on the order of its elements, so the row paths can read these views in
    place instead of copying."""
    order = (0, *sorted(range(1, p.ndim), key=lambda d: -p.stride(d)))
    if not p.permute(order).is_contiguous():
        order = tuple(range(p.ndim))
    return tuple(t.permute(order) for t in (p, *others))


def _fisher_prox_native_(kernel, p: Tensor, w0: Tensor, f: Tensor, t: float, max_iterations: int = 100) -> None:
    """The proximal map of :class:`GroupLassoSPFisher` on one tensor (two or more dimensions,
    any layout), in place, by the native kernel (which takes contiguous [rows, K] tensors:
    a tensor that is not is copied, and p written back)."""
    rows = p.detach().contiguous()
    kernel.fisher_group_prox_(rows.view(p.shape[0], -1), _groups(w0.contiguous()), _groups(f.contiguous()),
                              t, max_iterations)
    if rows.data_ptr() != p.data_ptr():
        p.copy_(rows)


def _fisher_group_prox_rows(d: Tensor, f: Tensor, t: float) -> Tensor:
    """:func:`_fisher_group_prox` for one tensor, its groups as rows (the CPU path)."""
    return _fisher_prox_rows_add(None, d, f, t)


def _fisher_prox_rows_add(
    base: Tensor | None,
    d: Tensor,
    f: Tensor,
    t: float,
    out: Tensor | None = None,
    work: Tensor | None = None,
    floor_checked: bool = False,
) -> Tensor:
    """``base + u`` with u the proximal map of :func:`_fisher_group_prox_rows` at d (u alone
    when ``base`` is None), written into ``out`` (contiguous, not overlapping d) if given.
    ``work``: scratch space of at least 3·d.numel() elements (allocated when None);
    ``floor_checked``: the caller knows that F ≥ 1e-30 everywhere (else F is floored there).
    Only the groups that the zero test leaves nonzero go through the iteration; the others
    are copied from ``base`` (or set to 0)."""
    if out is None:
        out = torch.empty_like(d, memory_format=torch.contiguous_format)
    rows, out_rows = _groups(d), _groups(out)
    if t == 0 or not rows.numel():
        return out.copy_(d) if base is None else torch.add(base, d, out=out)
    fr = _groups(f)
    if not floor_checked and bool(fr.min() < 1e-30):
        fr = fr.clamp_min(1e-30)
    n = rows.numel()
    if work is None or work.numel() < 3 * n:
        work = torch.empty(3 * n, dtype=d.dtype, device=d.device)
    sq, r, v = (work[i * n : (i + 1) * n].view(rows.shape) for i in range(3))
    ts = t * math.sqrt(rows.shape[1])
    torch.mul(rows, rows, out=sq)
    live = (torch.div(sq, fr, out=v).sum(dim=1) > ts * ts).nonzero().squeeze(1)  # the others: u = 0
    n_live, n_rows = live.numel(), rows.shape[0]
    if n_live < n_rows:
        if not n_live:
            return out.zero_() if base is None else out.copy_(base)
        rows, fr, sq, r, v = rows[live], fr[live], sq[live], r[:n_live], v[:n_live]
    mu = _fisher_prox_mu(sq.mul_(fr), fr, ts, work=(r, v)).unsqueeze(1)
    ratio = torch.div(mu, torch.add(fr, mu, out=r), out=r)  # μ/(μ + F)
    if n_live < n_rows:
        out.zero_() if base is None else out.copy_(base)
        out_rows.index_add_(0, live, torch.mul(rows, ratio, out=v))
    elif base is None:
        torch.mul(rows, ratio, out=out_rows)
    else:
        torch.addcmul(_groups(base), rows, ratio, out=out_rows)
    return out


def _fisher_prox_single(diffs: list[Tensor], fishers: list[Tensor], t: float) -> list[Tensor]:
    """:func:`_fisher_group_prox` for tensors whose groups have one element, in closed form:
    u = d·max(0, 1 − t·F^½/|d|) (the root μ = F^½|d|/t − F of the one-term equation; zero when
    d²/F ≤ t²), all tensors together by ``torch._foreach_*`` calls."""
    if t == 0:
        return [x.clone() for x in diffs]
    shrink = torch._foreach_clamp_min(fishers, 1e-30)
    torch._foreach_sqrt_(shrink)
    torch._foreach_mul_(shrink, -t)
    torch._foreach_div_(shrink, torch._foreach_abs(diffs))
    torch._foreach_add_(shrink, 1.0)
    torch._foreach_clamp_min_(shrink, 0.0)
    return torch._foreach_mul(shrink, diffs)


def _fisher_group_prox(diffs: list[Tensor], fishers: list[Tensor], t: float) -> list[Tensor]:
    """argmin_u ½‖u − d‖² + t·s_g·(Σ F u²)^½ for every group of every tensor (one device and
    dtype): u_j = d_j/(1 + λF_j) = μ d_j/(μ + F_j), with μ = 1/λ > 0 solving
    λ·(Σ F u(λ)²)^½ = t·s_g (:func:`_fisher_prox_mu`); u = 0 when Σ d²/F ≤ (t·s_g)². All
    groups are solved together as segments of one flat vector, so that an iteration costs a
    few kernels, not a few per tensor (on an accelerator; on the CPU
    :func:`_fisher_group_prox_rows` per tensor is faster)."""
    if t == 0:
        return [x.clone() for x in diffs]
    rows = [_groups(d) for d in diffs]
    dev, dtype = diffs[0].device, diffs[0].dtype
    d = torch.cat([r.reshape(-1) for r in rows])
    f = torch.cat([_groups(x).reshape(-1) for x in fishers]).clamp_min(1e-30)
    counts = [r.shape[0] for r in rows]
    gid = torch.cat([
        torch.arange(c, device=dev).repeat_interleave(r.shape[1]) + offset
        for c, r, offset in zip(counts, rows, [sum(counts[:i]) for i in range(len(counts))])
    ])
    n_groups = sum(counts)
    ts = torch.cat([torch.full((r.shape[0],), t * math.sqrt(r.shape[1]), dtype=dtype, device=dev) for r in rows])

    def segment_sum(values: Tensor) -> Tensor:
        return torch.zeros(n_groups, dtype=dtype, device=dev).index_add_(0, gid, values)

    zero = segment_sum(d * d / f) <= ts * ts
    mu = _fisher_prox_mu(f * d * d, f, ts, segment_sum, lambda m: m[gid])
    mu = mu.masked_fill_(zero, 0)[gid]
    u = d * mu / (mu + f)
    out, start = [], 0
    for x in diffs:
        out.append(u[start : start + x.numel()].view(x.shape))
        start += x.numel()
    return out


def make_penalty(
    name: str,
    inherited: Mapping[str, nn.Parameter],
    head: Mapping[str, nn.Parameter],
    *,
    alpha: float,
    beta: float,
    fisher: Mapping[str, Tensor] | None = None,
    variant: str = "smooth",
    eps: float = 1e-3,
) -> Penalty:
    """Build the registered penalty ``name``. Build it before the first optimizer step:
    the reference ``w0`` is the parameters' value at that moment. ``variant`` and ``eps``
    concern the non-smooth penalties only (see :class:`NonSmoothSP`)."""
    try:
        cls = PENALTIES[name]
    except KeyError:
        raise ValueError(f"unknown penalty {name!r} (known: {sorted(PENALTIES)})") from None
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    kwargs = {"variant": variant, "eps": eps} if issubclass(cls, NonSmoothSP) else {}
    return cls(inherited, head, alpha=alpha, beta=beta, fisher=fisher if cls.uses_fisher else None, **kwargs)
