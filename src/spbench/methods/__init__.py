"""Fine-tuning methods: one interface (:class:`Method`), one registry (:data:`METHODS`).

Families, one module each: :mod:`.penalties` (the paper's seven parameter penalties),
:mod:`.distill` (LwF and Co-Tuning: a trainable copy of the source head kept close to the
source network's outputs), :mod:`.features` (DELTA and BSS: terms on the backbone's features),
:mod:`.robust` (SPD, FTP, LP-FT, WiSE-FT: L2-SP's descendants that stay near the starting
point by a selective decay, a learned projection, a head fitted first, an interpolation).
Methods compose: ``lp_ft+l2_sp`` (:func:`compose`).
Other packages add methods through the ``spbench.methods`` entry-point group.
"""

from .base import (
    ENTRY_POINT_GROUP,
    METHODS,
    Composite,
    Forward,
    HParam,
    Method,
    MethodContext,
    Needs,
    SetupData,
    compose,
    eval_mode,
    frozen_copy,
    full_precision,
    load_plugins,
    make_method,
    method_class,
    post_hoc_names,
    record_outputs,
    register,
)
from . import penalties as _penalties  # noqa: F401  (registers the seven penalties)
from . import distill as _distill  # noqa: F401
from . import features as _features  # noqa: F401
from . import robust as _robust  # noqa: F401

__all__ = [
    "ENTRY_POINT_GROUP",
    "METHODS",
    "Composite",
    "Forward",
    "HParam",
    "Method",
    "MethodContext",
    "Needs",
    "SetupData",
    "compose",
    "eval_mode",
    "frozen_copy",
    "full_precision",
    "load_plugins",
    "make_method",
    "method_class",
    "post_hoc_names",
    "record_outputs",
    "register",
]
