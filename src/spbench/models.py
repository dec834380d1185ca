"""Backbones and the classifier that joins a backbone to a head.

Every architecture is built as a :class:`Classifier`: parameters under ``backbone.`` are
inherited from the source network (the set S of the paper), parameters under ``head.`` are
the classification layer (S̄ when fine-tuning, re-initialised at random). Freeze depth ``d``
freezes the first ``d`` entries of :meth:`Classifier.freeze_units` (whole blocks).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = [
    "Classifier",
    "DemoResNet",
    "ARCHITECTURES",
    "build_model",
    "freeze_depth_count",
    "split_parameters",
    "apply_freeze",
]


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convolutions with batch norm and a residual connection."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class DemoResNet(nn.Module):
    """The demo's small ResNet (SPEC §8): a 3×3 stem, three stages of one basic block each
    (widths 16/32/64, strides 1/2/2), global average pooling. Output: 64 features."""

    out_features = 64

    def __init__(self, in_channels: int = 1, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w1, 3, padding=1, bias=False), nn.BatchNorm2d(w1), nn.ReLU())
        self.stage1 = BasicBlock(w1, w1, 1)
        self.stage2 = BasicBlock(w1, w2, 2)
        self.stage3 = BasicBlock(w2, w3, 2)
        self.out_features = w3

    def units(self) -> list[nn.Module]:
        return [self.stem, self.stage1, self.stage2, self.stage3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


class Classifier(nn.Module):
    """``head(backbone(x))``; the backbone exposes ``units()`` in forward order for freezing."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_features, num_classes)

    def freeze_units(self) -> list[nn.Module]:
        return self.backbone.units()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _demo_resnet(num_classes: int, in_channels: int) -> Classifier:
    return Classifier(DemoResNet(in_channels), num_classes)


#: Architecture registry: name -> builder(num_classes, in_channels) -> Classifier.
ARCHITECTURES: dict[str, Callable[[int, int], Classifier]] = {
    "demo_resnet": _demo_resnet,
}


def build_model(arch: str, num_classes: int, in_channels: int) -> Classifier:
    try:
        builder = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r} (known: {sorted(ARCHITECTURES)})") from None
    return builder(num_classes, in_channels)


def freeze_depth_count(arch: str) -> int:
    """How many freezable units ``arch`` has (the largest valid freeze depth)."""
    return len(build_model(arch, 2, 3).freeze_units())


def apply_freeze(model: Classifier, depth: int) -> list[str]:
    """Freeze the first ``depth`` units: no gradient, and their batch norms stay in eval mode
    (see :func:`spbench.train.set_train_mode`). Returns the frozen parameter names."""
    units = model.freeze_units()
    if not 0 <= depth <= len(units):
        raise ValueError(f"freeze depth {depth} outside [0, {len(units)}]")
    frozen_ids = set()
    for unit in units[:depth]:
        for p in unit.parameters():
            p.requires_grad_(False)
            frozen_ids.add(id(p))
    return [n for n, p in model.named_parameters() if id(p) in frozen_ids]


def split_parameters(model: Classifier, scope: str = "all") -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """Trainable parameters as (inherited S, head S̄), each name -> parameter.

    ``scope='all'``: every inherited trainable tensor (convolutions, batch-norm affine,
    biases), as in the paper's equations. ``scope='weights'``: convolution and linear kernels
    only (tensors of two or more dimensions), as in the authors' code; the other inherited
    tensors are then trained without penalty.
    """
    if scope not in ("all", "weights"):
        raise ValueError(f"sp_scope must be 'all' or 'weights', not {scope!r}")
    inherited, head = {}, {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("head."):
            head[name] = p
        elif name.startswith("backbone."):
            if scope == "all" or p.ndim >= 2:
                inherited[name] = p
        else:
            raise ValueError(f"parameter {name!r} is neither in the backbone nor the head")
    return inherited, head
