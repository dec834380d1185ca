"""ViT-B/16 and ConvNeXt-Tiny beside the ResNets: torchvision's parameter names and outputs
(a torchvision state dict converted and loaded strictly), freeze units, DELTA's feature maps,
the group-lasso groups of their non-convolutional tensors, and every registered method for
one training step on each (the registry smoke test of test_methods.py, on these backbones)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn

from spbench.datasets import convert_weights
from spbench.methods import METHODS, MethodContext, SetupData, make_method
from spbench.methods.features import _channels_first, _cut_after, channel_attention
from spbench.models import apply_freeze, build_model, freeze_depth_count, split_parameters
from spbench.penalties import PENALTIES, NonSmoothSP, _fisher_group_prox, _groups, _group_grad_flat_, make_penalty
from spbench.train import training_step
from test_methods import ALL, _context, _source

ARCHS = ["vit_b_16", "convnext_tiny"]
#: torchvision's classification layer, which becomes the classifier's ``head``
HEAD = {"vit_b_16": "heads.head.", "convnext_tiny": "classifier.2."}
UNITS = {"vit_b_16": 14, "convnext_tiny": 23}


def _unit_names(model: nn.Module) -> list[list[str]]:
    """The parameter names of each freeze unit, from the classifier."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [[name_of[id(p)] for p in unit.parameters()] for unit in model.freeze_units()]


def _renamed(state: dict, arch: str) -> dict:
    """A torchvision state dict under the classifier's names, written out here."""
    head = HEAD[arch]
    return {(f"head.{k[len(head):]}" if k.startswith(head) else f"backbone.{k}"): v for k, v in state.items()}


def _prefix(names: list[str]) -> str:
    """The module path all ``names`` share (``backbone.features.1.0``)."""
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


# ---------------------------------------------------------------------------- torchvision's names and outputs


@torch.no_grad()
def _torchvision_net(arch: str, **kwargs) -> nn.Module:
    """torchvision's network with random weights, its head and ConvNeXt's layer scales (1e-6 at
    initialisation, which would hide the blocks) drawn away from zero."""
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(weights=None, **kwargs)
    for name, p in net.named_parameters():
        if name.startswith(HEAD[arch]):
            p.normal_(0, 0.05)
        elif name.endswith("layer_scale"):
            p.uniform_(0.2, 1.0)
    return net.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_torchvision_checkpoint_converts_loads_strictly_and_gives_torchvisions_logits(arch, tmp_path):
    """A torchvision state dict, saved and converted (its classification layer -> head.*, the
    rest -> backbone.* under torchvision's names), loads with strict=True into
    build_model(arch, 1000, 3), whose logits are torchvision's to 1e-5 (eval, 224 px)."""
    net = _torchvision_net(arch)
    torch.save(net.state_dict(), tmp_path / "tv.pth")
    state = convert_weights(tmp_path / "tv.pth", "torchvision")
    assert set(state) == set(_renamed(net.state_dict(), arch))
    assert {k for k in state if k.startswith("head.")} == {"head.weight", "head.bias"}
    model = build_model(arch, 1000, 3)
    model.load_state_dict(state)  # strict: every name maps, every shape fits
    model.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x), net(x)
    assert theirs.abs().max() > 0.1  # not a trivial comparison
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_converter_names_the_heads_it_knows(tmp_path):
    """A state dict without a known classification layer is refused, naming the ones known."""
    torch.save({"encoder.ln.weight": torch.ones(3)}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="'fc.weight', 'heads.head.weight', 'classifier.2.weight'"):
        convert_weights(tmp_path / "x.pth", "torchvision")
    torch.save({"fc.weight": torch.ones(2, 3), "heads.head.weight": torch.ones(2, 3)}, tmp_path / "y.pth")
    with pytest.raises(ValueError, match="more than one classification layer"):
        convert_weights(tmp_path / "y.pth", "torchvision")


def test_vit_at_another_size_resizes_the_position_embedding_as_torchvision_does():
    """At 64 px the backbone resizes its 14×14 position embedding to the 4×4 patch grid: the
    logits of torchvision's ViT built for 64 px from the same weights by torchvision's
    interpolate_embeddings. Sides that are not multiples of 16 are refused."""
    from torchvision.models.vision_transformer import interpolate_embeddings

    net = _torchvision_net("vit_b_16")
    model = build_model("vit_b_16", 1000, 3).eval()
    model.load_state_dict(_renamed(net.state_dict(), "vit_b_16"))
    small = getattr(torchvision.models, "vit_b_16")(weights=None, image_size=64).eval()
    small.load_state_dict(interpolate_embeddings(64, 16, copy.copy(net.state_dict())))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), small(x), rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="multiples of 16"):
            model(torch.randn(1, 3, 40, 40))


@pytest.mark.parametrize("arch", ARCHS)
def test_other_input_channels_replace_the_stem_only(arch):
    """in_channels = 1: a new first convolution of 1 input channel; every name is unchanged,
    every other shape too; small images run (ViT: 16 px, one patch; ConvNeXt: 32 px, its smallest)."""
    torch.manual_seed(0)
    rgb, grey = build_model(arch, 5, 3), build_model(arch, 5, 1)
    stem = "backbone.conv_proj.weight" if arch == "vit_b_16" else "backbone.features.0.0.weight"
    a, b = rgb.state_dict(), grey.state_dict()
    assert list(a) == list(b)
    assert [k for k in a if a[k].shape != b[k].shape] == [stem] and b[stem].shape[1] == 1
    with torch.no_grad():
        size = 16 if arch == "vit_b_16" else 32
        out = grey.eval()(torch.randn(2, 1, size, size))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------- freeze units and DELTA's maps


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    torch.manual_seed(0)
    return request.param, build_model(request.param, 3, 3)


def test_freeze_units_cover_the_backbone_once_in_forward_order(model):
    """Every backbone parameter lies in exactly one unit, the head in none; the units are the
    documented ones (ViT: patch embedding, 12 blocks, final LayerNorm; ConvNeXt: stem, each
    CNBlock and downsampling layer, final LayerNorm2d) and run in that order in forward."""
    arch, net = model
    units = net.freeze_units()
    assert len(units) == UNITS[arch] == freeze_depth_count(arch)
    names = _unit_names(net)
    flat = [n for unit in names for n in unit]
    assert len(flat) == len(set(flat))
    assert set(flat) == {n for n, _ in net.named_parameters() if n.startswith("backbone.")}
    if arch == "vit_b_16":
        assert sorted(names[0]) == ["backbone.class_token", "backbone.conv_proj.bias", "backbone.conv_proj.weight",
                                    "backbone.encoder.pos_embedding"]
        expected = [f"backbone.encoder.layers.encoder_layer_{i}" for i in range(12)] + ["backbone.encoder.ln"]
        assert [_prefix(u) for u in names[1:]] == expected
    else:
        stages = [f"features.{i}.{b}" for i, n in ((1, 3), (3, 3), (5, 9), (7, 3)) for b in range(n)]
        expected = ["features.0", *stages[:3], "features.2", *stages[3:6], "features.4", *stages[6:15],
                    "features.6", *stages[15:], "classifier.0"]
        assert [_prefix(u) for u in names] == [f"backbone.{e}" for e in expected]
    calls: list[int] = []
    hooks = [m.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, u in enumerate(units) for m in u.modules()]
    try:
        with torch.no_grad():
            net.eval()(torch.randn(1, 3, 32, 32))
    finally:
        for h in hooks:
            h.remove()
    first = sorted(set(calls), key=calls.index)
    assert first == list(range(len(units)))


def test_apply_freeze_freezes_exactly_the_first_units(model):
    arch, net = model
    names = _unit_names(net)
    for depth in (0, 1, 2, len(names) // 2, len(names) - 1, len(names)):
        net.requires_grad_(True)
        frozen = apply_freeze(net, depth)
        expected = [n for unit in names[:depth] for n in unit]
        assert sorted(frozen) == sorted(expected), depth
        for n, p in net.named_parameters():
            assert p.requires_grad is (n not in expected), (depth, n)
    net.requires_grad_(True)


def test_feature_maps_for_delta(model):
    """ConvNeXt: the depthwise convolution of each stage's last CNBlock, [B, C, H, W] maps of
    its out_channels, in forward order. ViT: the blocks ending each quarter of the encoder,
    token sequences [B, 1 + patches, 768] (768 channels)."""
    from spbench.methods import record_outputs

    arch, net = model
    names = net.feature_layers()
    if arch == "vit_b_16":
        assert names == [f"backbone.encoder.layers.encoder_layer_{i}" for i in (2, 5, 8, 11)]
        assert net.feature_channels() == [768] * 4
        with torch.no_grad(), record_outputs(net, names) as seen:
            net.eval()(torch.randn(1, 3, 32, 32))
        assert list(seen) == names and [seen[n].shape for n in names] == [(1, 1 + 4, 768)] * 4
        return
    assert net.feature_channels() == [96, 192, 384, 768]
    assert names == [f"backbone.features.{i}.{n - 1}.block.0" for i, n in ((1, 3), (3, 3), (5, 9), (7, 3))]
    with torch.no_grad(), record_outputs(net, names) as seen:
        net.eval()(torch.randn(2, 3, 64, 64))
    assert list(seen) == names
    for n, side in zip(names, (16, 8, 4, 2)):
        conv = net.get_submodule(n)
        assert isinstance(conv, nn.Conv2d) and seen[n].shape == (2, conv.out_channels, side, side)


def test_delta_on_vit_token_sequences():
    """DELTA on ViT: α · Σ_i Σ_j ½ Σ_c C_j W_jc Σ_n (FM_ijnc − FM0_ijnc)² / N over the tapped
    blocks' token sequences (float64, plain loops over images, channels and tokens); a token
    sequence's channel c, which the set-up pass zeroes, is coordinate c of every token."""
    from spbench.methods import Forward

    torch.manual_seed(0)
    src = build_model("vit_b_16", 4, 3).eval()
    model = build_model("vit_b_16", 3, 3)
    model.backbone.load_state_dict(src.backbone.state_dict())
    inherited, head = split_parameters(model)
    alpha = 0.3
    method = make_method("delta", MethodContext(model, inherited, head, source_model=src), alpha=alpha, beta=0.0)
    gen = torch.Generator().manual_seed(1)
    weights = [torch.rand(768, generator=gen, dtype=torch.float64) for _ in method.taps]
    for buffer, w in zip(method.attention(), weights):
        buffer.data = w
    taps = {n: torch.randn(2, 5, 768, generator=gen, dtype=torch.float64) for n in method.taps}
    teacher = {n: torch.randn(2, 5, 768, generator=gen, dtype=torch.float64) for n in method.taps}
    out = Forward(None, None, torch.zeros(2, 768, dtype=torch.float64), None, taps=taps, teacher_taps=teacher)
    got = method.loss(out).item()
    expect = 0.0
    for n, w in zip(method.taps, weights):
        a, b = taps[n].numpy(), teacher[n].numpy()
        for i in range(2):
            for c in range(768):
                expect += 0.5 * 768 * float(w[c]) * float(((a[i, :, c] - b[i, :, c]) ** 2).sum()) / 5
    assert got == pytest.approx(alpha * expect, rel=1e-12)
    # the set-up pass zeroes "channel" c of a token sequence: coordinate c of every token
    # (the whole pass, 768 forwards per layer, is test_delta_channel_attention_on_convnext's on a CNN)
    tokens = torch.randn(2, 5, 768, generator=gen)
    _channels_first(tokens)[:, 7] = 0
    assert (tokens[..., 7] == 0).all() and (tokens[..., 6] != 0).all() and (tokens[..., 8] != 0).all()


def test_delta_channel_attention_on_convnext():
    """DELTA's set-up pass zeroes the channels of a ConvNeXt map one at a time (the first
    stage's 96 here): one weight per channel, summing to 1, not all equal (the layer scales
    drawn away from their 1e-6 at initialisation, which would make every channel matter
    equally little, as a trained network's are)."""
    src = _source("convnext_tiny", 4, 3)
    with torch.no_grad():
        for n, p in src.named_parameters():
            if n.endswith("layer_scale"):
                p.uniform_(0.2, 1.0)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    data = SetupData(x, torch.arange(8) % 4, batch_size=8, device=torch.device("cpu"))
    (w,) = channel_attention(src, src.feature_layers()[:1], data, 4)
    assert w.shape == (96,) and w.sum().item() == pytest.approx(1.0) and w.std() > 0


@pytest.mark.parametrize("arch,channels,size", [("demo_resnet", 1, 16), ("resnet18", 3, 32), ("convnext_tiny", 3, 32)])
def test_delta_attention_from_the_cut_forward_is_the_whole_forwards(arch, channels, size):
    """Where the backbone traces, the set-up pass runs the forward up to the tapped convolution
    once per batch and only the rest per channel: the weights are those of the whole forward
    per channel (a hook zeroing the channel), to the bit, over several batches."""
    src = _source(arch, 4, channels)
    if arch == "convnext_tiny":
        with torch.no_grad():
            for n, p in src.named_parameters():
                if n.endswith("layer_scale"):
                    p.uniform_(0.2, 1.0)
    layers = src.feature_layers()[:1] if arch != "demo_resnet" else src.feature_layers()
    assert all(_cut_after(src.backbone, name.removeprefix("backbone.")) is not None for name in layers)
    x = torch.randn(6, channels, size, size, generator=torch.Generator().manual_seed(2))
    data = SetupData(x, torch.arange(6) % 4, batch_size=4, device=torch.device("cpu"))  # 2 batches
    cut, whole = (channel_attention(src, layers, data, 4, cut=c) for c in (True, False))
    assert len(cut) == len(layers) and all(torch.equal(a, b) for a, b in zip(cut, whole))
    assert all(w.std() > 0 for w in cut)


def test_delta_cut_forward_survives_an_in_place_residual():
    """A backbone whose rest adds the tapped map into a value it kept from before the tap, in
    place (``skip.add_(tap)``; fx traces ``skip += tap`` as an out-of-place add): each
    channel's rest gets its own copy of that value, so the weights are still the whole
    forward's."""
    from spbench.models import Classifier

    class Residual(nn.Module):
        out_features = 4

        def __init__(self):
            super().__init__()
            self.stem, self.tap = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def stages(self):
            return ["tap"]

        def forward(self, x):
            skip = self.stem(x)
            skip.add_(self.tap(skip.relu()))
            return skip.mean(dim=(2, 3))

    torch.manual_seed(0)
    net = Classifier(Residual(), 3)
    data = SetupData(torch.randn(6, 1, 8, 8), torch.arange(6) % 3, batch_size=4, device=torch.device("cpu"))
    assert _cut_after(net.backbone, "tap") is not None
    cut, whole = (channel_attention(net, net.feature_layers(), data, 3, cut=c) for c in (True, False))
    assert torch.equal(cut[0], whole[0]) and cut[0].std() > 0


def test_a_forward_that_does_not_trace_is_run_whole():
    """The ViT's forward branches on the input's shape: it does not trace, so no cut (its
    attention comes from the whole forward, test_delta_on_vit_token_sequences); nor is a module
    called twice cut."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.conv(self.conv(x)).mean(dim=(2, 3))

    vit = build_model("vit_b_16", 4, 3)
    assert _cut_after(vit.backbone, vit.backbone.stages()[0]) is None
    assert _cut_after(Twice(), "conv") is None
    assert _cut_after(Twice(), "missing") is None


# ---------------------------------------------------------------------------- group-lasso groups


def test_group_lasso_groups_of_transformer_tensors():
    """_groups cuts along dim 0: ViT's class_token [1, 1, D] and pos_embedding [1, N, D] are
    one group each (the whole tensor), a linear or attention weight one group per output row,
    ConvNeXt's layer_scale [C, 1, 1] and 1-D tensors groups of one element. gl_sp's value
    is that sum of group norms, and its fast paths (the CPU's per tensor, the accelerators' flat
    one, run here on the CPU; the proximal maps) agree with the reference on these shapes."""
    shapes = {"class_token": (1, 1, 768), "pos_embedding": (1, 197, 768), "in_proj_weight": (2304, 768),
              "ln.weight": (768,), "layer_scale": (96, 1, 1), "dwconv": (96, 1, 7, 7)}
    rows = {"class_token": (1, 768), "pos_embedding": (1, 197 * 768), "in_proj_weight": (2304, 768),
            "ln.weight": (768, 1), "layer_scale": (96, 1), "dwconv": (96, 49)}
    for n, s in shapes.items():
        assert tuple(_groups(torch.zeros(s)).shape) == rows[n], n
    gen = torch.Generator().manual_seed(0)
    w0 = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    fisher = {n: torch.rand(s, generator=gen, dtype=torch.float64) + 0.1 for n, s in shapes.items()}
    # departures whose size grows along dim 0 (the groups): the proximal maps below set the
    # small groups back to w0 and shrink the large ones, so both of their branches are compared
    d = {n: 0.05 * torch.randn(s, generator=gen, dtype=torch.float64)
         * torch.linspace(0.2, 3.0, s[0], dtype=torch.float64).view(-1, *[1] * (len(s) - 1)) for n, s in shapes.items()}

    def params():
        return {n: nn.Parameter(w0[n].clone()) for n in shapes}

    # the value, from whole-tensor norms for the tokens, row norms for the weights
    p = params()
    penalty = make_penalty("gl_sp", p, {}, alpha=1.0, beta=0.0, eps=1e-3)
    with torch.no_grad():
        for n in p:
            p[n].add_(d[n])
    expected = 0.0
    for n, t in d.items():
        if n in ("class_token", "pos_embedding"):
            expected += math.sqrt(t.numel()) * math.sqrt(t.pow(2).sum().item() + 1e-6)
        elif n in ("in_proj_weight", "dwconv"):
            expected += math.sqrt(t[0].numel()) * (t.flatten(1).pow(2).sum(1) + 1e-6).sqrt().sum().item()
        else:
            expected += (t.pow(2) + 1e-6).sqrt().sum().item()
    assert penalty.value().item() == pytest.approx(expected, rel=1e-12)

    for name in [n for n in sorted(PENALTIES) if n != "none"]:
        for variant in ("smooth", "prox") if issubclass(PENALTIES[name], NonSmoothSP) else ("smooth",):
            results = {}
            for path in ("loop", "foreach", "flat"):
                if path == "flat" and not (name.startswith("gl_sp") and variant == "smooth"):
                    continue
                p = params()
                kw = {"variant": variant} if issubclass(PENALTIES[name], NonSmoothSP) else {}
                penalty = make_penalty(name, p, {}, alpha=0.5, beta=0.0, fisher=fisher, **kw)
                with torch.no_grad():
                    for n in p:
                        p[n].add_(d[n])
                        p[n].grad = torch.zeros_like(p[n])
                if path == "flat":
                    f = [penalty.fisher[n] for n in p] if penalty.uses_fisher else None
                    with torch.no_grad():
                        _group_grad_flat_([q.grad for q in p.values()], list(p.values()), [penalty.w0[n] for n in p],
                                          f, penalty.alpha, penalty.eps)
                else:
                    penalty.add_grad_(foreach=path == "foreach")
                penalty.prox_(0.1)
                results[path] = {n: (q.detach().clone(), q.grad.clone()) for n, q in p.items()}
                if variant == "prox" and name == "gl_sp_fisher" and path == "loop":  # the accelerators' prox
                    diffs = [w0[n] + d[n] - w0[n] for n in p]
                    u = _fisher_group_prox(diffs, [fisher[n] for n in p], 0.1 * 0.5)
                    results["flat_prox"] = {n: (w0[n] + x, q.grad.clone()) for (n, q), x in zip(p.items(), u)}
            if variant == "prox":
                at_w0 = torch.cat([(results["loop"][n][0] == w0[n]).flatten() for n in shapes]).double().mean().item()
                assert 0.05 < at_w0 < 0.95, (name, at_w0)
            for path, got in results.items():
                for n in shapes:
                    for a, b in zip(got[n], results["loop"][n]):
                        assert torch.isfinite(a).all(), (name, variant, path, n)
                        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12,
                                                   msg=lambda m: f"{name} {variant} {path} {n}: {m}")


# ---------------------------------------------------------------------------- every method, one step


#: (method, non-smooth variant): each registered method, and the proximal variant of the
#: non-smooth penalties too.
STEPS = [(m, "smooth") for m in ALL] + [(m, "prox") for m in ALL if m in ("l1_sp", "gl_sp", "gl_sp_fisher")]
SIZE = 32  # ViT: a 2×2 patch grid (the resized position embedding); ConvNeXt: torchvision's minimum


@pytest.fixture(scope="module", params=ARCHS)
def start(request):
    """test_methods.py's source network and context (its Fisher diagonal), built once per
    architecture, and the context model's starting state, which each test restores."""
    src = _source(request.param, 5, 3)
    ctx = _context(src, request.param, 3)
    return request.param, ctx, copy.deepcopy(ctx.model.state_dict())


@pytest.mark.parametrize("name,variant", STEPS, ids=[f"{m}-{v}" for m, v in STEPS])
def test_every_method_takes_a_step(start, name, variant):
    """One training_step (after the method's set-up pass; DELTA's with uniform attention: its
    set-up is test_delta_channel_attention_on_convnext's) with each method of test_methods.py's
    smoke test, the proximal variants included, then its finalize_: a finite loss, and the
    inherited tensors moved, ViT's class_token and pos_embedding among them."""
    arch, base, state = start
    model = base.model
    model.load_state_dict(state)
    model.requires_grad_(True).zero_grad(set_to_none=True)
    inherited, head = split_parameters(model)
    ctx = MethodContext(model, inherited, head, source_model=base.source_model, fisher=base.fisher, nonsmooth=variant)
    method = make_method(name, ctx)
    if arch == "vit_b_16" and name.startswith("gl_sp"):  # the token tensors: one group each
        w0 = method.penalty.w0
        assert tuple(_groups(w0["backbone.class_token"]).shape) == (1, 768)
        assert tuple(_groups(w0["backbone.encoder.pos_embedding"]).shape) == (1, 197 * 768)
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2])  # every target class (co_tuning's set-up needs one image of each)
    if method.needs.setup and "delta" not in name.split("+"):
        method.setup(SetupData(x, y, batch_size=3, device=torch.device("cpu")))
    before = {n: p.detach().clone() for n, p in inherited.items()}
    params = [p for p in model.parameters() if p.requires_grad] + method.extra_parameters()
    model.train()
    method.train()
    loss = training_step(model, method, x, y, torch.optim.SGD(params, lr=0.01, momentum=0.9), lr=0.01)
    assert torch.isfinite(loss)
    getattr(method, "finalize_", lambda: None)()
    moved = {n for n, p in inherited.items() if not torch.equal(p, before[n])}
    if variant == "smooth":
        assert len(moved) > len(inherited) // 2, f"{len(moved)} of {len(inherited)} inherited tensors moved"
        if arch == "vit_b_16":
            assert {"backbone.class_token", "backbone.encoder.pos_embedding"} <= moved
    else:  # the proximal step returns departures below lr·α to w0 (ConvNeXt's blocks: most)
        assert moved
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
