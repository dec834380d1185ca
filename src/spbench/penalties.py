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
            self.fisher = TensorStore({n: fisher[n].to(p) for n, p in inherited.items()})

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

        ``foreach=None`` picks the ``torch._foreach_*`` path; ``False`` the per-tensor loop,
        which is the reference the fast path is tested against.
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
        # fast on a CPU as forming w − w0 first (same value up to rounding).
        lists = (self._inherited, [p.grad for p in self._inherited], self.w0.values())
        for params, grads, refs in _group_by_device_dtype(*lists):
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
            diff = torch._foreach_sub(params, refs)
            torch._foreach_addcmul_(grads, fishers, diff, value=self.alpha)


# -- the non-smooth -SP penalties (paper eqs. 5-6) ---------------------------------------------------

VARIANTS = ("smooth", "prox")


def _groups(t: Tensor) -> Tensor:
    """A tensor as rows of groups (SPEC §2): one row per output channel of a tensor of two or
    more dimensions (its fan-in: kernel height × width × input depth); one row per element
    of a 1-D tensor (batch-norm scale and shift, biases)."""
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
        """argmin_u ½‖u − d‖² + t·R(u) for one tensor."""
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

    @torch.no_grad()
    def prox_(self, lr: float) -> None:
        if self.variant != "prox" or not self.alpha:
            return
        t = lr * self.alpha
        for p, w0, f in zip(self._inherited, self.w0.values(), self._fishers()):
            p.copy_(w0 + self._prox(p - w0, t, f))


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

    def _prox(self, d, t, f):
        return torch.sign(d) * torch.clamp(d.abs() - t, min=0)


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

    def _prox(self, d, t, f):
        rows = _groups(d)
        norms = rows.norm(dim=1, keepdim=True)
        threshold = t * math.sqrt(rows.shape[1])
        scale = torch.clamp(1 - threshold / norms.clamp_min(torch.finfo(d.dtype).tiny), min=0)
        return (rows * scale).reshape(d.shape)


@register
class GroupLassoSPFisher(GroupLassoSP):
    """Ω(w) = α Σ_g s_g (Σ_{j∈Gg} F_jj (w_j − w0_j)²)^½ + β/2 ‖w_S̄‖² (eq. 6 with the Fisher
    metric). Smoothed as gl_sp, gradient α s_g F_j d_j / √(Σ F d² + ε²).
    Proximal map: u_j = d_j/(1 + λF_j), where λ > 0 solves λ‖F^½u(λ)‖ = lr·α·s_g (found by
    bisection on log λ), and u = 0 when Σ_j d_j²/F_j ≤ (lr·α·s_g)²."""

    name = "gl_sp_fisher"
    uses_fisher = True

    def _prox(self, d, t, f):
        return _fisher_group_prox_rows(d, f, t)

    @torch.no_grad()
    def prox_(self, lr: float) -> None:
        if self.variant != "prox" or not self.alpha:
            return
        lists = (self._inherited, self.w0.values(), self.fisher.values())
        for params, refs, fishers in _group_by_device_dtype(*lists):
            if params[0].device.type == "cpu":  # per tensor: no launch cost to save on the CPU
                for p, w0, f in zip(params, refs, fishers):
                    p.copy_(w0 + _fisher_group_prox_rows(p - w0, f, lr * self.alpha))
                continue
            diffs = torch._foreach_sub(params, refs)
            for p, w0, u in zip(params, refs, _fisher_group_prox(diffs, fishers, lr * self.alpha)):
                p.copy_(w0 + u)


def _fisher_group_prox_rows(d: Tensor, f: Tensor, t: float, iterations: int = 64) -> Tensor:
    """:func:`_fisher_group_prox` for one tensor, its groups as rows (the reference path)."""
    rows = _groups(d)
    fr = _groups(f).clamp_min(1e-30)
    ts = t * math.sqrt(rows.shape[1])
    zero = (rows.pow(2) / fr).sum(dim=1) <= ts * ts
    lo = torch.full((rows.shape[0], 1), -60.0, dtype=d.dtype, device=d.device)
    hi = torch.full_like(lo, 60.0)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lam = mid.exp()
        g = lam.squeeze(1) * torch.sqrt((fr * (rows / (1 + lam * fr)).pow(2)).sum(dim=1)) - ts
        up = (g > 0).unsqueeze(1)
        hi = torch.where(up, mid, hi)
        lo = torch.where(up, lo, mid)
    u = rows / (1 + ((lo + hi) / 2).exp() * fr)
    u[zero] = 0
    return u.reshape(d.shape)


def _fisher_group_prox(diffs: list[Tensor], fishers: list[Tensor], t: float, iterations: int = 64) -> list[Tensor]:
    """argmin_u ½‖u − d‖² + t·s_g·(Σ F u²)^½ for every group of every tensor (one device and
    dtype): u_j = d_j/(1 + λF_j) with λ > 0 solving λ·(Σ F u(λ)²)^½ = t·s_g, found by bisection
    on log λ over [e^-60, e^60] (64 halvings: below float64 resolution); u = 0 when
    Σ d²/F ≤ (t·s_g)². All groups are solved together as segments of one flat vector, so that
    an iteration costs a few kernels, not a few per tensor (on an accelerator; on the CPU
    :func:`_fisher_group_prox_rows` per tensor is faster)."""
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
    lo = torch.full((n_groups,), -60.0, dtype=dtype, device=dev)
    hi = torch.full_like(lo, 60.0)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lam = mid.exp()
        g = lam * torch.sqrt(segment_sum(f * (d / (1 + lam[gid] * f)).pow(2))) - ts
        up = g > 0
        hi = torch.where(up, mid, hi)
        lo = torch.where(up, lo, mid)
    u = d / (1 + ((lo + hi) / 2).exp()[gid] * f)
    u = torch.where(zero[gid], torch.zeros_like(u), u)
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
