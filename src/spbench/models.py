"""Backbones and the classifier that joins a backbone to a head.

Every architecture is built as a :class:`Classifier`: parameters under ``backbone.`` are
inherited from the source network (the set S of the paper), parameters under ``head.`` are
the classification layer (S̄ when fine-tuning, re-initialised at random). Freeze depth ``d``
freezes the first ``d`` entries of :meth:`Classifier.freeze_units` (whole blocks).

A backbone is a module with ``out_features`` (the width of the features the head reads),
``units()`` (its freeze units, in forward order) and ``stages()`` (the module names whose
outputs are DELTA's feature maps). Registered: the demo's small ResNet, torchvision's
ResNet-18/50/101, ViT-B/16 (:class:`TorchvisionViT`) and ConvNeXt-Tiny
(:class:`TorchvisionConvNeXt`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

__all__ = [
    "Classifier",
    "DemoResNet",
    "TorchvisionResNet",
    "TorchvisionViT",
    "TorchvisionConvNeXt",
    "ARCHITECTURES",
    "build_model",
    "freeze_depth_count",
    "split_parameters",
    "apply_freeze",
    "compile_backbone",
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
        ``stages()``; a ViT's are the blocks ending each quarter of its encoder): the feature
        maps of DELTA."""
        return [f"backbone.{name}" for name in self.backbone.stages()]

    def feature_channels(self) -> list[int]:
        """The channel count of each of :meth:`feature_layers`' outputs: the backbone's
        ``stage_channels()`` where it has one, else each layer's ``out_channels``."""
        if hasattr(self.backbone, "stage_channels"):
            return list(self.backbone.stage_channels())
        return [self.get_submodule(name).out_channels for name in self.feature_layers()]

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


class _Unit(nn.Module):
    """A freeze unit made of some of a backbone's modules and of bare parameters that belong
    to no module of their own (ViT's ``class_token``, ``encoder.pos_embedding``). A view:
    it is not registered in the backbone, so it changes no parameter name."""

    def __init__(self, modules: list[nn.Module], parameters: list[nn.Parameter]):
        super().__init__()
        self.parts = nn.ModuleList(modules)
        for i, p in enumerate(parameters):
            self.register_parameter(f"param{i}", p)


class TorchvisionViT(nn.Module):
    """A torchvision Vision Transformer (``vit_b_16``) without its ``heads``: the input cut
    into 16×16 patches by ``conv_proj``, the class token ``class_token`` prepended, the
    position embedding ``encoder.pos_embedding`` added, the encoder blocks
    ``encoder.layers.encoder_layer_<i>`` and the final LayerNorm ``encoder.ln``; the features
    are the class token's output (768 for ViT-B). Module and parameter names are
    torchvision's.

    Freezable units (14 for ViT-B/16): the patch embedding (``conv_proj``, ``class_token`` and
    ``encoder.pos_embedding`` together), then each of the 12 transformer blocks in order, then
    the final ``encoder.ln``.

    Image size: at torchvision's 224 × 224 the forward pass is torchvision's. Other sizes
    (multiples of 16 px, not necessarily square) use the position embedding resized
    bicubically to the patch grid (the class token's entry kept), as torchvision's
    ``interpolate_embeddings`` does when it adapts weights to another ``image_size``; the
    parameter keeps its 14 × 14 + 1 positions, and its gradient flows through the resizing.
    ``in_channels`` other than 3: ``conv_proj`` is replaced by a new, randomly initialised
    one (torchvision's initialisation), as the ResNet's ``conv1`` is.

    DELTA's feature maps (``stages()``): the outputs of the blocks that end each quarter of the
    encoder (``encoder_layer_2``, ``_5``, ``_8``, ``_11`` for ViT-B/16), token sequences
    [B, 1 + patches, D] read as D channels over 1 + patches positions (a ViT has no stages and
    no convolution after its stem; the suite's choice, DELTA's paper being on CNNs).
    """

    def __init__(self, name: str = "vit_b_16", in_channels: int = 3):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)
        if not isinstance(net.conv_proj, nn.Conv2d):
            raise ValueError(f"{name}: only the patchify stem (a single conv_proj) is supported")
        if in_channels != 3:
            p = net.patch_size
            net.conv_proj = nn.Conv2d(in_channels, net.hidden_dim, kernel_size=p, stride=p)
            nn.init.trunc_normal_(net.conv_proj.weight, std=math.sqrt(1 / (in_channels * p * p)))
            nn.init.zeros_(net.conv_proj.bias)
        self.arch = name
        self.patch_size, self.hidden_dim = net.patch_size, net.hidden_dim
        self.grid = (net.image_size // net.patch_size,) * 2  # the patch grid of pos_embedding
        self.out_features = net.hidden_dim
        self.conv_proj = net.conv_proj
        self.class_token = net.class_token
        self.encoder = net.encoder

    def units(self) -> list[nn.Module]:
        embedding = _Unit([self.conv_proj], [self.class_token, self.encoder.pos_embedding])
        return [embedding, *self.encoder.layers, self.encoder.ln]

    def stages(self) -> list[str]:
        """The blocks that end each quarter of the encoder (class docstring)."""
        depth = len(self.encoder.layers)
        return [f"encoder.layers.encoder_layer_{round(k * depth / 4) - 1}" for k in range(1, 5)]

    def stage_channels(self) -> list[int]:
        return [self.hidden_dim] * len(self.stages())

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """``encoder.pos_embedding`` for a ``grid_h × grid_w`` patch grid: itself on its own
        grid, else its patch positions resized bicubically (``align_corners=True``, as
        torchvision's ``interpolate_embeddings``) with the class token's entry kept."""
        pos = self.encoder.pos_embedding
        if (grid_h, grid_w) == self.grid:
            return pos
        d = pos.shape[-1]
        cls, patches = pos[:, :1], pos[:, 1:]
        patches = patches.permute(0, 2, 1).reshape(1, d, *self.grid)
        patches = nn.functional.interpolate(patches, size=(grid_h, grid_w), mode="bicubic", align_corners=True)
        return torch.cat([cls, patches.reshape(1, d, grid_h * grid_w).permute(0, 2, 1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"{self.arch} needs image sides that are multiples of {p} px, not {h}×{w}")
        x = self.conv_proj(x)  # [n, D, h/p, w/p]
        grid = tuple(x.shape[-2:])
        x = x.reshape(n, self.hidden_dim, grid[0] * grid[1]).permute(0, 2, 1)  # [n, patches, D]
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        if grid == self.grid:
            x = self.encoder(x)  # torchvision's: + pos_embedding, dropout, blocks, ln
        else:
            enc = self.encoder
            x = enc.ln(enc.layers(enc.dropout(x + self.position_embedding(*grid))))
        return x[:, 0]


class TorchvisionConvNeXt(nn.Module):
    """A torchvision ConvNeXt (``convnext_tiny``) without its last linear layer: ``features``
    (the 4×4 stem ``features.0``, stages of CNBlocks ``features.1, 3, 5, 7`` with the
    downsampling layers ``features.2, 4, 6`` between them), global average pooling, and
    ``classifier``: torchvision's ``classifier`` up to its final LayerNorm2d and Flatten
    (``classifier.0``, ``classifier.1``), so that its keys stay torchvision's; the head is
    torchvision's ``classifier.2``. Output: 768 features for ConvNeXt-Tiny.

    Freezable units (23 for ConvNeXt-Tiny): the stem ``features.0``, then every CNBlock and
    every downsampling layer in forward order (3 blocks, ``features.2``, 3 blocks,
    ``features.4``, 9 blocks, ``features.6``, 3 blocks), then the final norm ``classifier.0``.

    DELTA's feature maps (``stages()``): the depthwise 7×7 convolution ``block.0`` of the last
    CNBlock of each stage (``features.1.2.block.0`` … ``features.7.2.block.0``), the only
    convolution of a CNBlock: its output before the LayerNorm and the residual addition, as
    for the ResNets' last convolution of each stage.

    torchvision's stochastic depth (``convnext_tiny``'s default: up to 0.1, rising with the
    block's depth) is kept: it drops residual branches in train mode only. Images need at
    least 32 px (torchvision's minimum: four 2×2 downsamplings after the 4×4 stem).
    ``in_channels`` other than 3: the stem's convolution is replaced by a new, randomly
    initialised one (torchvision's initialisation).
    """

    def __init__(self, name: str = "convnext_tiny", in_channels: int = 3):
        super().__init__()
        import torchvision
        from torchvision.models.convnext import CNBlock

        net = getattr(torchvision.models, name)(weights=None)
        if in_channels != 3:
            old = net.features[0][0]
            conv = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, stride=old.stride, bias=True)
            nn.init.trunc_normal_(conv.weight, std=0.02)
            nn.init.zeros_(conv.bias)
            net.features[0][0] = conv
        self.arch = name
        self.out_features = net.classifier[2].in_features
        self.features, self.avgpool = net.features, net.avgpool
        self.classifier = nn.Sequential(net.classifier[0], net.classifier[1])  # LayerNorm2d, Flatten
        #: indices in ``features`` of the stages (CNBlocks; the others are downsampling layers)
        self._stages = [i for i, m in enumerate(self.features) if i and isinstance(m[0], CNBlock)]

    def units(self) -> list[nn.Module]:
        units: list[nn.Module] = [self.features[0]]
        for i in range(1, len(self.features)):
            units.extend(self.features[i] if i in self._stages else [self.features[i]])
        return [*units, self.classifier[0]]

    def stages(self) -> list[str]:
        """The depthwise convolution of the last CNBlock of each stage (class docstring)."""
        return [f"features.{i}.{len(self.features[i]) - 1}.block.0" for i in self._stages]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


def _demo_resnet(num_classes: int, in_channels: int) -> Classifier:
    return Classifier(DemoResNet(in_channels), num_classes)


def _torchvision(name: str, backbone: type[nn.Module] = TorchvisionResNet) -> Callable[[int, int], Classifier]:
    def build(num_classes: int, in_channels: int) -> Classifier:
        return Classifier(backbone(name, in_channels), num_classes)

    build.__name__ = name
    return build


#: Architecture registry: name -> builder(num_classes, in_channels) -> Classifier.
#: Parameter names follow torchvision's (``backbone.layer1.0.conv1.weight``,
#: ``backbone.encoder.layers.encoder_layer_0.mlp.0.weight``, ``backbone.features.1.0.block.0.weight``),
#: so published torchvision state dicts load into ``backbone`` once their classification layer
#: (ResNet ``fc.*``, ViT ``heads.head.*``, ConvNeXt ``classifier.2.*``) is split off as ``head.*``
#: (:func:`spbench.datasets.convert_weights`).
ARCHITECTURES: dict[str, Callable[[int, int], Classifier]] = {
    "demo_resnet": _demo_resnet,
    "resnet18": _torchvision("resnet18"),
    "resnet50": _torchvision("resnet50"),
    "resnet101": _torchvision("resnet101"),
    "vit_b_16": _torchvision("vit_b_16", TorchvisionViT),
    "convnext_tiny": _torchvision("convnext_tiny", TorchvisionConvNeXt),
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


def compile_backbone(model: Classifier) -> Classifier:
    """``finetune.compile``: the backbone compiled in place by ``torch.compile`` (its default
    inductor back end, through :meth:`torch.nn.Module.compile`, so the parameters and the state
    dict's keys stay as they are). Its first calls compile it (per input shape and mode, train
    and eval), later ones run the compiled code. Forward hooks added after its first call may not
    run (the config refuses methods that record feature maps). Returns ``model``."""
    model.backbone.compile()
    return model


def split_parameters(model: Classifier, scope: str = "all") -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """Trainable parameters as (inherited S, head S̄), each name -> parameter.

    ``scope='all'``: every inherited trainable tensor (convolutions, batch-norm affine,
    biases), as in the paper's equations. ``scope='weights'``: convolution and linear kernels
    only (tensors of two or more dimensions), as in the authors' code; the other inherited
    tensors are then trained without penalty. The rule is by dimension: on ViT it also keeps
    ``class_token`` [1, 1, D] and ``encoder.pos_embedding`` [1, N, D], on ConvNeXt the
    ``layer_scale`` [C, 1, 1] of every block.
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
