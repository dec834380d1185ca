"""Backbones, freezing by whole units, batch-norm modes and learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from spbench.models import ARCHITECTURES, apply_freeze, build_model, freeze_depth_count
from spbench.train import lr_at, set_train_mode

UNITS = ["stem", "stage1", "stage2", "stage3"]


def _bns(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("classes, channels", [(3, 1), (7, 3)])
def test_build_model_output_shape(arch, classes, channels):
    """build_model(arch, K, C) maps [N, C, H, W] images to [N, K] logits (32 px: ConvNeXt's smallest); backbone
    + head only."""
    torch.manual_seed(0)
    model = build_model(arch, classes, channels)
    out = model(torch.randn(5, channels, 32, 32))
    assert out.shape == (5, classes)
    assert all(n.startswith(("backbone.", "head.")) for n, _ in model.named_parameters())
    assert model.head.out_features == classes


@pytest.mark.parametrize("arch, expected", [
    ("demo_resnet", ["backbone.stage1.conv2", "backbone.stage2.conv2", "backbone.stage3.conv2"]),
    ("resnet18", [f"backbone.layer{i}.1.conv2" for i in range(1, 5)]),
    ("resnet50", [f"backbone.layer{i}.{n - 1}.conv3" for i, n in zip(range(1, 5), (3, 4, 6, 3))]),
])
def test_feature_layers_end_each_stage(arch, expected):
    """DELTA's feature maps: the last convolution of each stage, named from the classifier, in
    forward order; their outputs are [N, C, H, W] maps of the convolution's channels."""
    if arch not in ARCHITECTURES:
        pytest.skip(f"{arch} is not registered")
    torch.manual_seed(0)
    model = build_model(arch, 3, 3).eval()
    names = model.feature_layers()
    assert names == expected
    order = [n for n, _ in model.named_modules()]
    assert [order.index(n) for n in names] == sorted(order.index(n) for n in names)
    seen = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.shape))
             for n in names]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    for n in names:
        conv = model.get_submodule(n)
        assert isinstance(conv, nn.Conv2d) and seen[n][:2] == (2, conv.out_channels) and len(seen[n]) == 4


def test_unknown_architecture_raises():
    """An unknown architecture name is a ValueError naming the known ones."""
    with pytest.raises(ValueError, match="demo_resnet"):
        build_model("resnet9000", 3, 1)


def test_demo_resnet_has_four_freeze_units():
    """The demo network freezes by stem, stage1, stage2, stage3 (SPEC §8)."""
    assert freeze_depth_count("demo_resnet") == 4
    model = build_model("demo_resnet", 3, 1)
    assert model.freeze_units() == [getattr(model.backbone, u) for u in UNITS]


@pytest.mark.parametrize("depth", [0, 1, 2, 3, 4])
def test_apply_freeze_freezes_first_units(depth):
    """apply_freeze(model, d) freezes exactly the parameters of the first d units and returns
    their names; the later units and the head stay trainable."""
    model = build_model("demo_resnet", 3, 1)
    frozen = apply_freeze(model, depth)
    prefixes = tuple(f"backbone.{u}." for u in UNITS[:depth])
    expected = [n for n, _ in model.named_parameters() if prefixes and n.startswith(prefixes)]
    assert sorted(frozen) == sorted(expected)
    for n, p in model.named_parameters():
        assert p.requires_grad is (n not in expected), n
    if depth == 2:
        assert {n.split(".")[1] for n in frozen} == {"stem", "stage1"}


@pytest.mark.parametrize("depth", [-1, 5])
def test_apply_freeze_rejects_bad_depth(depth):
    """Freeze depths outside [0, number of units] are rejected."""
    with pytest.raises(ValueError):
        apply_freeze(build_model("demo_resnet", 3, 1), depth)


def test_set_train_mode_keeps_frozen_bn_in_eval():
    """bn_mode 'train' with freeze 2: the BNs of stem and stage1 stay in eval mode (their
    statistics are frozen), every other module is in train mode."""
    model = build_model("demo_resnet", 3, 1)
    model.eval()
    apply_freeze(model, 2)
    set_train_mode(model, 2, "train")
    frozen_bns = {id(m) for u in UNITS[:2] for m in _bns(getattr(model.backbone, u))}
    assert len(frozen_bns) == 3  # stem BN, stage1 bn1 and bn2
    for name, m in model.named_modules():
        assert m.training is (id(m) not in frozen_bns), name


def test_set_train_mode_freezes_bn_statistics():
    """A forward pass after set_train_mode(…, 2, 'train') leaves the frozen BNs' running
    statistics unchanged and updates the others."""
    torch.manual_seed(0)
    model = build_model("demo_resnet", 3, 1)
    apply_freeze(model, 2)
    set_train_mode(model, 2, "train")
    before = {n: b.clone() for n, b in model.named_buffers()}
    model(torch.randn(4, 1, 8, 8) + 3.0)
    for n, b in model.named_buffers():
        if n.endswith("running_mean"):
            changed = not torch.equal(b, before[n])
            assert changed is not n.startswith(("backbone.stem.", "backbone.stage1.")), n


@pytest.mark.parametrize("freeze", [0, 2])
def test_set_train_mode_eval_puts_all_backbone_bn_in_eval(freeze):
    """bn_mode 'eval': every batch norm of the backbone in eval mode, the rest in train mode."""
    model = build_model("demo_resnet", 3, 1)
    apply_freeze(model, freeze)
    set_train_mode(model, freeze, "eval")
    bns = {id(m) for m in _bns(model.backbone)}
    assert len(bns) == 9  # stem, 2 per block, 2 shortcut projections
    for name, m in model.named_modules():
        assert m.training is (id(m) not in bns), name
    with pytest.raises(ValueError):
        set_train_mode(model, freeze, "frozen")


@pytest.mark.parametrize(
    "step, total, expected",
    [(0, 100, 0.1), (25, 100, 0.1 * 0.5 * (1 + math.sqrt(0.5))), (50, 100, 0.05), (75, 100, 0.1 * 0.5 * (1 - math.sqrt(0.5))), (100, 100, 0.0)],
)
def test_lr_cosine(step, total, expected):
    """Cosine: base·½(1 + cos(π·step/total)), from base to 0."""
    assert lr_at(step, total, 0.1, "cosine") == pytest.approx(expected, abs=1e-15)


def test_lr_cosine_is_the_default_and_decreasing():
    """The default schedule is cosine, and it never increases."""
    rates = [lr_at(s, 200, 0.02) for s in range(200)]
    assert rates[0] == pytest.approx(0.02) and all(a >= b for a, b in zip(rates, rates[1:]))
    assert rates[-1] > 0


@pytest.mark.parametrize(
    "step, milestones, expected",
    [(0, [6000], 0.01), (5999, [6000], 0.01), (6000, [6000], 0.001), (8999, [6000], 0.001),
     (10, [], 0.01), (4, [5, 8], 0.01), (5, [5, 8], 0.001), (8, [5, 8], 0.0001)],
)
def test_lr_step(step, milestones, expected):
    """Step: base ÷10 at each milestone reached (the paper: ÷10 after 6000 of 9000 steps)."""
    assert lr_at(step, 9000, 0.01, "step", milestones) == pytest.approx(expected, rel=1e-12)


def test_lr_constant_and_unknown():
    """Constant is the base rate at every step; an unknown schedule raises."""
    assert [lr_at(s, 10, 0.3, "constant") for s in (0, 5, 9)] == [0.3, 0.3, 0.3]
    with pytest.raises(ValueError):
        lr_at(0, 10, 0.3, "linear")
