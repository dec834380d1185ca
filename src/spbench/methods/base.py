"""The one interface every fine-tuning method implements, and its registry.

A method is an :class:`torch.nn.Module` built once per run, before the first optimizer step,
from a :class:`MethodContext` (the model, its parameter groups, the frozen source network,
the Fisher diagonal) and its hyper-parameters. It declares what it needs (:class:`Needs`) and
implements what applies of five hooks, which :func:`spbench.train.training_step` calls in
this fixed order:

1. ``setup(data)``: once, before step 0, on the target's training images (``needs.setup``);
2. forward: the model's backbone and head, with the outputs of :attr:`Method.taps` recorded,
   and, with ``needs.teacher``, one no-grad forward of the frozen source network;
3. ``loss(out)``: a loss term on those outputs, added to the cross-entropy;
4. backward, unscale (mixed precision), then ``add_grad_()``: a gradient term added in place
   (the parameter penalties), then clipping and the optimizer step;
5. ``prox_(lr)``: a proximal step after the optimizer step;

and, once training is over, ``finalize_()``: a change of the trained weights before they are
evaluated (WiSE-FT's interpolation). A hyper-parameter that only ``finalize_`` reads is
declared ``post_hoc``: runs that differ only in it share one training (a validation run
trains once and scores every listed value; :func:`spbench.pipeline.finetune_run`).

Methods compose: ``"lp_ft+l2_sp"`` names the method whose hooks are those of ``lp_ft`` then
those of ``l2_sp`` (:func:`method_class`), with the union of their hyper-parameters.

``retention_head()`` names the head that Table 3 puts on the fine-tuned backbone to score
the source task (by default the original source head).

State (starting point ``w0``, Fisher diagonal, the frozen teacher, learned statistics) is
registered in the module (buffers and submodules), so ``.to()``, ``state_dict()`` and
checkpoints carry it. The teacher stays in eval mode whatever ``train()`` is called with,
and never requires gradients.

Adding a method is one subclass plus one :func:`register` line; a package outside this
repository registers one through the ``spbench.methods`` entry-point group
(:func:`load_plugins`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor, nn

__all__ = [
    "HParam",
    "Needs",
    "MethodContext",
    "SetupData",
    "Forward",
    "Method",
    "METHODS",
    "ENTRY_POINT_GROUP",
    "register",
    "load_plugins",
    "method_class",
    "make_method",
    "full_precision",
    "frozen_copy",
    "record_outputs",
    "eval_mode",
    "compose",
    "post_hoc_names",
]

log = logging.getLogger(__name__)

#: The entry-point group through which other packages register methods.
ENTRY_POINT_GROUP = "spbench.methods"


@dataclass(frozen=True)
class HParam:
    """One hyper-parameter of a method: its name, type, default and closed range."""

    name: str
    kind: type = float  # float or int
    default: float | int = 0.0
    low: float = 0.0
    high: float = math.inf
    doc: str = ""
    #: Read only after training (by :meth:`Method.finalize_`): runs that differ only in it
    #: share one training.
    post_hoc: bool = False

    def __post_init__(self):
        if self.kind not in (float, int):
            raise TypeError(f"hyper-parameter {self.name!r}: kind must be float or int, not {self.kind!r}")
        if not self.name.isidentifier() or self.name in ("lr", "steps"):
            raise ValueError(f"hyper-parameter name {self.name!r} must be an identifier other than 'lr' and "
                             "'steps' (the training's own keys of a setting)")
        self.check(self.default)

    def check(self, value: Any) -> float | int:
        """``value`` as this hyper-parameter's type; ValueError when it is of the wrong type
        (a bool, a string, a float for an int), not finite, or outside [low, high]."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{self.name} must be a number, not {value!r}")
        if self.kind is int:
            if not isinstance(value, int):
                raise ValueError(f"{self.name} must be an integer, not {value!r}")
        elif not math.isfinite(value):
            raise ValueError(f"{self.name} must be finite, not {value!r}")
        if not self.low <= value <= self.high:
            raise ValueError(f"{self.name} must lie in [{self.low}, {self.high}], not {value!r}")
        return self.kind(value)


@dataclass(frozen=True)
class Needs:
    """What a method needs from the run, beyond the model and the target batch.

    ``fisher``: the source's Fisher diagonal (``MethodContext.fisher``). ``teacher``: the frozen
    source network's outputs on every batch (one no-grad forward per step). ``source_model``:
    the source network itself (for a set-up pass or a copy of its head), without a per-step
    forward. ``taps``: intermediate feature maps at the named layers of :attr:`Method.taps`.
    ``setup``: a pass over the target's training images before step 0. ``parameters``: extra
    trainable parameters of its own (:meth:`Method.extra_parameters`), stepped with the model's.
    """

    fisher: bool = False
    teacher: bool = False
    source_model: bool = False
    taps: bool = False
    setup: bool = False
    parameters: bool = False


@dataclass
class MethodContext:
    """What a method is built from: the classifier being fine-tuned, its trainable parameter
    groups (S: inherited and in scope; S̄: the new head; see
    :func:`spbench.models.split_parameters`), the frozen source network ``source_model``
    (backbone and its own source head), the Fisher diagonal restricted to S, and the
    protocol's options for the non-smooth penalties."""

    model: nn.Module
    inherited: Mapping[str, nn.Parameter]
    head: Mapping[str, nn.Parameter]
    source_model: nn.Module | None = None
    fisher: Mapping[str, Tensor] | None = None
    nonsmooth: str = "smooth"
    epsilon: float = 1e-3


@dataclass
class SetupData:
    """The target's training images for a set-up pass: ``x`` (a tensor or a cached view that
    ``x[idx]`` batches), labels ``y``, the batch size to read them in, their device."""

    x: Any
    y: Tensor
    batch_size: int
    device: torch.device

    def batches(self):
        """``(x_batch, y_batch)`` over the whole set, in order."""
        for start in range(0, len(self.y), self.batch_size):
            idx = torch.arange(start, min(start + self.batch_size, len(self.y)))
            yield self.x[idx].to(self.device), self.y[idx].to(self.device)


@dataclass
class Forward:
    """One batch's forward pass as a method's ``loss`` sees it: inputs and labels, the backbone
    features ``g(x)`` [B, D], the new head's logits ``h(g(x))``, the outputs of the tapped
    layers (name -> tensor), and the frozen teacher's logits and taps (``needs.teacher``)."""

    x: Tensor
    y: Tensor
    features: Tensor
    logits: Tensor
    taps: dict[str, Tensor] = field(default_factory=dict)
    teacher_logits: Tensor | None = None
    teacher_taps: dict[str, Tensor] = field(default_factory=dict)


class Method(nn.Module):
    """Base of every fine-tuning method (module docstring). Subclasses set ``name``,
    ``hparams`` and ``needs``, and override the hooks that apply; the defaults do nothing."""

    name: ClassVar[str]
    hparams: ClassVar[tuple[HParam, ...]] = ()
    needs: ClassVar[Needs] = Needs()

    def __init__(self, context: MethodContext, **hparams: Any):
        super().__init__()
        self.settings = self.resolve_hparams(hparams)
        self._model = [context.model]  # a list: the model is the run's, not this module's state
        self._inherited = list(context.inherited.values())
        self._head = list(context.head.values())
        self.taps: tuple[str, ...] = ()
        if (self.needs.teacher or self.needs.source_model) and context.source_model is None:
            raise ValueError(f"method {self.name!r} needs the source network")
        if self.needs.fisher and context.fisher is None:
            raise ValueError(f"method {self.name!r} needs a Fisher diagonal")
        if self.needs.teacher:
            self.teacher = frozen_copy(context.source_model)

    @classmethod
    def resolve_hparams(cls, given: Mapping[str, Any]) -> dict[str, float | int]:
        """The full setting: every declared hyper-parameter, given or default, checked."""
        known = {h.name: h for h in cls.hparams}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"method {cls.name!r} has no hyper-parameter {unknown[0]!r} (known: {sorted(known)})")
        return {n: h.check(given[n]) if n in given else h.default for n, h in known.items()}

    def __getattr__(self, name: str):
        settings = self.__dict__.get("settings")
        if settings is not None and name in settings:
            return settings[name]
        return super().__getattr__(name)

    # -- hooks ----------------------------------------------------------------------------------
    def setup(self, data: SetupData) -> None:
        """Once, before step 0 (``needs.setup``)."""

    def loss(self, out: Forward) -> Tensor | None:
        """A loss term on the batch's forward outputs, added to the cross-entropy (None: none)."""
        return None

    @torch.no_grad()
    def add_grad_(self) -> None:
        """Add a gradient term to the parameters' ``.grad`` in place, after backward."""

    @torch.no_grad()
    def prox_(self, lr: float) -> None:
        """A proximal step on the parameters after the optimizer step at learning rate ``lr``."""

    @property
    def has_prox_step(self) -> bool:
        """Whether :meth:`prox_` does anything: only then does an fp16 training step find out
        (waiting for the device) whether the scaler skipped the optimizer step."""
        return type(self).prox_ is not Method.prox_

    @torch.no_grad()
    def finalize_(self) -> None:
        """After the last step, before evaluation: change the trained weights in place (reading
        only the ``post_hoc`` hyper-parameters; :func:`spbench.pipeline.finetune_run` restores
        the trained weights between the values it scores)."""

    def retention_head(self) -> nn.Module | None:
        """The head Table 3 scores the source task with (None: the original source head)."""
        return None

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the method's own (``needs.parameters``)."""
        return [p for p in self.parameters() if p.requires_grad]

    # -- helpers --------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The frozen source network on ``x``: its source-head logits and the outputs of
        :attr:`taps` (eval mode, no autograd)."""
        with record_outputs(self.teacher, self.taps) as taps:
            logits = self.teacher(x)
        return logits, dict(taps)

    def train(self, mode: bool = True) -> "Method":
        super().train(mode)
        if "teacher" in self._modules:
            self._modules["teacher"].eval()  # the teacher's batch norms keep the source statistics
        return self

    def describe(self) -> dict[str, Any]:
        """What is worth logging at start: the setting and which tensors the method touches."""
        return {
            "method": self.name,
            **self.settings,
            "n_inherited_tensors": len(self._inherited),
            "n_inherited_elements": sum(p.numel() for p in self._inherited),
            "n_head_tensors": len(self._head),
            "n_head_elements": sum(p.numel() for p in self._head),
            "n_method_parameters": sum(p.numel() for p in self.extra_parameters()),
        }


def full_precision(t: Tensor) -> Tensor:
    """``t`` in float32 when it is a half-precision tensor (autocast outputs), else as it is
    (float64 stays float64): losses and their reductions are not computed in 16 bits."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Context manager: ``module`` in eval mode inside the block; afterwards every submodule's
    own train/eval flag is restored (frozen units may differ from the rest)."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes.items():
            m.training = training


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` in eval mode whose parameters require no gradient."""
    out = copy.deepcopy(module)
    out.eval()
    out.requires_grad_(False)
    return out


class record_outputs:
    """Context manager: forward hooks that store the outputs of the named submodules of
    ``model`` in a dict (name -> tensor) while active."""

    def __init__(self, model: nn.Module, names: tuple[str, ...] | list[str]):
        self.model, self.names = model, list(names)
        self.outputs: dict[str, Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> dict[str, Tensor]:
        for name in self.names:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self.outputs

    def _hook(self, name: str):
        def store(module, inputs, output):
            self.outputs[name] = output

        return store

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


#: Method registry: name -> class. Entry points of :data:`ENTRY_POINT_GROUP` join it on the
#: first look-up through :func:`method_class` (or :func:`load_plugins`).
METHODS: dict[str, type[Method]] = {}
_PLUGINS_LOADED = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add ``cls`` to :data:`METHODS` under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"only Method subclasses can be registered, not {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.replace("_", "a").isalnum() or not name.islower():
        raise ValueError(f"method name {name!r} must be lower-case letters, digits and underscores")
    if METHODS.get(name, cls) is not cls:
        raise ValueError(f"method {name!r} registered twice")
    METHODS[name] = cls
    return cls


def load_plugins() -> list[str]:
    """Import every entry point of the ``spbench.methods`` group once; each names a
    :class:`Method` subclass (``pkg.module:Class``), registered under its ``name``. Returns the
    names added."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return []
    _PLUGINS_LOADED = True
    added = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as err:  # a broken plugin must not hide the others; say which one
            raise ImportError(f"spbench method plugin {ep.name!r} ({ep.value}) failed to load: {err}") from err
        if getattr(cls, "name", None) != ep.name:
            raise ValueError(f"spbench method plugin {ep.value}: entry point {ep.name!r} names a class "
                             f"whose name is {getattr(cls, 'name', None)!r}")
        if ep.name not in METHODS:
            register(cls)
            added.append(ep.name)
            log.debug("method %s registered from %s", ep.name, ep.value)
    return added


def method_class(name: str) -> type[Method]:
    """The registered method ``name`` (plugins included), or the composition of registered
    methods that ``a+b+…`` names (:func:`compose`); ValueError naming the known ones."""
    if "+" in name:
        return compose(*name.split("+"))
    if name not in METHODS:
        load_plugins()
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r} (known: {sorted(METHODS)})") from None


def post_hoc_names(name: str) -> tuple[str, ...]:
    """The ``post_hoc`` hyper-parameters of method ``name``."""
    return tuple(h.name for h in method_class(name).hparams if h.post_hoc)


_COMPOSITES: dict[tuple[str, ...], type[Method]] = {}


def compose(*names: str) -> type[Method]:
    """The method whose hooks are those of the registered methods ``names``, in that order:
    ``setup``, ``loss`` (the terms added), ``add_grad_``, ``prox_`` and ``finalize_`` of each
    part in turn; the retention head of the first part that has one. Its name is the parts'
    joined by ``+`` (``lp_ft+l2_sp``), its hyper-parameters the union of theirs (two parts
    sharing a name are refused: a setting must say whose it is), its needs the union of
    theirs. At most one part may use the frozen teacher's forward pass (its taps)."""
    key = tuple(names)
    if key in _COMPOSITES:
        return _COMPOSITES[key]
    if len(names) < 2 or any("+" in n or not n for n in names):
        raise ValueError(f"a composed method names two or more methods joined by '+', not {'+'.join(names)!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"method {'+'.join(names)!r} names a part twice")
    parts = [method_class(n) for n in names]
    seen: dict[str, str] = {}
    for cls in parts:
        for h in cls.hparams:
            if h.name in seen:
                raise ValueError(f"method {'+'.join(names)!r}: {seen[h.name]!r} and {cls.name!r} both have the "
                                 f"hyper-parameter {h.name!r}")
            seen[h.name] = cls.name
    teachers = [cls.name for cls in parts if cls.needs.teacher or cls.needs.taps]
    if len(teachers) > 1:
        raise ValueError(f"method {'+'.join(names)!r}: {teachers} all read the teacher's forward pass; "
                         "at most one part may")
    needs = Needs(**{f: any(getattr(cls.needs, f) for cls in parts) for f in Needs.__dataclass_fields__})
    cls = type(f"Composed_{'_'.join(names)}", (Composite,), {
        "name": "+".join(names),
        "part_classes": tuple(parts),
        "hparams": tuple(h for part in parts for h in part.hparams),
        "needs": needs,
        "__doc__": f"{' then '.join(names)}, composed (:func:`compose`).",
        "__module__": __name__,
    })
    _COMPOSITES[key] = cls
    return cls


class Composite(Method):
    """Several methods' hooks in turn (:func:`compose` builds the subclasses)."""

    part_classes: ClassVar[tuple[type[Method], ...]] = ()

    def __init__(self, context: MethodContext, **hparams: Any):
        nn.Module.__init__(self)  # the parts own their state (a teacher among it): not Method.__init__
        self.settings = self.resolve_hparams(hparams)
        self._model = [context.model]
        self._inherited = list(context.inherited.values())
        self._head = list(context.head.values())
        self.parts = nn.ModuleList(
            [cls(context, **{h.name: self.settings[h.name] for h in cls.hparams}) for cls in self.part_classes])
        self.taps = tuple(dict.fromkeys(t for part in self.parts for t in part.taps))

    def _sync(self) -> None:
        """The parts read their hyper-parameters from their own settings: pass them on (a
        post-hoc value may have been changed on the composite)."""
        for part in self.parts:
            part.settings.update({n: self.settings[n] for n in part.settings})

    def teacher_forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        part = next(p for p in self.parts if p.needs.teacher)
        return part.teacher_forward(x)

    def setup(self, data: SetupData) -> None:
        for part in self.parts:
            if part.needs.setup:
                part.setup(data)

    def loss(self, out: Forward) -> Tensor | None:
        terms = [t for t in (part.loss(out) for part in self.parts) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    @torch.no_grad()
    def add_grad_(self) -> None:
        for part in self.parts:
            part.add_grad_()

    @torch.no_grad()
    def prox_(self, lr: float) -> None:
        for part in self.parts:
            part.prox_(lr)

    @property
    def has_prox_step(self) -> bool:
        return any(part.has_prox_step for part in self.parts)

    @torch.no_grad()
    def finalize_(self) -> None:
        self._sync()
        for part in self.parts:
            part.finalize_()

    def retention_head(self) -> nn.Module | None:
        return next((h for h in (part.retention_head() for part in self.parts) if h is not None), None)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in self.parts:
            out.update(part.describe())
        return {**out, **super().describe()}


def make_method(name: str, context: MethodContext, **hparams: Any) -> Method:
    """Build the registered method ``name`` on ``context`` with its hyper-parameters (the
    others take their defaults). Build it before the first optimizer step: reference state
    such as ``w0`` is taken from the parameters at that moment."""
    return method_class(name)(context, **hparams)
