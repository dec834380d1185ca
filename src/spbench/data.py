"""Tasks on disk: a uint8 image cache, a split file and a metadata file.

Every task, the embedded demo's and the real data sets' (:mod:`spbench.datasets`), is prepared
once into::

    {data_dir}/{task}/images.npy   uint8 [N, H, W, C], decoded and resized once
    {data_dir}/{task}/split.parquet  one row per image: index (into images.npy), label, split
    {data_dir}/{task}/meta.json    classes, image size, channels, per-channel training mean

``split`` is ``train`` or ``test``. Training reads the cache (memory-mapped), scales to
[0, 1] and subtracts the per-channel mean of the training split (SPEC §4).

Task builders are registered in :data:`TASK_BUILDERS`; each returns a :class:`PreparedTask`
(images in memory) or, for the real data sets, a :class:`spbench.datasets.FileListTask` (image
files, decoded straight into the cache by ``prepare_task``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .fsutil import atomic_directory

__all__ = [
    "PreparedTask",
    "TaskData",
    "TASK_BUILDERS",
    "register_task_builder",
    "prepare_task",
    "load_task",
    "digits_halves",
    "fold_split",
    "digits_source",
    "digits_mod3",
]

SPLITS = ("train", "test")


@dataclass
class PreparedTask:
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]
    split: np.ndarray  # str [N], 'train' or 'test'
    classes: list[str]
    extra: dict  # free-form provenance written into meta.json

    def __post_init__(self):
        n = len(self.images)
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError("images must be uint8 [N, H, W, C]")
        if len(self.labels) != n or len(self.split) != n:
            raise ValueError("images, labels and split must have one entry per image")
        bad = set(np.unique(self.split)) - set(SPLITS)
        if bad:
            raise ValueError(f"unknown split names {sorted(bad)}")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError("labels must lie in [0, number of classes)")


TASK_BUILDERS: dict[str, Callable[..., PreparedTask]] = {}


def register_task_builder(fn: Callable[..., PreparedTask]) -> Callable[..., PreparedTask]:
    TASK_BUILDERS[fn.__name__] = fn
    return fn


# -- the embedded demo: scikit-learn's digits (SPEC §8) -------------------------------------------


def _digits_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 [N, size, size, 1] (bilinear upsampling of the 8×8 originals)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.ascontiguousarray(images), digits.target.astype(np.int64)


def digits_halves(targets: np.ndarray, seed: int) -> np.ndarray:
    """Seeded split of the digits into halves A and B, stratified by digit: returns a bool
    mask, True for half A."""
    rng = np.random.default_rng(seed)
    in_a = np.zeros(len(targets), dtype=bool)
    for digit in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == digit))
        in_a[idx[: len(idx) // 2]] = True
    return in_a


def _stratified_pick(labels: np.ndarray, per_class: Sequence[int] | int, rng) -> np.ndarray:
    chosen = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = per_class if isinstance(per_class, int) else per_class[c]
        if k > len(idx):
            raise ValueError(f"class {c} has {len(idx)} images, {k} asked for")
        chosen.append(idx[:k])
    return np.sort(np.concatenate(chosen))


@register_task_builder
def digits_source(
    *, size: int = 16, split_seed: int = 0, digits: Sequence[int] = (0, 1, 2, 3, 4, 5, 6), test_fraction: float = 0.2
) -> PreparedTask:
    """Source task: classify ``digits`` on half A, a seeded stratified train/test split."""
    images, target = _digits_images(size)
    keep = digits_halves(target, split_seed) & np.isin(target, list(digits))
    images, target = images[keep], target[keep]
    labels = np.searchsorted(np.array(sorted(digits)), target)
    rng = np.random.default_rng(split_seed + 1)
    per_class = [int(round(test_fraction * np.sum(labels == c))) for c in range(len(digits))]
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[_stratified_pick(labels, per_class, rng)] = True
    return PreparedTask(
        images=images,
        labels=labels,
        split=np.where(is_test, "test", "train"),
        classes=[str(d) for d in sorted(digits)],
        extra={"builder": "digits_source", "size": size, "split_seed": split_seed, "half": "A"},
    )


@register_task_builder
def digits_mod3(*, size: int = 16, split_seed: int = 0, per_class: int = 10) -> PreparedTask:
    """Target task: a digit's remainder modulo 3, on half B (which holds digits the source
    never saw); ``per_class`` training images per class, the rest of B is the test set."""
    images, target = _digits_images(size)
    keep = ~digits_halves(target, split_seed)
    images, labels = images[keep], target[keep] % 3
    rng = np.random.default_rng([split_seed, per_class])
    is_train = np.zeros(len(labels), dtype=bool)
    is_train[_stratified_pick(labels, per_class, rng)] = True
    return PreparedTask(
        images=images,
        labels=labels,
        split=np.where(is_train, "train", "test"),
        classes=["0 mod 3", "1 mod 3", "2 mod 3"],
        extra={"builder": "digits_mod3", "size": size, "split_seed": split_seed, "half": "B", "per_class": per_class},
    )


def fold_split(labels: np.ndarray, folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded K-fold split of a training set: (train indices, validation indices)
    for fold ``fold``. Each class's images are shuffled and dealt to the folds in turn, so every
    fold gets ⌊n_c/K⌋ or ⌈n_c/K⌉ images of class c."""
    if not 0 <= fold < folds:
        raise ValueError(f"fold {fold} outside [0, {folds})")
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        assignment[idx] = np.arange(len(idx)) % folds
    return np.flatnonzero(assignment != fold), np.flatnonzero(assignment == fold)


# -- on disk -------------------------------------------------------------------------------------


def prepare_task(builder: str, params: dict, out_dir: str | os.PathLike) -> Path:
    """Build a task and write it to ``out_dir`` atomically (all three files, or none)."""
    if builder not in TASK_BUILDERS:
        raise ValueError(f"unknown task builder {builder!r} (known: {sorted(TASK_BUILDERS)})")
    task = TASK_BUILDERS[builder](**params)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        if not isinstance(task, PreparedTask):  # a file list (spbench.datasets) decodes itself
            task.write(tmp)
            _record_digest(tmp)
            return out_dir
        np.save(tmp / "images.npy", task.images)
        import pandas as pd

        pd.DataFrame(
            {"index": np.arange(len(task.labels)), "label": task.labels, "split": task.split}
        ).to_parquet(tmp / "split.parquet", index=False)
        train = task.images[task.split == "train"].astype(np.float64) / 255.0
        meta = {
            "classes": task.classes,
            "num_classes": len(task.classes),
            "image_size": list(task.images.shape[1:3]),
            "channels": int(task.images.shape[3]),
            "mean": train.mean(axis=(0, 1, 2)).tolist(),
            "counts": {s: int(np.sum(task.split == s)) for s in SPLITS},
            **task.extra,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _record_digest(tmp)
    return out_dir


def _record_digest(task_dir: Path) -> None:
    """Add ``content_sha256`` (of the image cache and the split file) to a task's meta.json:
    the task's version, as the tracker's dataset digest and the records name it."""
    import hashlib

    h = hashlib.sha256()
    for name in ("images.npy", "split.parquet"):
        with open(task_dir / name, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    meta = json.loads((task_dir / "meta.json").read_text())
    meta["content_sha256"] = h.hexdigest()
    (task_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


@dataclass
class TaskData:
    """A prepared task, read back: images as float tensors, mean-subtracted."""

    meta: dict
    x: dict[str, torch.Tensor]  # split -> float32 [n, C, H, W]
    y: dict[str, torch.Tensor]  # split -> int64 [n]

    @property
    def num_classes(self) -> int:
        return self.meta["num_classes"]

    @property
    def channels(self) -> int:
        return self.meta["channels"]


def read_split(task_dir: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """A prepared task's ``split.parquet`` as {split name: {"index": …, "label": …}} (numpy
    arrays, file order), read with pyarrow alone: a fine-tune job need not import pandas."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(task_dir) / "split.parquet", columns=["index", "label", "split"])
    names = np.asarray(table["split"].to_pylist())
    index, label = table["index"].to_numpy(), table["label"].to_numpy().astype(np.int64)
    return {name: {"index": index[names == name], "label": label[names == name]} for name in SPLITS}


def load_task(task_dir: str | os.PathLike) -> TaskData:
    task_dir = Path(task_dir)
    meta = json.loads((task_dir / "meta.json").read_text())
    images = np.load(task_dir / "images.npy", mmap_mode="r")
    mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    xs, ys = {}, {}
    for name, rows in read_split(task_dir).items():
        batch = torch.from_numpy(np.ascontiguousarray(images[rows["index"]]))
        xs[name] = batch.permute(0, 3, 1, 2).float().div_(255.0).sub_(mean).contiguous()
        ys[name] = torch.tensor(rows["label"])
    return TaskData(meta=meta, x=xs, y=ys)


# The real data sets register their builders here too (imported last: it uses the registry).
from . import datasets as _datasets  # noqa: E402,F401
