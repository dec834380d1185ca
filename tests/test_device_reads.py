"""No method's training step makes the host wait for an accelerator: nothing in a step reads a
value back from the device (``.item()``, ``bool()`` of a tensor, a data-dependent shape), so
the host can queue the next steps while the device runs this one.

Checked on PyTorch's meta device, which holds shapes but no values: any read raises there.
Unlike the CPU, it takes the methods' accelerator code paths (foreach and flat kernels where
the CPU has its own loops and native kernels). ``benchmarks/cuda_check.py`` counts the real
synchronisations of the whole loop on a GPU."""

from __future__ import annotations

import pytest
import torch

from method_cases import method_cases, trainee
from spbench.methods import MethodContext, make_method
from spbench.models import build_model, split_parameters
from spbench.train import sgd, training_step

META = torch.device("meta")
#: gl_sp_fisher's proximal map solves each group's equation by a Newton iteration that stops
#: when every group has converged: it reads that flag at each iteration (a handful per step).
READS = {("gl_sp_fisher", "prox")}
CASES = method_cases()


def steps_on_meta(name: str, nonsmooth: str, steps: int = 3) -> None:
    """``steps`` training steps of ``name`` on the demo network, everything on the meta device
    (set-up state at its initial value: a set-up pass is not a step)."""
    model, method, optimizer = trainee(name, nonsmooth, META)
    x, y = torch.empty(8, 1, 16, 16, device=META), torch.zeros(8, dtype=torch.long, device=META)
    for _ in range(steps):
        loss = training_step(model, method, x, y, optimizer, lr=0.01)
    assert loss.device == META and all(p.device == META for p in model.parameters())


@pytest.mark.parametrize("name,nonsmooth", CASES)
def test_a_training_step_reads_nothing_back_from_the_device(name, nonsmooth):
    if (name, nonsmooth) in READS:
        with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
            steps_on_meta(name, nonsmooth)
    else:
        steps_on_meta(name, nonsmooth)


def test_a_loaded_ftp_reads_its_step_count_once():
    """FTP counts its steps on the host; a state loaded into it (a resumed run) is read once."""
    from spbench.methods.robust import FTP

    model = build_model("demo_resnet", 3, 1)
    inherited, head = split_parameters(model)
    ftp = make_method("ftp", MethodContext(model, inherited, head))
    assert isinstance(ftp, FTP) and ftp._steps == 0
    state = ftp.state_dict()
    state["steps_done"] = torch.tensor(7)
    ftp.load_state_dict(state)
    assert ftp._steps is None  # read at the next proximal step
    optimizer = sgd(list(model.parameters()), lr=0.01, momentum=0.9)
    x, y = torch.randn(4, 1, 16, 16), torch.arange(4) % 3
    training_step(model, ftp, x, y, optimizer, lr=0.01)
    assert ftp._steps == 8 and int(ftp.steps_done) == 8
