"""The paper's seven parameter penalties (SPEC §2) as methods.

Each wraps the penalty of :mod:`spbench.penalties` (its kernels, its float64 tests) unchanged:
the gradient term ``add_grad_`` and, for the proximal variants, ``prox_``. Hyper-parameters:
``alpha`` on the inherited tensors S, ``beta`` on the new head S̄ (``none`` has neither). The
smoothing and the proximal variant of ``l1_sp``, ``gl_sp`` and ``gl_sp_fisher`` are protocol
options (``finetune.nonsmooth``, ``finetune.epsilon``) shared by all runs of a config.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .. import penalties as _penalties
from .base import HParam, Method, MethodContext, Needs, register

__all__ = ["PenaltyMethod", "ALPHA", "BETA", "penalty_method"]

ALPHA = HParam("alpha", float, 0.01, doc="weight α of the penalty on the inherited tensors S")
BETA = HParam("beta", float, 0.01, doc="weight β of the L2 penalty on the new head S̄ (the paper: 0.01)")


class PenaltyMethod(Method):
    """A parameter penalty Ω(w) (the wrapped class's docstring gives its formula)."""

    penalty_class: ClassVar[type[_penalties.Penalty]]

    def __init__(self, context: MethodContext, **hparams: Any):
        super().__init__(context, **hparams)
        cls = self.penalty_class
        options = {}
        if issubclass(cls, _penalties.NonSmoothSP):
            options = {"variant": context.nonsmooth, "eps": context.epsilon}
        weights = {"alpha": self.settings.get("alpha", 0.0), "beta": self.settings.get("beta", 0.0)}
        self.penalty = cls(context.inherited, context.head, **weights,
                           fisher=context.fisher if cls.uses_fisher else None, **options)

    def add_grad_(self) -> None:
        self.penalty.add_grad_()

    def prox_(self, lr: float) -> None:
        self.penalty.prox_(lr)

    @property
    def has_prox_step(self) -> bool:
        return self.penalty.has_prox_step

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **self.penalty.describe(), "method": self.name}


def penalty_method(cls: type[_penalties.Penalty]) -> type[PenaltyMethod]:
    """The method class of a registered penalty class."""
    return type(
        f"{cls.__name__}Method",
        (PenaltyMethod,),
        {
            "name": cls.name,
            "penalty_class": cls,
            "hparams": () if cls.name == "none" else (ALPHA, BETA),
            "needs": Needs(fisher=cls.uses_fisher),
            "__doc__": cls.__doc__,
            "__module__": __name__,
        },
    )


# One registry line per penalty: the paper's seven, in the order of its tables.
for _cls in _penalties.PENALTIES.values():
    register(penalty_method(_cls))
