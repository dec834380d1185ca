"""The method interface: the step's hook order, every registered method on the demo network
and on a torchvision ResNet-18 (a few CPU steps, checkpoint -> resume), registered state,
hyper-parameter checks."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from spbench.methods import METHODS, Forward, HParam, Method, MethodContext, Needs, make_method, method_class
from spbench.models import build_model, split_parameters
from spbench.train import Preempted, train_steps, training_step

ALL = sorted(METHODS) + ["lp_ft+l2_sp", "wise_ft+lwf"]  # and two compositions (one with a teacher)


def _source(arch: str, classes: int, channels: int) -> nn.Module:
    torch.manual_seed(1)
    src = build_model(arch, classes, channels)
    src.eval()
    return src


def _context(src: nn.Module, arch: str, channels: int, *, classes: int = 3, seed: int = 0) -> MethodContext:
    torch.manual_seed(seed)
    model = build_model(arch, classes, channels)
    model.backbone.load_state_dict(src.backbone.state_dict())
    inherited, head = split_parameters(model)
    gen = torch.Generator().manual_seed(5)
    fisher = {n: torch.rand(p.shape, generator=gen) + 0.5 for n, p in inherited.items()}
    return MethodContext(model, inherited, head, source_model=src, fisher=fisher)


# --------------------------------------------------------------------------- order of one step


class Recording(Method):
    """Logs each hook; its loss and gradient terms are real, so that the order matters."""

    name = "recording"
    needs = Needs(teacher=True)

    def __init__(self, context, events):
        super().__init__(context)
        self.events = events
        self.taps = ("backbone.stage1",)

    def loss(self, out: Forward):
        assert set(out.taps) == {"backbone.stage1"} and set(out.teacher_taps) == {"backbone.stage1"}
        assert out.teacher_logits is not None and not out.teacher_logits.requires_grad
        self.events.append("loss")
        return out.logits.pow(2).mean() * 1e-3

    def add_grad_(self):
        head = self._head[0]
        assert head.grad is not None, "add_grad_ must follow backward"
        self.events.append(("add_grad", float(head.grad.abs().sum())))

    def prox_(self, lr):
        self.events.append("prox")


class RecordingScaler:
    """A gradient scaler that scales by 4 and logs its calls (GradScaler's interface)."""

    def __init__(self, events):
        self.events = events

    def scale(self, loss):
        self.events.append("scale")
        return loss * 4

    def unscale_(self, optimizer):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(4)
        self.events.append("unscale")

    def step(self, optimizer):
        self.events.append("step")
        optimizer.step()

    def update(self):
        self.events.append("update")

    def get_scale(self):
        return 4.0


def test_step_runs_the_hooks_in_the_documented_order(monkeypatch):
    """forward (with taps and the teacher) -> loss -> backward -> unscale -> add_grad_ -> clip
    -> step -> prox_; the method sees the unscaled gradient."""
    events: list = []
    src = _source("demo_resnet", 7, 1)
    ctx = _context(src, "demo_resnet", 1)
    method = Recording(ctx, events)
    model = ctx.model
    model.backbone.register_forward_hook(lambda *a: events.append("forward"))
    method.teacher.backbone.register_forward_hook(lambda *a: events.append("teacher"))
    real_backward = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: (events.append("backward"),
                                                                          real_backward(self, *a, **k))[1])
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm, **k: (
        events.append("clip"), real_clip(params, max_norm, **k))[1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0])
    training_step(model, method, x, y, opt, lr=0.1, scaler=RecordingScaler(events), clip_grad_norm=1e9)
    names = [e if isinstance(e, str) else e[0] for e in events]
    assert names == ["forward", "teacher", "loss", "scale", "backward", "unscale", "add_grad", "clip", "step",
                     "update", "prox"]
    # the gradient the method saw is the unscaled one: rerun without the scaler
    events2: list = []
    ctx2 = _context(src, "demo_resnet", 1)
    method2 = Recording(ctx2, events2)
    training_step(ctx2.model, method2, x, y, torch.optim.SGD(ctx2.model.parameters(), lr=0.1), lr=0.1)
    seen = [e[1] for e in events if isinstance(e, tuple)][0]
    seen2 = [e[1] for e in events2 if isinstance(e, tuple)][0]
    assert seen == pytest.approx(seen2, rel=1e-5)


def test_teacher_stays_frozen_in_eval_mode_and_is_registered_state():
    src = _source("demo_resnet", 7, 1)
    method = make_method("lwf", _context(src, "demo_resnet", 1))
    method.train()
    assert not method.teacher.training and all(not m.training for m in method.teacher.modules())
    assert all(not p.requires_grad for p in method.teacher.parameters())
    keys = method.state_dict().keys()
    assert any(k.startswith("teacher.") for k in keys) and any(k.startswith("source_head.") for k in keys)
    assert method.to(torch.float64).teacher.head.weight.dtype == torch.float64
    # the trainable copy is a copy: training it leaves the source head alone
    assert method.source_head.weight.data_ptr() != src.head.weight.data_ptr()
    assert {id(p) for p in method.extra_parameters()} == {id(p) for p in method.source_head.parameters()}


def test_hyper_parameters_are_checked_and_defaulted():
    cls = method_class("lwf")
    assert cls.resolve_hparams({}) == {"lambda": 1.0, "temperature": 2.0}
    assert cls.resolve_hparams({"lambda": 3}) == {"lambda": 3.0, "temperature": 2.0}
    for bad in ({"lambda": -1.0}, {"lambda": float("nan")}, {"lambda": "1"}, {"lambda": True}, {"tau": 1.0}):
        with pytest.raises(ValueError):
            cls.resolve_hparams(bad)
    with pytest.raises(ValueError, match="integer"):
        method_class("bss").resolve_hparams({"k": 2.0})
    with pytest.raises(ValueError, match="unknown method"):
        method_class("lwff")
    with pytest.raises(ValueError):
        HParam("lr")  # the learning rate is the protocol's, not a method's


def test_every_registered_method_declares_a_docstring_with_its_formula():
    """Its objective (a Ω or CE term) or its update rule, set off as an indented equation."""
    for name, cls in METHODS.items():
        doc = cls.__doc__ or ""
        assert "Ω" in doc or "CE" in doc or re.search(r"\n {8}\S.* = ", doc), name
        for h in cls.hparams:
            h.check(h.default)


# --------------------------------------------------------------------------- registry smoke test

SMOKE = [("demo_resnet", 1, 16), ("resnet18", 3, 32)]


@pytest.mark.parametrize("arch,channels,size", SMOKE, ids=[a for a, _, _ in SMOKE])
@pytest.mark.parametrize("name", ALL)
def test_every_method_trains_and_resumes_to_the_same_weights(name, arch, channels, size):
    """A few CPU steps; a run stopped at step 2 (checkpoint) and resumed in a fresh model and
    method ends with the same weights and method state as the uninterrupted run."""
    torch.set_num_threads(1)
    src = _source(arch, 5, channels)
    x = torch.randn(12, channels, size, size, generator=torch.Generator().manual_seed(2))
    y = torch.arange(12) % 3
    kw = dict(steps=4, batch_size=6, lr=0.01, log_every=0)

    def run(**extra):
        ctx = _context(src, arch, channels)
        method = make_method(name, ctx)
        torch.manual_seed(9)
        history = train_steps(ctx.model, method, x, y, generator=torch.Generator().manual_seed(3), **kw, **extra)
        return ctx.model, method, history

    model, method, history = run()
    assert len(history.loss) == 4 and all(torch.isfinite(torch.tensor(history.loss)))
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, dict(src.named_parameters()).get(n, p))]
    assert moved, "training moved no inherited parameter"

    saved = []
    with pytest.raises(Preempted, match="rerun to resume"):
        run(save_checkpoint=saved.append, stop=lambda: not saved)
    state = copy.deepcopy(saved[0])
    assert state["step"] == 1 and "method" in state
    resumed_model, resumed_method, resumed = run(resume=state)
    assert resumed.loss == pytest.approx(history.loss, abs=0, rel=0)
    for (n, a), (_, b) in zip(model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), n
    for (n, a), (_, b) in zip(method.state_dict().items(), resumed_method.state_dict().items()):
        assert torch.equal(a, b), n


def test_parameter_penalties_need_no_extra_forward():
    """None of the seven penalties asks for the frozen network's forward; the methods that
    need it ask for one (the step runs it once)."""
    for name, cls in METHODS.items():
        if name in ("none", "l2", "l2_sp", "l2_sp_fisher", "l1_sp", "gl_sp", "gl_sp_fisher"):
            assert not cls.needs.teacher and not cls.needs.taps, name
    assert METHODS["lwf"].needs.teacher and METHODS["delta"].needs.teacher
    assert not METHODS["bss"].needs.teacher and not METHODS["co_tuning"].needs.teacher


def test_teacher_forward_runs_once_per_step():
    src = _source("demo_resnet", 7, 1)
    ctx = _context(src, "demo_resnet", 1)
    method = make_method("delta", ctx)
    calls = []
    method.teacher.register_forward_hook(lambda *a: calls.append(1))
    opt = torch.optim.SGD(ctx.model.parameters(), lr=0.01)
    training_step(ctx.model, method, torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0]), opt, lr=0.01)
    assert len(calls) == 1
