"""Fisher diagonal (SPEC §3): the exact estimator against a brute-force double loop over images
and classes, the Monte-Carlo estimator against the exact one, normalisation and file round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spbench.fisher import estimate_fisher, load_fisher, normalize_fisher, save_fisher
from spbench.models import build_model

K = 4


def _warm_bn(model: nn.Module, shape: tuple[int, ...]) -> None:
    """Move the batch-norm running statistics away from their defaults (so that eval and train
    mode give different outputs) and sharpen the head (so that the classes are unequally likely)."""
    gen = torch.Generator().manual_seed(10)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(2 * torch.randn(16, *shape, generator=gen, dtype=torch.float64) + 0.5)
        head = model.head if hasattr(model, "head") else model[-1]
        head.weight.mul_(4)


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, K)
    ).double()
    _warm_bn(model, (1, 6, 6))
    return model


def _demo() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("demo_resnet", K, 1).double()
    _warm_bn(model, (1, 8, 8))
    return model


def _images(model: nn.Module, m: int, seed: int = 11) -> torch.Tensor:
    size = 6 if isinstance(model, nn.Sequential) else 8
    return torch.randn(m, 1, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _brute_force(model: nn.Module, images: torch.Tensor, names: list[str], labels=None) -> dict[str, torch.Tensor]:
    """1/m Σ_i Σ_k p_k (∂ log p_k / ∂w)², one autograd call per (image, class), BN in eval mode.
    With ``labels``: the empirical Fisher 1/m Σ_i (∂ log p_{y_i} / ∂w)² instead."""
    was_training = model.training
    model.eval()
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(params[n]) for n in names}
    for i in range(len(images)):
        log_p = torch.log_softmax(model(images[i : i + 1]), dim=1)[0]
        classes = range(len(log_p)) if labels is None else [int(labels[i])]
        for k in classes:
            grads = torch.autograd.grad(log_p[k], [params[n] for n in names], retain_graph=True)
            weight = log_p[k].exp().detach() if labels is None else 1.0
            for n, g in zip(names, grads):
                fisher[n] += weight * g**2
    model.train(was_training)
    return {n: f / len(images) for n, f in fisher.items()}


def _total(fisher: dict[str, torch.Tensor]) -> float:
    return float(sum(f.sum() for f in fisher.values()))


def _rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float(((a[n] - b[n]) ** 2).sum()) for n in b)
    den = sum(float((b[n] ** 2).sum()) for n in b)
    return (num / den) ** 0.5


# -- exact ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_tiny, _demo], ids=["sequential", "demo_resnet"])
def test_exact_matches_brute_force(make):
    """The exact estimator is SPEC §3's F̂ = 1/m Σ_i Σ_k f_k (∂ log f_k)², BN in eval mode."""
    model = make()
    images = _images(model, 5)
    names = [n for n, _ in model.named_parameters()]
    expected = _brute_force(model, images, names)
    got = estimate_fisher(model, images, names, estimator="exact")
    assert set(got) == set(names)
    assert _rel_err(got, expected) < 1e-5
    for n in names:
        assert got[n].shape == expected[n].shape and got[n].dtype == torch.float64
        assert _rel_err({n: got[n]}, {n: expected[n]}) < 1e-5, n


def test_exact_on_a_subset_of_parameters():
    """Asking for some tensors only gives their Fisher, unchanged by the others being left out."""
    model = _demo()
    images = _images(model, 4)
    names = [n for n, _ in model.named_parameters() if n.startswith("backbone.stage2.")]
    got = estimate_fisher(model, images, names)
    assert set(got) == set(names)
    assert _rel_err(got, _brute_force(model, images, names)) < 1e-5


def test_batch_size_does_not_change_result():
    """Chunking the images (batch_size) changes nothing but speed."""
    model = _demo()
    images = _images(model, 5)
    names = [n for n, _ in model.named_parameters()]
    whole = estimate_fisher(model, images, names, batch_size=64)
    for bs in (1, 2):
        chunked = estimate_fisher(model, images, names, batch_size=bs)
        for n in names:
            torch.testing.assert_close(chunked[n], whole[n], rtol=1e-10, atol=1e-14)


def test_exact_differs_from_empirical_and_batch_mean_square():
    """The exact Fisher is neither the empirical Fisher (fixed labels) nor the square of a
    mini-batch mean gradient (the common EWC bug)."""
    model = _tiny()
    images = _images(model, 3)
    names = [n for n, _ in model.named_parameters()]
    exact = estimate_fisher(model, images, names)
    model.eval()
    with torch.no_grad():
        labels = model(images).argmin(dim=1)
    empirical = _brute_force(model, images, names, labels=labels)
    assert _rel_err(empirical, exact) > 0.2
    loss = nn.functional.cross_entropy(model(images), labels)
    batch_sq = {n: g**2 for n, g in zip(names, torch.autograd.grad(loss, list(model.parameters())))}
    assert _rel_err(batch_sq, exact) > 0.2


@pytest.mark.parametrize("training", [True, False])
def test_mode_restored_and_statistics_untouched(training):
    """The model's training flag is restored, its BN running statistics are not updated, and the
    result is the eval-mode Fisher whatever mode the model was in."""
    model = _demo()
    model.train(training)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    images = _images(model, 3)
    names = [n for n, _ in model.named_parameters()]
    got = estimate_fisher(model, images, names)
    assert model.training is training
    assert all(m.training is training for m in model.modules())
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), f"buffer {n} changed"
    assert _rel_err(got, _brute_force(model, images, names)) < 1e-5


def test_bad_arguments_raise():
    """Unknown estimator, samples < 1 and unknown parameter names are rejected."""
    model = _tiny()
    images = _images(model, 2)
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError):
        estimate_fisher(model, images, names, estimator="empirical")
    with pytest.raises(ValueError):
        estimate_fisher(model, images, names, estimator="mc", samples=0)
    with pytest.raises(ValueError):
        estimate_fisher(model, images, ["no.such.weight"])


# -- Monte Carlo ---------------------------------------------------------------------------------


def test_mc_approaches_exact_and_not_empirical():
    """With many sampled labels, mc converges to the exact Fisher, away from the empirical
    Fisher with fixed labels (here the least likely class of each image)."""
    model = _tiny()
    images = _images(model, 3)
    names = [n for n, _ in model.named_parameters()]
    exact = estimate_fisher(model, images, names)
    mc = estimate_fisher(model, images, names, estimator="mc", samples=500, generator=torch.Generator().manual_seed(0))
    assert abs(_total(mc) / _total(exact) - 1) < 0.1
    assert _rel_err(mc, exact) < 0.2
    model.eval()
    with torch.no_grad():
        labels = model(images).argmin(dim=1)
    empirical = _brute_force(model, images, names, labels=labels)
    assert abs(_total(mc) / _total(empirical) - 1) > 0.2


def test_mc_is_seeded():
    """Same generator seed, same mc estimate; another seed, another estimate."""
    model = _tiny()
    images = _images(model, 3)
    names = [n for n, _ in model.named_parameters()]

    def run(seed):
        return estimate_fisher(model, images, names, estimator="mc", samples=3, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[n], b[n]) for n in names)
    assert any(not torch.equal(a[n], c[n]) for n in names)


# -- normalisation and files ---------------------------------------------------------------------


def test_normalize_mean_gives_mean_one():
    """'mean' divides by the mean over all elements of all tensors; 'none' leaves F as is."""
    gen = torch.Generator().manual_seed(0)
    fisher = {"a": torch.rand(3, 4, generator=gen) * 1e-3, "b": torch.rand(7, generator=gen) * 5e-4}
    normed = normalize_fisher(fisher, "mean")
    total = sum(f.sum() for f in normed.values())
    count = sum(f.numel() for f in normed.values())
    assert float(total / count) == pytest.approx(1.0, rel=1e-6)
    ratio = fisher["a"][0, 0] / normed["a"][0, 0]
    torch.testing.assert_close(normed["b"] * ratio, fisher["b"])
    same = normalize_fisher(fisher, "none")
    assert all(torch.equal(same[n], fisher[n]) for n in fisher)
    with pytest.raises(ValueError):
        normalize_fisher(fisher, "max")
    with pytest.raises(ValueError):
        normalize_fisher({"a": torch.zeros(3)}, "mean")


def test_save_load_round_trip(tmp_path):
    """save_fisher then load_fisher gives back the same tensors and metadata."""
    fisher = {"backbone.stem.0.weight": torch.rand(4, 1, 3, 3, dtype=torch.float64), "backbone.x.bias": torch.rand(4)}
    meta = {"estimator": "mc", "samples": 3, "images": 17}
    path = tmp_path / "fisher.pt"
    save_fisher(path, fisher, meta)
    loaded, loaded_meta = load_fisher(path)
    assert loaded_meta == meta
    assert set(loaded) == set(fisher)
    for n, f in fisher.items():
        assert loaded[n].dtype == f.dtype and torch.equal(loaded[n], f)
