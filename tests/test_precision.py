"""Mixed precision: bf16 autocast on the CPU trains with float32 master weights and gradients;
a gradient scaler that finds an inf skips the step and the proximal step (weights, momentum
and the method's state untouched); the precision resolves as documented."""

from __future__ import annotations

import pytest
import torch

from spbench.methods import Forward, Method, MethodContext, Needs, make_method
from spbench.models import build_model, split_parameters
from spbench.train import Precision, resolve_precision, train_steps, training_step


def _setup(name="l2_sp", **hp):
    torch.manual_seed(0)
    model = build_model("demo_resnet", 3, 1)
    inherited, head = split_parameters(model)
    return model, make_method(name, MethodContext(model, inherited, head), **hp)


def test_bf16_on_the_cpu_keeps_float32_weights_and_trains():
    model, method = _setup()
    x, y = torch.randn(16, 1, 16, 16), torch.arange(16) % 3
    seen = []
    model.backbone.stage3.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    history = train_steps(model, method, x, y, steps=6, batch_size=8, lr=0.05, generator=torch.Generator().manual_seed(1),
                          precision=Precision("bf16", "cpu"), log_every=0)
    assert seen and set(seen) == {torch.bfloat16}  # the forward ran in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(history.loss)))
    assert history.loss[-1] < history.loss[0]
    assert method.penalty.w0[method.penalty.inherited_names[0]].dtype == torch.float32


class InfLoss(Method):
    """A loss term that turns every gradient inf (``inf=False``: a finite one), and a
    proximal step that counts itself."""

    name = "inf_loss"
    needs = Needs()

    def __init__(self, context, inf=True):
        super().__init__(context)
        self.prox_calls, self.factor = 0, float("inf") if inf else 1.0
        self.register_buffer("state", torch.arange(3.0))

    def loss(self, out: Forward):
        return out.logits.float().sum() * self.factor

    def prox_(self, lr):
        self.prox_calls += 1
        self.state.add_(1.0)


class InfLossNoProx(InfLoss):
    """The same loss term, no proximal step."""

    name = "inf_loss_no_prox"
    prox_ = Method.prox_


def _fp16_step(method_class, fused, inf=True, count_scale_reads=None):
    """One good step (so that momentum buffers exist), then one fp16 step of ``method_class``
    with a gradient scaler; returns the model's parameters and momentum before the second
    step, the model, optimizer, method and scaler."""
    model = build_model("demo_resnet", 3, 1)
    inherited, head = split_parameters(model)
    method = method_class(MethodContext(model, inherited, head), inf=inf)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=fused)
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0])
    training_step(model, make_method("none", MethodContext(model, inherited, head)), x, y, opt, lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    momentum = {id(p): opt.state[p]["momentum_buffer"].clone() for p in model.parameters() if p in opt.state}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    if count_scale_reads is not None:
        real = scaler.get_scale
        scaler.get_scale = lambda: count_scale_reads.append(1) or real()
    training_step(model, method, x, y, opt, lr=0.1, scaler=scaler, precision=Precision("fp16", "cpu"))
    if count_scale_reads is not None:
        del scaler.get_scale
    return before, momentum, model, opt, method, scaler


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("method_class", [InfLoss, InfLossNoProx], ids=["prox", "no-prox"])
def test_a_skipped_inf_step_leaves_weights_momentum_and_method_state_untouched(method_class, fused):
    """Also with the fused SGD kernel (CUDA's, run here on the CPU), which skips the step on
    the scaler's inf flag without the host reading it."""
    before, momentum, model, opt, method, scaler = _fp16_step(method_class, fused)
    assert scaler.get_scale() < 2.0**8  # it backed off: the step was found inf and skipped
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert momentum
    for p in model.parameters():
        if id(p) in momentum:
            assert torch.equal(opt.state[p]["momentum_buffer"], momentum[id(p)])
    assert method.prox_calls == 0 and torch.equal(method.state, torch.arange(3.0))


def test_only_a_method_with_a_proximal_step_reads_the_scale():
    """Reading the scale waits for the device; a finite step of a method without a proximal
    step does not read it (and does step), one with a proximal step reads it and takes it."""
    reads = []
    before, _, model, _, method, _ = _fp16_step(InfLossNoProx, True, inf=False, count_scale_reads=reads)
    assert not method.has_prox_step and reads == []
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    before, _, model, _, method, _ = _fp16_step(InfLoss, True, inf=False, count_scale_reads=reads)
    assert method.has_prox_step and len(reads) == 2 and method.prox_calls == 1
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_which_methods_take_a_proximal_step():
    """The proximal variants of the non-smooth penalties (with α > 0), the projections of
    SPD and FTP, and a composition with one of them; not the smooth penalties or LP-FT."""
    model = build_model("demo_resnet", 3, 1)
    inherited, head = split_parameters(model)
    smooth, prox = (MethodContext(model, inherited, head, nonsmooth=v) for v in ("smooth", "prox"))
    takes = {name: make_method(name, ctx).has_prox_step for name, ctx in [
        ("none", smooth), ("l2_sp", prox), ("lp_ft", smooth), ("l1_sp", prox), ("gl_sp", prox), ("spd", smooth),
        ("ftp", smooth), ("lp_ft+l1_sp", prox)]}
    assert takes == {"none": False, "l2_sp": False, "lp_ft": False, "gl_sp": True, "spd": True, "ftp": True,
                     "lp_ft+l1_sp": True, "l1_sp": True}
    assert not make_method("l1_sp", smooth).has_prox_step
    assert not make_method("l1_sp", prox, alpha=0.0).has_prox_step


def test_resolve_precision():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu).name == "fp32"
    assert resolve_precision("bf16", cpu) == Precision("bf16", "cpu")
    assert Precision("fp32").dtype is None and Precision("fp16", "cuda").dtype == torch.float16
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", gpu)
    assert Precision("fp16", "cpu").scaler() is not None and Precision("bf16", "cuda").scaler() is None
