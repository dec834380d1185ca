"""Methods whose term acts on the backbone's features rather than on its parameters:
DELTA (feature maps kept close to the source network's, weighted by channel attention) and
BSS (the smallest singular values of the batch's feature matrix shrunk) (SPEC §7)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import penalties as _penalties
from .base import Forward, HParam, Method, MethodContext, Needs, SetupData, eval_mode, full_precision, register
from .penalties import BETA

__all__ = ["BSS", "DELTA", "channel_attention"]


@register
class BSS(Method):
    """Batch Spectral Shrinkage (Chen et al., NeurIPS 2019):

        CE(y, h(g(x))) + η Σ_{i=1..k} σ_{−i}²

    where σ_{−1} ≤ σ_{−2} ≤ … are the smallest singular values of the batch's feature matrix
    g(x) ∈ R^{B×D} (the pooled backbone output that the head reads). Differentiated by
    autograd through the singular values (computed in float32 at least). The paper's
    defaults: k = 1, η = 0.001. Tensors touched: the backbone (through the features).
    """

    name = "bss"
    hparams = (
        HParam("eta", float, 0.001, doc="weight η of the spectral term"),
        HParam("k", int, 1, low=1, high=1_000_000, doc="how many of the smallest singular values"),
    )

    def loss(self, out: Forward) -> Tensor:
        sigma = torch.linalg.svdvals(full_precision(out.features))  # descending
        k = min(self.settings["k"], len(sigma))
        return self.settings["eta"] * sigma[-k:].pow(2).sum()


@torch.no_grad()
def _features(backbone: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    return torch.cat([backbone(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _fit_probe(features: Tensor, y: Tensor, num_classes: int, *, iterations: int = 100, weight_decay: float = 1e-4) -> nn.Linear:
    """A linear classifier on fixed features: multinomial logistic regression with a small
    L2 term, full batch, solved by L-BFGS from zero (deterministic)."""
    probe = nn.Linear(features.shape[1], num_classes).to(features)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(probe(features), y) + 0.5 * weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return probe.requires_grad_(False)


#: DELTA's attention: images scored (its code: the first 4 training batches of 64) and the
#: softmax temperature over the standardised loss increases (its code: 5).
ATTENTION_IMAGES = 256
ATTENTION_TEMPERATURE = 5.0


def _channels_first(t: Tensor) -> Tensor:
    """A feature map as [B, C, …]: a convolution's output as it is; a transformer block's token
    sequence [B, N, D] as [B, D, N] (a view: D channels over N positions)."""
    return t.transpose(1, 2) if t.ndim == 3 else t


def _cut_after(module: nn.Module, name: str) -> tuple[nn.Module, nn.Module, int] | None:
    """``module``'s forward cut after its submodule ``name``: ``(prefix, suffix, k)`` with
    ``prefix(x)`` the tuple of every value that the rest of the forward reads (the output of
    ``name`` at index k among them) and ``suffix(*values)`` the module's output from them, the
    same operations as the whole forward (torch.fx symbolic tracing, ``name`` kept as one call).
    None when the forward does not trace (Python control flow on tensor values or shapes, as in
    the ViT's) or calls ``name`` other than once: the caller then runs the whole forward."""
    import torch.fx

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return qualname == name or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(module)
    except Exception:  # noqa: BLE001 - any failure to trace means: no cut, the whole forward
        return None
    nodes = list(graph.nodes)
    calls = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == name]
    if len(calls) != 1:
        return None
    before, after = nodes[: calls[0] + 1], nodes[calls[0] + 1 :]
    later = set(after)
    live = [n for n in before if any(user in later for user in n.users)]
    prefix, suffix = torch.fx.Graph(), torch.fx.Graph()
    env: dict = {}
    for n in before:
        env[n] = prefix.node_copy(n, env.__getitem__)
    prefix.output(tuple(env[n] for n in live))
    env = {n: suffix.placeholder(f"live_{i}") for i, n in enumerate(live)}
    for n in after:
        env[n] = suffix.node_copy(n, env.__getitem__)
    return (torch.fx.GraphModule(module, prefix), torch.fx.GraphModule(module, suffix),
            live.index(nodes[calls[0]]))


def _without_channel(t: Tensor, c: int) -> Tensor:
    t = t.clone()
    _channels_first(t)[:, c] = 0
    return t


@torch.no_grad()
def channel_attention(network: nn.Module, layers: list[str], data: SetupData, num_classes: int, *,
                      cut: bool = True) -> list[Tensor]:
    """DELTA's channel attention W_j for each named convolution j of ``network`` (a classifier
    with a ``backbone``, scored in eval mode), on the first :data:`ATTENTION_IMAGES` training
    images x with labels y:

    1. a linear probe p is fitted on the frozen features g0(x) (:func:`_fit_probe`; DELTA's
       code trains the head for 10 epochs of SGD instead: a converged probe needs no schedule);
    2. Δ_jc = CE(p(g0(x) with output channel c of convolution j set to 0), y) − CE(p(g0(x)), y)
       for every channel c (mean over the images);
    3. W_j = softmax_c(z_jc / 5), z_j the standardised Δ_j ((Δ − mean) / std over the layer's
       channels; z = 0 when all Δ are equal), as in DELTA's code. Each W_j sums to 1.

    Step 2 runs one forward per channel. Where the backbone traces (:func:`_cut_after`: the
    torchvision ResNets and ConvNeXts, the demo network), the part of it before convolution j
    runs once per batch and only the rest once per channel (the same operations on the same
    values, so the same Δ to the bit), at the cost of keeping what the rest reads for all the
    images (at a ResNet-50's first stage at 224 px, 256 images: about 1.6 GB in float32);
    elsewhere, or with ``cut=False``, each channel's forward is the whole one.
    """
    with eval_mode(network):
        batches = list(data.batches())
        x = torch.cat([xb for xb, _ in batches])[:ATTENTION_IMAGES]
        y = torch.cat([yb for _, yb in batches])[:ATTENTION_IMAGES]
        bs = data.batch_size
        features = _features(network.backbone, x, bs)
        probe = _fit_probe(features, y, num_classes)
        base = nn.functional.cross_entropy(probe(features), y)
        weights = []
        counts = dict(zip(network.feature_layers(), network.feature_channels()))
        for name in layers:
            conv = network.get_submodule(name)
            channels = counts[name] if name in counts else conv.out_channels
            split = _cut_after(network.backbone, name.removeprefix("backbone.")) if cut and name.startswith("backbone.") else None
            if split is not None:
                prefix, suffix, k = split
                live = [prefix(x[i : i + bs]) for i in range(0, len(x), bs)]  # per batch, once

                def loss_without(c: int) -> Tensor:
                    # every tensor the rest reads is passed as a copy: an in-place operation of
                    # the rest on one of them (`skip.add_(…)`) must not reach the next channel
                    out = [suffix(*(_without_channel(v, c) if i == k else v.clone() if isinstance(v, Tensor) else v
                                    for i, v in enumerate(values))) for values in live]
                    return nn.functional.cross_entropy(probe(torch.cat(out)), y)
            else:
                def loss_without(c: int) -> Tensor:
                    def zero_channel(module, inputs, output):
                        return _without_channel(output, c)

                    handle = conv.register_forward_hook(zero_channel)
                    try:
                        return nn.functional.cross_entropy(probe(_features(network.backbone, x, bs)), y)
                    finally:
                        handle.remove()
            d = torch.stack([loss_without(c) - base for c in range(channels)]).double()
            sd = d.std()
            z = (d - d.mean()) / sd if sd > 0 else torch.zeros_like(d)
            weights.append(torch.softmax(z / ATTENTION_TEMPERATURE, dim=0).to(base.dtype))
    return weights


@register
class DELTA(Method):
    """DELTA, deep learning transfer with feature-map attention (Li et al., ICLR 2019):

        CE + α · Σ_i Σ_j ½ Σ_c C_j · W_jc · ‖FM_jc(w, x_i) − FM_jc(w0, x_i)‖² / (H_j W_j) + β/2 ‖w_S̄‖²

    FM_j: the output of the last convolution of each backbone stage (before its batch norm and
    the residual addition; :meth:`Classifier.feature_layers`, e.g. ``layer4.2.conv3``), of the
    fine-tuned network (w) and of the frozen source network (w0, one no-grad forward per
    step); FM_jc its channel c, an H_j × W_j map; C_j its channel count (a ViT: the output of
    the block ending each quarter of the encoder, channel c the token embeddings' coordinate c
    over the N tokens, which take the place of H_j × W_j; see ``TorchvisionViT``). W_j:
    :func:`channel_attention`, computed once before step 0 on the target's training images and
    kept as buffers (uniform W gives every channel weight 1). As in the authors' code, the
    term is summed over the batch (i), halved and divided by the map's size, so that the
    paper's defaults keep their meaning: α = 0.01 (0.1 on Stanford Dogs), β = 0.01 (an L2 on
    the new head only, added to its gradient in place). Tensors touched: the backbone (through
    the feature maps), the head (β).
    """

    name = "delta"
    hparams = (
        HParam("alpha", float, 0.01, doc="weight α of the feature-map term"),
        BETA,
    )
    needs = Needs(teacher=True, taps=True, setup=True)

    def __init__(self, context: MethodContext, **hparams: Any):
        super().__init__(context, **hparams)
        self.taps = tuple(context.model.feature_layers())
        self._num_classes = context.model.head.out_features
        for j, channels in enumerate(context.model.feature_channels()):
            self.register_buffer(f"attention_{j}", torch.full((channels,), 1.0 / channels))
        self.head_decay = _penalties.L2({}, context.head, alpha=0.0, beta=self.settings["beta"])

    def attention(self) -> list[Tensor]:
        return [getattr(self, f"attention_{j}") for j in range(len(self.taps))]

    def setup(self, data: SetupData) -> None:
        found = channel_attention(self.teacher, list(self.taps), data, self._num_classes)
        for buffer, weights in zip(self.attention(), found):
            buffer.copy_(weights)

    def loss(self, out: Forward) -> Tensor:
        total = full_precision(out.features).new_zeros(())
        for name, w in zip(self.taps, self.attention()):
            diff = _channels_first(full_precision(out.taps[name] - out.teacher_taps[name]))
            channels, positions = diff.shape[1], diff[0, 0].numel()  # C_j and H_j·W_j (tokens: N)
            per_channel = diff.pow(2).flatten(2).sum(dim=2)  # [B, C]: ‖FM_jc(w) − FM_jc(w0)‖²
            total = total + 0.5 * channels * (per_channel * w).sum() / positions
        return self.settings["alpha"] * total

    def add_grad_(self) -> None:
        self.head_decay.add_grad_()
