"""The paper's input pipeline from the uint8 cache (SPEC §4): central crop at test; random crop,
mirror and blur in training, against brute-force references; seeded; usable by train_steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter1d

from spbench.augment import CachedImages, augment_batch
from spbench.models import build_model, split_parameters
from spbench.methods import MethodContext, make_method
from spbench.train import evaluate, train_steps

H, CROP = 12, 8
MEAN = torch.tensor([0.5, 0.4, 0.3])


def images(n=6, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, H, H, 3), dtype=np.uint8)


def as_float(img: np.ndarray) -> np.ndarray:
    """[H, W, C] uint8 -> [C, H, W] float, mean subtracted (the reference)."""
    return img.transpose(2, 0, 1) / 255.0 - MEAN.numpy()[:, None, None]


def test_test_mode_is_the_central_crop():
    raw = images()
    out = augment_batch(torch.from_numpy(raw), crop=CROP, train=False, mean=MEAN)
    assert out.shape == (6, 3, CROP, CROP) and out.dtype == torch.float32
    o = (H - CROP) // 2
    np.testing.assert_allclose(out.numpy(), np.stack([as_float(r)[:, o:o + CROP, o:o + CROP] for r in raw]), atol=1e-6)
    std = torch.tensor([0.2, 0.25, 0.5])
    scaled = augment_batch(torch.from_numpy(raw), crop=CROP, train=False, mean=MEAN, std=std)
    torch.testing.assert_close(scaled, out / std.view(1, 3, 1, 1))


def test_training_crops_and_mirrors_cover_every_window():
    """Without blur every output is one of the (H-crop+1)² windows, mirrored or not; over many
    draws all offsets and both orientations occur."""
    raw = images(n=1)
    ref = as_float(raw[0])
    windows = {}
    for oy in range(H - CROP + 1):
        for ox in range(H - CROP + 1):
            w = ref[:, oy:oy + CROP, ox:ox + CROP]
            windows[(oy, ox, False)], windows[(oy, ox, True)] = w, w[:, :, ::-1]
    gen = torch.Generator().manual_seed(0)
    seen = set()
    batch = torch.from_numpy(np.repeat(raw, 400, axis=0))
    out = augment_batch(batch, crop=CROP, train=True, mean=MEAN, generator=gen, blur_p=0.0).numpy()
    for o in out:
        match = [k for k, w in windows.items() if np.allclose(o, w, atol=1e-6)]
        assert match, "output is not a window of the image"
        seen.update(match)
    assert {k[:2] for k in seen} == {k[:2] for k in windows}
    assert {k[2] for k in seen} == {False, True}


def test_blur_matches_a_separable_gaussian_with_reflected_borders():
    raw = images(n=4)
    sigma = 0.9
    radius = 2  # ceil(2 · σ_max)
    out = augment_batch(torch.from_numpy(raw), crop=H, train=True, mean=MEAN, generator=torch.Generator().manual_seed(1),
                        blur_p=1.0, blur_sigma=(sigma, sigma))
    for img, o in zip(raw, out.numpy()):
        x = img.transpose(2, 0, 1) / 255.0
        candidates = [x, x[:, :, ::-1]]
        refs = [gaussian_filter1d(gaussian_filter1d(c, sigma, axis=2, mode="mirror", truncate=radius / sigma),
                                  sigma, axis=1, mode="mirror", truncate=radius / sigma) - MEAN.numpy()[:, None, None]
                for c in candidates]
        assert min(np.abs(o - r).max() for r in refs) < 1e-5
        assert min(np.abs(o - (c - MEAN.numpy()[:, None, None])).max() for c in candidates) > 1e-3  # it did blur


def test_same_seed_same_batches_other_seed_other_batches():
    raw = torch.from_numpy(images())
    a, b, c = (augment_batch(raw, crop=CROP, train=True, mean=MEAN, generator=torch.Generator().manual_seed(s))
               for s in (5, 5, 6))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


def test_cached_view_reads_selected_rows():
    raw = images(n=10)
    view = CachedImages(raw, np.array([7, 2, 5, 9]), mean=MEAN, crop=CROP)
    assert len(view) == 4 and view.shape == (4, 3, CROP, CROP)
    full = augment_batch(torch.from_numpy(raw), crop=CROP, train=False, mean=MEAN)
    torch.testing.assert_close(view[torch.tensor([3, 0])], full[[9, 7]])
    torch.testing.assert_close(view[1:3], full[[2, 5]])
    torch.testing.assert_close(view.take(2)[0:2], full[[7, 2]])
    torch.testing.assert_close(view.select([3, 1])[0:2], full[[9, 2]])
    assert len(view.take(10)) == 4
    with pytest.raises(ValueError, match="generator"):
        CachedImages(raw, np.arange(3), mean=MEAN, train=True)


def test_training_loop_runs_on_cached_views():
    """train_steps and evaluate take the views where they take tensors (len and indexing)."""
    torch.manual_seed(0)
    raw = images(n=16)
    gen = torch.Generator().manual_seed(0)
    train = CachedImages(raw, np.arange(12), mean=MEAN, crop=CROP, train=True, generator=gen)
    test = CachedImages(raw, np.arange(12, 16), mean=MEAN, crop=CROP)
    y = torch.arange(16) % 2
    model = build_model("demo_resnet", 2, 3)
    inherited, head = split_parameters(model)
    method = make_method("l2_sp", MethodContext(model, inherited, head), alpha=0.1, beta=0.01)
    history = train_steps(model, method, train, y[:12], steps=3, batch_size=4, lr=0.01,
                          generator=torch.Generator().manual_seed(1), log_every=0)
    assert len(history.loss) == 3 and all(np.isfinite(history.loss))
    assert 0.0 <= evaluate(model, test, y[12:]) <= 1.0


def test_set_up_pass_reads_the_central_crops():
    """A method's set-up pass (Co-Tuning's relationship) reads the training view's central
    crops: the evaluation's images, no randomness, the augmenting view's generator untouched."""
    torch.manual_seed(0)
    raw = images(n=12)
    gen = torch.Generator().manual_seed(0)
    train = CachedImages(raw, np.arange(12), mean=MEAN, crop=CROP, train=True, generator=gen)
    central = train.central()
    plain = CachedImages(raw, np.arange(12), mean=MEAN, crop=CROP)
    state = gen.get_state()
    idx = torch.arange(12)
    torch.testing.assert_close(central[idx], plain[idx], rtol=0, atol=0)
    torch.testing.assert_close(central[idx], central[idx], rtol=0, atol=0)
    assert torch.equal(gen.get_state(), state) and train.train and train.generator is gen
    y = torch.arange(12) % 2
    source = build_model("demo_resnet", 3, 3).eval()
    model = build_model("demo_resnet", 2, 3)
    model.backbone.load_state_dict(source.backbone.state_dict())
    inherited, head = split_parameters(model)
    method = make_method("co_tuning", MethodContext(model, inherited, head, source_model=source))
    train_steps(model, method, train, y, steps=2, batch_size=4, lr=0.01, generator=torch.Generator().manual_seed(1),
                log_every=0, setup_x=central)
    with torch.no_grad():
        probs = torch.softmax(source(plain[idx]).double(), dim=1)
    expected = torch.stack([probs[y == c].mean(dim=0) for c in range(2)]).to(method.relationship.dtype)
    torch.testing.assert_close(method.relationship, expected)


def test_blur_paths_agree_in_float64():
    """The per-image loop (CPU) and the grouped convolutions (accelerators) compute the same
    blur, each image truncated at its own radius ceil(2σ)."""
    from spbench.augment import gaussian_blur

    x = torch.rand(5, 3, 11, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 0.45, 0.8, 1.2, 1.5], dtype=torch.float64)
    loop, batched = gaussian_blur(x, sigma, path="loop"), gaussian_blur(x, sigma, path="batched")
    torch.testing.assert_close(loop, batched, rtol=0, atol=1e-12)
    const = torch.full((2, 3, 9, 9), 0.3, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur(const, sigma[:2], path="loop"), const)  # a normalised kernel


def test_the_device_path_reads_nothing_back_from_the_device():
    """On an accelerator the augmentation decides everything on the CPU (crops, mirrors, blur
    kernels) and only sends it over, so the host never waits for the device. Checked on the
    meta device, which holds no values: any read of one (a radius from a σ on the device, a
    mask's nonzero, a blocking item) raises there."""
    raw = images(n=8)
    draws = torch.Generator().manual_seed(3)  # the view's draws, in its order: offsets, mirrors
    torch.randint(0, H - CROP + 1, (8,), generator=draws), torch.randint(0, H - CROP + 1, (8,), generator=draws)
    mirrored = torch.rand(8, generator=draws) < 0.5
    assert mirrored.any() and not mirrored.all()  # both branches run; every image is blurred (blur_p 1)
    view = CachedImages(raw, np.arange(8), mean=MEAN, std=torch.tensor([0.2, 0.25, 0.5]), crop=CROP, train=True,
                        generator=torch.Generator().manual_seed(3), blur_p=1.0, device="meta")
    out = view[torch.arange(8)]
    assert out.device.type == "meta" and out.shape == (8, 3, CROP, CROP) and out.dtype == torch.float32
    assert view.central()[0:4].shape == (4, 3, CROP, CROP)
    batch = augment_batch(torch.from_numpy(raw).to("meta"), crop=CROP, train=True, mean=MEAN,
                          generator=torch.Generator().manual_seed(3), blur_p=1.0)
    assert batch.device.type == "meta" and batch.shape == (8, 3, CROP, CROP)


def test_input_pipeline_benchmark_runs():
    """The benchmark's quick mode runs and reports both paths with positive rates."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "input_pipeline.py"
    spec = importlib.util.spec_from_file_location("input_pipeline", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.run(bench.parse_args(["--quick", "--images", "8", "--batch", "4", "--batches", "1"]))
    assert [r["measure"] for r in res["rows"]] == ["cache", "cache_read", "jpeg"]
    assert all(r["images_per_s"] > 0 for r in res["rows"])
