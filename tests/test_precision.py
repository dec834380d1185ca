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
    """A loss term that turns every gradient inf, and a proximal step that counts itself."""

    name = "inf_loss"
    needs = Needs()

    def __init__(self, context):
        super().__init__(context)
        self.prox_calls = 0
        self.register_buffer("state", torch.arange(3.0))

    def loss(self, out: Forward):
        return out.logits.float().sum() * float("inf")

    def prox_(self, lr):
        self.prox_calls += 1
        self.state.add_(1.0)


def test_a_skipped_inf_step_leaves_weights_momentum_and_method_state_untouched():
    model = build_model("demo_resnet", 3, 1)
    inherited, head = split_parameters(model)
    method = InfLoss(MethodContext(model, inherited, head))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0])
    # one good step first, so that momentum buffers exist
    good = make_method("none", MethodContext(model, inherited, head))
    training_step(model, good, x, y, opt, lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    momentum = {id(p): opt.state[p]["momentum_buffer"].clone() for p in model.parameters() if p in opt.state}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    training_step(model, method, x, y, opt, lr=0.1, scaler=scaler, precision=Precision("fp16", "cpu"))
    assert scaler.get_scale() < 2.0**8  # it backed off: the step was found inf and skipped
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    for p in model.parameters():
        if id(p) in momentum:
            assert torch.equal(opt.state[p]["momentum_buffer"], momentum[id(p)])
    assert method.prox_calls == 0 and torch.equal(method.state, torch.arange(3.0))


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
