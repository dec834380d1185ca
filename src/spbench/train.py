"""Training: pretraining a source network, fine-tuning with a method, evaluation.

One step (:func:`training_step`) runs the method's hooks in a fixed order: forward with the
method's taps (and the frozen teacher's no-grad forward when the method needs it) →
cross-entropy + the method's loss term → backward → unscale (with a gradient scaler) →
``method.add_grad_()`` (a penalty's gradient, added in place) → clip (optional) → optimizer
step → ``method.prox_(lr)``; one optimizer step per iteration.

Preemption: :class:`StopOnSignal` turns SIGTERM into a flag that :func:`train_steps` checks
after each step; it then hands its state (:func:`train_state`) to a ``save_checkpoint``
callback and raises :class:`Preempted`. Given that state back (``resume=``), it continues on
the same trajectory: the batch order is replayed from the seeded generator, the optimizer
(momentum) and the RNG states are restored.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from .augment import to_device
from .integrity import load_sealed, save_sealed
from .methods import Forward, Method, MethodContext, SetupData, eval_mode, make_method, record_outputs
from .models import Classifier, build_model, split_parameters
from .progress import Progress

__all__ = [
    "PRECISIONS",
    "Precision",
    "resolve_precision",
    "lr_at",
    "set_train_mode",
    "batch_indices",
    "evaluate",
    "training_step",
    "sgd",
    "train_steps",
    "TrainHistory",
    "Preempted",
    "StopOnSignal",
    "pretrain",
    "save_source",
    "load_source",
    "set_determinism",
]

log = logging.getLogger(__name__)


def set_determinism(seed: int, threads: int | None = None) -> None:
    """Seed torch's global RNG and fix the thread count (CPU kernels give the same numbers
    for the same thread count); cuDNN is told to pick deterministic kernels.

    ``torch.use_deterministic_algorithms`` is not called: it imports the compiler stack
    (about 1.7 s per process), which a short fine-tune job cannot afford.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


#: ``finetune.precision`` values: fp32, bf16 or fp16 autocast (float32 master weights), or auto.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    """How a run computes: ``name`` (fp32 | bf16 | fp16) on ``device_type``. Mixed precision
    autocasts the forward pass and the loss (training and evaluation) to ``dtype``; weights,
    their gradients, the optimizer state and the methods' in-place terms stay float32. fp16
    scales the loss (:meth:`scaler`)."""

    name: str = "fp32"
    device_type: str = "cpu"

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self):
        """The autocast context of this precision (a no-op for fp32)."""
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def scaler(self):
        """A gradient scaler for fp16 (bf16 and fp32 need none): None otherwise."""
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None


def resolve_precision(name: str, device: torch.device) -> Precision:
    """``auto``: bf16 on a GPU that supports it, else fp32 (the CPU included: asked-for bf16
    autocast works there too, but is slower than fp32 on most CPUs). fp16 needs a GPU."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {name!r}")
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError("fp16 needs a GPU (use bf16 on the CPU)")
    return Precision(name, device.type)


def lr_at(step: int, total: int, base: float, schedule: str = "cosine", milestones: list[int] | None = None) -> float:
    """Learning rate of step ``step`` (0-based) out of ``total``.

    ``cosine``: base·½(1 + cos(π·step/total)), decaying to 0 (the demo's protocol);
    ``step``: base divided by 10 at each milestone (the paper: ÷10 after 6000 of 9000);
    ``constant``: base.
    """
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * step / total))
    if schedule == "step":
        return base * 0.1 ** sum(step >= m for m in (milestones or []))
    if schedule == "constant":
        return base
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def set_train_mode(model: Classifier, freeze: int, bn_mode: str) -> None:
    """Train mode, except batch norms that must keep their statistics: those of frozen
    units, and all of them when ``bn_mode == 'eval'``."""
    if bn_mode not in ("train", "eval"):
        raise ValueError(f"bn_mode must be 'train' or 'eval', not {bn_mode!r}")
    model.train()
    fixed = model.freeze_units()[:freeze] if bn_mode == "train" else [model.backbone]
    for unit in fixed:
        for m in unit.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def batch_indices(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Indices of ``steps`` mini-batches: successive epochs of seeded permutations, each batch
    ``min(batch_size, n)`` images (the whole set when it is smaller)."""
    b = min(batch_size, n)
    perm, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + b > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        yield perm[pos : pos + b]
        pos += b


def _take(data: Any, idx: Tensor, on_device: dict) -> Any:
    """``data[idx]`` for a batch's indices (a CPU tensor). On an accelerator tensor the indices
    go over once per device (kept in ``on_device``), from pinned memory and without blocking,
    so that indexing does not make the host wait for the device (a plain CPU index would)."""
    if isinstance(data, Tensor) and data.device.type != "cpu":
        if data.device not in on_device:
            on_device[data.device] = to_device(idx, data.device)
        return data[on_device[data.device]]
    return data[idx]


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512, precision: Precision | None = None) -> float:
    """Top-1 accuracy of ``model`` in eval mode (every submodule's mode is restored), under
    ``precision``'s autocast (the training's). The count of correct predictions stays on the
    device until the end (one transfer, not one per batch)."""
    correct = torch.zeros((), dtype=torch.long, device=y.device)
    precision = precision or Precision()
    with eval_mode(model):
        for start in range(0, len(x), batch_size):
            with precision.autocast():
                logits = model(x[start : start + batch_size])
            correct += (logits.argmax(dim=1) == y[start : start + batch_size]).sum()
    return int(correct) / len(x)


@dataclass
class TrainHistory:
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: float = 0.0
    images: int = 0


class Preempted(RuntimeError):
    """Training stopped on request (SIGTERM) after saving a checkpoint; rerun to resume."""


class StopOnSignal:
    """Context manager: while active, the given signals (SIGTERM by default: what a scheduler
    sends before it preempts or cancels a job) set a flag instead of killing the process.
    Calling the object returns the flag; :func:`train_steps` takes it as ``stop=``.

    Outside the main thread (where handlers cannot be installed) it does nothing.
    """

    def __init__(self, *signals: int):
        self.signals = signals or (signal.SIGTERM,)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def training_step(
    model: Classifier,
    method: Method,
    x: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    lr: float,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
    scaler=None,
    clip_grad_norm: float | None = None,
    precision: Precision | None = None,
) -> Tensor:
    """One optimizer step on J(w) + the method's terms, in the order of the module docstring.

    ``precision``: the forward pass, the cross-entropy and the method's loss term run under its
    autocast; the backward pass, the method's in-place gradient term, clipping, the step and
    the proximal step in float32. ``scaler``: a :class:`torch.amp.GradScaler` (fp16) or None;
    when it finds an inf or NaN gradient it skips the optimizer step, and the proximal step is
    skipped with it (weights, momentum and the method's state stay as they were).
    ``clip_grad_norm``: the largest total gradient norm (None: no clipping), applied after the
    method's gradient term, over the parameters the optimizer steps. Returns the
    cross-entropy (detached).
    """
    precision = precision or Precision()
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        with record_outputs(model, method.taps) as taps:
            features = model.backbone(x)
            logits = model.head(features)
        out = Forward(x, y, features, logits, taps=taps)
        if method.needs.teacher:
            out.teacher_logits, out.teacher_taps = method.teacher_forward(x)
        loss = loss_fn(logits, y)
        extra = method.loss(out)
        total = loss if extra is None else loss + extra
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    method.add_grad_()
    if clip_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    if scaler is None:
        optimizer.step()
        method.prox_(lr)  # proximal variants only: forward-backward splitting
        return loss.detach().float()
    # reading the scale waits for the device: only when a proximal step must know of a skip
    before = scaler.get_scale() if method.has_prox_step else None
    scaler.step(optimizer)
    scaler.update()
    if before is not None and scaler.get_scale() >= before:  # the scale drops exactly when the step was skipped
        method.prox_(lr)
    return loss.detach().float()


def sgd(params: list[Tensor], *, lr: float, momentum: float) -> torch.optim.SGD:
    """SGD with momentum; on CUDA its fused kernel (one launch for all the tensors, and with
    fp16's gradient scaler no wait for the device to learn whether the step was skipped)."""
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, fused=fused or None)


def train_steps(
    model: Classifier,
    method: Method,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    schedule: str = "cosine",
    milestones: list[int] | None = None,
    freeze: int = 0,
    bn_mode: str = "train",
    generator: torch.Generator,
    log_every: int = 50,
    on_step: Callable[[int, float], None] | None = None,
    resume: Mapping[str, Any] | None = None,
    save_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_every: int = 0,
    stop: Callable[[], bool] | None = None,
    setup_x: Any = None,
    precision: Precision | None = None,
    clip_grad_norm: float | None = None,
    progress: str | None = None,
) -> TrainHistory:
    """SGD with momentum on J(w) plus the method's terms (:func:`training_step`), over the
    model's trainable parameters and the method's own (:meth:`Method.extra_parameters`).

    Before step 0 (not on resume, whose checkpoint holds the method's state) the method's
    set-up pass runs on ``setup_x`` (default ``x``; an augmenting view should pass its central
    crops), ``y`` when it declares one.
    ``generator`` must be in the state it had when the run began (it draws the batch order).
    ``resume``: a state from ``save_checkpoint`` (weights, momentum, history, RNG states);
    training continues at its step. ``save_checkpoint(state)`` is
    called every ``checkpoint_every`` steps (0: never) and when ``stop()`` turns true, after
    which :class:`Preempted` is raised. ``precision`` (default fp32) and ``clip_grad_norm`` go
    to every :func:`training_step`; fp16's gradient scaler is checkpointed with the rest.
    ``progress``: the name under which a :class:`spbench.progress.Progress` counts the steps
    (a log line each tenth with the time left, a bar on a terminal); None: only ``log_every``.
    The losses are read from the device every ``log_every`` steps (50 when 0), before a
    checkpoint and at the end, or every step when ``on_step`` is given; the bar shows the last
    one read, and a non-finite loss raises :class:`FloatingPointError` (naming its step) when
    it is read.
    """
    precision = precision or Precision()
    scaler = precision.scaler()
    params = [p for p in model.parameters() if p.requires_grad] + method.extra_parameters()
    opt = sgd(params, lr=lr, momentum=momentum)
    history = TrainHistory()
    first = 0
    if resume is not None:
        first = int(resume["step"])
        model.load_state_dict(resume["model"])
        method.load_state_dict(resume["method"])
        opt.load_state_dict(resume["optimizer"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        history = TrainHistory(**resume["history"])
    elif method.needs.setup:
        device = next(model.parameters()).device
        method.setup(SetupData(x if setup_x is None else setup_x, y, batch_size=max(batch_size, 64), device=device))
    set_train_mode(model, freeze, bn_mode)
    method.train()
    start = time.perf_counter() - history.seconds
    # The losses stay on the device until read, a batch of steps at a time (a log line, a
    # checkpoint, the end): reading one forces the host to wait for the device, which on an
    # accelerator would stall every step. ``on_step`` is handed each value at its step, so
    # with it they are read every step.
    every = 1 if on_step is not None else max(1, log_every or 50)
    pending: list[tuple[int, float, Tensor]] = []

    def read_losses() -> float | None:
        """Append the pending losses to the history (one transfer); raises FloatingPointError
        at the first non-finite one. Returns the last value (None when nothing was pending)."""
        if not pending:
            return None
        values = torch.stack([t for _, _, t in pending]).tolist()
        for (step, rate, _), value in zip(pending, values):
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss is {value} at step {step} (learning rate or α too large?)")
            history.loss.append(value)
            history.lr.append(rate)
        last = pending[-1]
        pending.clear()
        if log_every and (last[0] % log_every == 0 or last[0] == steps - 1):
            log.info("step %d/%d  loss %.4f  lr %.3g", last[0] + 1, steps, values[-1], last[1])
        return values[-1]

    loss_shown: float | None = None
    with (Progress(steps, progress, unit="steps", start=first) if progress else contextlib.nullcontext()) as bar:
        for step, idx in enumerate(batch_indices(len(x), batch_size, steps, generator)):
            if step < first:  # replay the batch order up to the checkpoint
                if step == first - 1:
                    # The replayed generator must stand where the checkpointed one stood.
                    if not torch.equal(generator.get_state(), resume["generator"]):
                        raise ValueError("checkpoint does not match this run's batch generator")
                    torch.set_rng_state(resume["torch_rng"])
                continue
            rate = lr_at(step, steps, lr, schedule, milestones)
            moved: dict = {}
            loss = training_step(model, method, _take(x, idx, moved), _take(y, idx, moved), opt, lr=rate,
                                 scaler=scaler, clip_grad_norm=clip_grad_norm, precision=precision)
            pending.append((step, rate, loss))
            history.images += len(idx)
            if step % every == 0 or step == steps - 1:
                loss_shown = read_losses()
                if on_step is not None:
                    on_step(step, loss_shown)
            if bar is not None:
                bar.update(1, **({} if loss_shown is None else {"loss": loss_shown}))
            if step == steps - 1 or save_checkpoint is None:
                continue
            stopping = stop is not None and stop()
            if stopping or (checkpoint_every and (step + 1) % checkpoint_every == 0):
                read_losses()  # a non-finite loss raises here, before its weights are saved
                history.seconds = time.perf_counter() - start
                state = train_state(step + 1, model, method, opt, history, generator)
                if scaler is not None:
                    state["scaler"] = scaler.state_dict()
                save_checkpoint(state)
                if stopping:
                    log.warning("stopped at step %d/%d on request; checkpoint saved", step + 1, steps)
                    raise Preempted(f"training stopped at step {step + 1} of {steps}; rerun to resume")
    read_losses()
    history.seconds = time.perf_counter() - start
    return history


def train_state(step: int, model: nn.Module, method: Method, opt: torch.optim.Optimizer, history: TrainHistory,
                generator: torch.Generator) -> dict[str, Any]:
    """What :func:`train_steps` needs to continue after ``step`` steps: weights (with batch-norm
    statistics), the method's state (reference weights, its own parameters), optimizer state
    (momentum), history, batch generator and global RNG states."""
    return {
        "step": step,
        "model": model.state_dict(),
        "method": method.state_dict(),
        "optimizer": opt.state_dict(),
        "history": {"loss": list(history.loss), "lr": list(history.lr), "seconds": history.seconds, "images": history.images},
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
    }


def pretrain(
    arch: str,
    x: Tensor,
    y: Tensor,
    num_classes: int,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
) -> tuple[Classifier, TrainHistory]:
    """Train ``arch`` from scratch on a source task (the demo's stand-in for ImageNet
    pretraining): SGD momentum 0.9, cosine schedule, weight decay as an L2 penalty."""
    set_determinism(seed)
    model = build_model(arch, num_classes, x.shape[1])
    inherited, head = split_parameters(model)
    decay = make_method("l2", MethodContext(model, inherited, head), alpha=weight_decay, beta=weight_decay)
    steps = epochs * math.ceil(len(x) / min(batch_size, len(x)))
    gen = torch.Generator().manual_seed(seed)
    history = train_steps(model, decay, x, y, steps=steps, batch_size=batch_size, lr=lr, generator=gen,
                          progress=f"pretrain {arch}")
    return model, history


def save_source(path, model: Classifier, *, arch: str, in_channels: int, meta: dict) -> str:
    """A source checkpoint: the whole classifier (backbone and its own source head), sealed
    with its content digest (:mod:`spbench.integrity`), which is returned."""
    return save_sealed(path, {
        "state_dict": model.state_dict(),
        "arch": arch,
        "num_classes": model.head.out_features,
        "in_channels": in_channels,
        "meta": meta,
    })


def load_source(path) -> tuple[Classifier, dict]:
    """Rebuild a source classifier from :func:`save_source`'s file (weights only), after
    checking its digest; the blob's ``content_sha256`` is that digest."""
    blob, digest = load_sealed(path, with_digest=True)
    model = build_model(blob["arch"], blob["num_classes"], blob["in_channels"])
    model.load_state_dict(blob["state_dict"])
    return model, {**blob, "content_sha256": digest}
