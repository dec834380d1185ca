"""``finetune.compile``: the backbone compiled by ``torch.compile`` (inductor, on the CPU here)
trains as the eager one does, for every method the config accepts with it, and a fine-tune
job runs with it; methods that record feature maps by forward hooks are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from method_cases import method_cases, trainee
from spbench.config import ConfigError, RunSpec, validate_config
from spbench.methods import METHODS, MethodContext, make_method
from spbench.models import build_model, compile_backbone, split_parameters
from spbench.train import training_step

REPO = Path(__file__).resolve().parents[1]
CASES = method_cases(name for name in sorted(METHODS) if not METHODS[name].needs.taps)


def train(name: str, nonsmooth: str, compiled: bool, steps: int = 3):
    """``steps`` training steps of ``name`` on the demo network from a fixed start: the losses,
    the parameters before and after them, and the model."""
    model, method, optimizer = trainee(name, nonsmooth)
    if compiled:
        compile_backbone(model)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 16, 16, generator=gen), torch.arange(8) % 3
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = [float(training_step(model, method, x, y, optimizer, lr=0.05)) for _ in range(steps)]
    return losses, start, {n: p.detach().clone() for n, p in model.named_parameters()}, model


@pytest.mark.parametrize("name,nonsmooth", CASES)
def test_a_compiled_backbone_trains_as_the_eager_one(name, nonsmooth):
    eager_losses, start, eager, _ = train(name, nonsmooth, compiled=False)
    losses, _, params, model = train(name, nonsmooth, compiled=True)
    assert model.backbone._compiled_call_impl is not None  # the compiled forward is the one called
    assert set(model.state_dict()) == set(build_model("demo_resnet", 3, 1).state_dict())  # keys unchanged
    # the same steps, to float32 rounding (inductor fuses and reorders: not bit for bit)
    assert losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    moved = max(float((eager[n] - w).abs().max()) for n, w in start.items() if n.startswith("backbone."))
    assert moved > 1e-3  # the steps moved the backbone by far more than the tolerance below
    for n in eager:
        torch.testing.assert_close(params[n], eager[n], rtol=1e-3, atol=1e-4)


def test_a_compiled_backbone_trains_under_bf16_autocast():
    """The GPU's default precision, on the CPU: the compiled backbone's losses follow the eager
    ones to bf16 rounding (inductor compiles the autocast regions too)."""
    from spbench.train import Precision, train_steps

    def losses(compiled: bool) -> list[float]:
        torch.manual_seed(0)
        model = build_model("demo_resnet", 3, 1)
        inherited, head = split_parameters(model)
        method = make_method("l2_sp", MethodContext(model, inherited, head), alpha=0.1, beta=0.01)
        if compiled:
            compile_backbone(model)
        x, y = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(3)), torch.arange(16) % 3
        return train_steps(model, method, x, y, steps=6, batch_size=8, lr=0.05, log_every=0,
                           generator=torch.Generator().manual_seed(1), precision=Precision("bf16", "cpu")).loss

    eager, compiled = losses(False), losses(True)
    assert eager[-1] < eager[0] - 0.3  # it trains: the tolerance below is far smaller than the change
    assert compiled == pytest.approx(eager, abs=2e-2)


def test_a_compiled_backbone_computes_with_the_weights_loaded_into_it():
    """A resumed run and WiSE-FT's interpolated variants load weights into the compiled model:
    its compiled code reads them (they are not baked in at compilation)."""
    model = compile_backbone(build_model("demo_resnet", 3, 1).eval())
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        before = model(x)
        state = {k: v * 0.5 if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        eager = build_model("demo_resnet", 3, 1).eval()
        eager.load_state_dict(state)
        torch.testing.assert_close(model(x), eager(x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(model(x), before, atol=1e-3)


def test_the_config_refuses_compile_with_a_method_that_records_feature_maps():
    raw = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    raw["finetune"]["compile"] = True
    validate_config(raw)  # tiny.yaml's methods record none
    taps = sorted(name for name in METHODS if METHODS[name].needs.taps)
    assert taps  # DELTA
    raw["grid"]["methods"][taps[0]] = {}
    with pytest.raises(ConfigError, match=f"finetune.compile.*{taps[0]}.*forward hooks"):
        validate_config(raw)
    raw["finetune"]["compile"] = "yes"
    with pytest.raises(ConfigError, match="finetune.compile"):
        validate_config(raw)


def test_a_fine_tune_job_runs_with_a_compiled_backbone(tmp_path, caplog):
    """finetune_run with compile: true trains, evaluates (the eval mode compiles again) and
    writes its record; the run is another run than the eager one (its config differs) and
    ends with the eager run's accuracy to rounding."""
    from spbench import pipeline
    from test_protocol import prepare_tiny

    raw = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    raw["finetune"].update(steps=3, batch_size=8)
    eager_config = validate_config(raw)
    raw["finetune"]["compile"] = True
    config = validate_config(raw)
    src = prepare_tiny(config, tmp_path)
    spec = RunSpec("digits-src", "digits-mod3-k5", "l2_sp", {"alpha": 0.1, "beta": 0.01, "lr": 0.01}, 1, 0)
    paths = dict(source_model=src / "model.pt", source_info=src / "info.json",
                 target_dir=tmp_path / "data" / "digits-mod3-k5", source_dir=tmp_path / "data" / "digits-src")
    caplog.set_level("INFO", logger="spbench")
    record, _ = pipeline.finetune_run(config, spec, record_out=tmp_path / "compiled.json", **paths)
    assert "backbone compiled" in caplog.text
    eager, _ = pipeline.finetune_run(eager_config, spec, record_out=tmp_path / "eager.json", **paths)
    assert pipeline.run_config(config, spec) != pipeline.run_config(eager_config, spec)
    assert record["steps"] == eager["steps"] == 3
    assert record["test_accuracy"] == pytest.approx(eager["test_accuracy"], abs=1.5 / record["n_test"])
