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
    "TorchvisionResNet",
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

    def stages(self) -> list[str]:
        """The last convolution of each stage (DELTA's feature maps): its output before the
        batch norm and the residual addition, as in DELTA's code."""
        return ["stage1.conv2", "stage2.conv2", "stage3.conv2"]

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

    def feature_layers(self) -> list[str]:
        """Module names (relative to the classifier) of the convolutions that end each stage of
        the backbone, in forward order (``backbone.layer4.2.conv3`` …; see the backbones'
        ``stages()``): the feature maps of DELTA."""
        return [f"backbone.{name}" for name in self.backbone.stages()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet without its ``fc`` layer. Freezable units: the stem (conv1 + bn1),
    then every residual block in order. For ResNet-101 the paper counts layers (conv1 = 1, three
    per bottleneck block): freezing ``u`` units freezes layers 1..1+3(u−1), so the paper's
    depths 1, 10, 22, 34, 46, 58, 70, 82, 91, 100 are units 1, 4, 8, 12, 16, 20, 24, 28, 31, 34."""

    def __init__(self, name: str, in_channels: int = 3):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.out_features = net.fc.in_features
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def units(self) -> list[nn.Module]:
        stem = nn.ModuleList([self.conv1, self.bn1])
        blocks = [b for layer in (self.layer1, self.layer2, self.layer3, self.layer4) for b in layer]
        return [stem, *blocks]

    def stages(self) -> list[str]:
        """The last convolution of the last block of each stage (DELTA's feature maps, e.g.
        ``layer1.2.conv3`` … ``layer4.2.conv3`` for ResNet-50, as in DELTA's code): its output
        before the batch norm and the residual addition."""
        out = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            layer = getattr(self, name)
            last = len(layer) - 1
            out.append(f"{name}.{last}.conv3" if hasattr(layer[last], "conv3") else f"{name}.{last}.conv2")
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def _demo_resnet(num_classes: int, in_channels: int) -> Classifier:
    return Classifier(DemoResNet(in_channels), num_classes)


def _torchvision(name: str) -> Callable[[int, int], Classifier]:
    def build(num_classes: int, in_channels: int) -> Classifier:
        return Classifier(TorchvisionResNet(name, in_channels), num_classes)

    build.__name__ = name
    return build


#: Architecture registry: name -> builder(num_classes, in_channels) -> Classifier.
#: Parameter names follow torchvision's (``backbone.layer1.0.conv1.weight``), so published
#: torchvision state dicts load into ``backbone`` once their ``fc.*`` entries are split off.
ARCHITECTURES: dict[str, Callable[[int, int], Classifier]] = {
    "demo_resnet": _demo_resnet,
    "resnet18": _torchvision("resnet18"),
    "resnet50": _torchvision("resnet50"),
    "resnet101": _torchvision("resnet101"),
}


def build_model(arch: str, num_classes: int, in_channels: int) -> Classifier:
    try:
        builder = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r} (known: {sorted(ARCHITECTURES)})") from None
    return builder(num_classes, in_channels)


def freeze_depth_count(arch: str) -> int:
    """How many freezable units ``arch`` has (the largest valid freeze depth)."""
    with torch.device("meta"):  # no memory, no initialisation cost
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
