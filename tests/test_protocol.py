"""The protocol as documented: validation folds are scored as the test set is (central crops,
the augmentation's generator untouched); the Fisher's m images are a seeded random subset of
the split; a Fisher-weighted penalty gets the diagonal rescaled over the whole backbone
whatever part of it the penalty covers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from spbench.augment import CachedImages
from spbench.config import RunSpec
from spbench.fisher import normalize_fisher

H, CROP = 12, 8
MEAN = torch.tensor([0.5, 0.4, 0.3])


def prepare_tiny(config, root: Path) -> Path:
    """config/tiny.yaml's two tasks prepared under ``root / "data"`` and its source network built
    in ``root / "src"`` (returned), as the workflow would before a fine-tune."""
    from spbench import pipeline

    for task in ("digits-src", "digits-mod3-k5"):
        pipeline.prepare_task_from_config(config, task, root / "data" / task)
    src = root / "src"
    src.mkdir()
    pipeline.build_source(config, "digits-src", root / "data" / "digits-src", src / "model.pt", src / "info.json")
    return src


def test_validation_fold_is_scored_on_central_crops():
    from spbench.pipeline import evaluation_split

    raw = np.random.default_rng(0).integers(0, 256, (20, H, H, 3), dtype=np.uint8)
    gen = torch.Generator().manual_seed(0)
    xs = {"train": CachedImages(raw, np.arange(15), mean=MEAN, crop=CROP, train=True, generator=gen),
          "test": CachedImages(raw, np.arange(15, 20), mean=MEAN, crop=CROP)}
    ys = {"train": torch.arange(15) % 3, "test": torch.arange(5) % 3}
    config = {"selection": {"folds": 5}}
    spec = RunSpec("s", "t", "l2", {"alpha": 0.1, "beta": 0.01, "lr": 0.1}, 0, 0, evaluation="val1", experiment="select")
    state = gen.get_state()
    x, y, x_eval, y_eval = evaluation_split(config, spec, xs, ys)
    assert x.train and not x_eval.train and x_eval.generator is None
    assert len(x) == 12 and len(x_eval) == 3 and set(x.rows) | set(x_eval.rows) == set(range(15))
    plain = CachedImages(raw, x_eval.rows, mean=MEAN, crop=CROP)
    idx = torch.arange(len(x_eval))
    torch.testing.assert_close(x_eval[idx], plain[idx], rtol=0, atol=0)
    torch.testing.assert_close(y_eval, ys["train"][torch.as_tensor(x_eval.rows)])
    assert torch.equal(gen.get_state(), state)  # scoring drew nothing from the augmentation
    test_spec = RunSpec("s", "t", "l2", {"alpha": 0.1, "beta": 0.01, "lr": 0.1}, 0, 0)
    assert evaluation_split(config, test_spec, xs, ys)[2] is xs["test"]


def test_fisher_images_are_a_seeded_random_subset(tmp_path, monkeypatch):
    from spbench import pipeline
    from spbench.data import prepare_task
    from spbench.models import build_model
    from spbench.train import save_source

    task = prepare_task("digits_source", {"size": 16, "split_seed": 0}, tmp_path / "src")
    model = build_model("demo_resnet", 7, 1)
    save_source(tmp_path / "model.pt", model, arch="demo_resnet", in_channels=1, meta={})
    seen = {}

    def fake(model, x, names, **kw):
        seen["x"] = x.clone()
        return {n: torch.ones_like(p) for n, p in model.named_parameters() if n in names}

    monkeypatch.setattr(pipeline, "estimate_fisher", fake)
    config = {"fisher": {"seed": 3, "split": "train", "num_examples": 50, "estimator": "exact", "samples": 1,
                         "batch_size": 64},
              "finetune": {"threads": 1, "device": "cpu"}}
    meta = pipeline.compute_fisher(config, "src", tmp_path / "model.pt", task, tmp_path / "fisher.pt")
    assert meta["m"] == 50 and meta["samples"] == 0
    from spbench.data import load_task

    train = load_task(task).x["train"]
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(3))[:50].sort().values
    torch.testing.assert_close(seen["x"], train[pick], rtol=0, atol=0)
    assert not torch.equal(seen["x"], train[:50])


def test_finetune_gives_the_penalty_the_whole_backbones_rescaled_fisher(tmp_path, monkeypatch):
    """With sp_scope: weights and a frozen unit the penalty covers part of the backbone; the
    Fisher it is handed is still the diagonal divided by its mean over the WHOLE backbone."""
    import yaml

    from spbench import pipeline
    from spbench.config import validate_config
    from spbench.fisher import load_fisher
    from spbench.methods import make_method as real_make_method

    repo = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((repo / "config" / "tiny.yaml").read_text())
    raw["finetune"].update(steps=2, batch_size=8, sp_scope="weights")
    config = validate_config(raw)
    src = prepare_tiny(config, tmp_path)
    pipeline.compute_fisher(config, "digits-src", src / "model.pt", tmp_path / "data" / "digits-src", src / "fisher.pt")
    captured = {}

    def capture(name, context, **hp):
        captured["fisher"] = context.fisher
        return real_make_method(name, context, **hp)

    monkeypatch.setattr(pipeline, "make_method", capture)
    spec = RunSpec("digits-src", "digits-mod3-k5", "l2_sp_fisher", {"alpha": 0.1, "beta": 0.01, "lr": 0.01}, 1, 0)
    record, _ = pipeline.finetune_run(config, spec, source_model=src / "model.pt", source_info=src / "info.json",
                                      target_dir=tmp_path / "data" / "digits-mod3-k5",
                                      source_dir=tmp_path / "data" / "digits-src", fisher_path=src / "fisher.pt",
                                      record_out=tmp_path / "record.json")
    raw_fisher, meta = load_fisher(src / "fisher.pt")
    mean = torch.cat([f.flatten() for f in raw_fisher.values()]).mean()
    got = captured["fisher"]
    assert got and all(raw_fisher[n].ndim >= 2 for n in got)  # weights only, frozen stem left out
    assert not any(n.startswith("backbone.stem.") for n in got)
    for n, f in got.items():
        torch.testing.assert_close(f, raw_fisher[n] / mean)
    assert record["fisher_m"] == meta["m"] and record["fisher_samples"] == 0 and record["precision"] == "fp32"


def test_fisher_rescaled_over_the_whole_backbone_before_restriction():
    """`normalize: mean` divides by the mean over every backbone tensor, so the values a
    penalty sees on the tensors it covers do not depend on which tensors those are."""
    whole = {"a": torch.full((4,), 2.0), "b": torch.full((4,), 6.0)}
    rescaled = normalize_fisher(whole, "mean")
    assert torch.equal(rescaled["a"], torch.full((4,), 0.5)) and torch.equal(rescaled["b"], torch.full((4,), 1.5))
    # restricted first (the old behaviour) the same tensor would read 1.0: scope-dependent
    assert torch.equal(normalize_fisher({"a": whole["a"]}, "mean")["a"], torch.ones(4))
