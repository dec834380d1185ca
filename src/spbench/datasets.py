"""The paper's real data sets (SPEC §5) as task builders, and the decoder that caches them.

Each builder reads a data set as its provider ships it — an extracted archive folder and, where
the split is official, the provider's list files — and returns a :class:`FileListTask`: image
files, labels and the train/test split, not yet decoded. :func:`spbench.data.prepare_task`
then has it decode every image once into the task's uint8 cache (``images.npy``,
``size``×``size``×3, bilinear resize of the whole image, grey and CMYK converted to RGB) next
to ``split.parquet`` (which also names each image's ``file``, so a run can say which images
it saw) and ``meta.json`` (with the training split's per-channel mean and std).

Splits (SPEC §5):

- ``mit_indoor67``: the official ``TrainImages.txt`` / ``TestImages.txt`` (80 + 20 per class).
- ``stanford_dogs``: the official ``train_list.mat`` / ``test_list.mat`` (100 per class train).
- ``caltech256``: seeded per-class sampling: per class, a permutation drawn from
  ``[split_seed, class index]``; its first ``test_per_class`` images are the test set and the
  next ``per_class`` the training set. So Caltech-256-30 and -60 with the same seed share their
  test set, and the 30 training images are among the 60. **Clutter**: the folder
  ``257.clutter`` is kept as the 257th class (the paper's Table 1 counts 257 classes) and is
  sampled like every other class; ``clutter=False`` drops it (256 classes).
- ``places365_val`` / ``imagenet_val`` (source tasks): the validation set, split seeded per
  class into ``fisher_per_class`` images labelled ``train`` (the Fisher estimate's inputs) and
  the rest labelled ``test`` (source accuracy), so the two never share an image.
"""

from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .data import register_task_builder
from .progress import Progress

__all__ = [
    "FileListTask",
    "decode_image",
    "caltech256",
    "mit_indoor67",
    "stanford_dogs",
    "places365_val",
    "imagenet_val",
    "RAW_INPUTS",
    "CONVERTERS",
    "convert_weights",
    "check_inputs",
]

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


def decode_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """One image file -> uint8 [size, size, 3]: RGB (grey, palette, CMYK converted), the whole
    image resized (bilinear, aspect ratio not kept: the paper's 256×256)."""
    from PIL import Image

    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when it is still >= size
        img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def _decode_chunk(args: tuple[list[str], int]) -> np.ndarray:
    paths, size = args
    return np.stack([decode_image(p, size) for p in paths]) if paths else np.zeros((0, size, size, 3), np.uint8)


@dataclass
class FileListTask:
    """A task as image files (``root / files[i]``), labels and split, decoded on :meth:`write`."""

    root: Path
    files: list[str]
    labels: np.ndarray
    split: np.ndarray
    classes: list[str]
    size: int = 256
    workers: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.split = np.asarray(self.split)
        n = len(self.files)
        if len(self.labels) != n or len(self.split) != n:
            raise ValueError("files, labels and split must have one entry per image")
        if n == 0:
            raise ValueError(f"no images found under {self.root}")
        bad = set(np.unique(self.split)) - {"train", "test"}
        if bad:
            raise ValueError(f"unknown split names {sorted(bad)}")
        if self.labels.min() < 0 or self.labels.max() >= len(self.classes):
            raise ValueError("labels must lie in [0, number of classes)")

    def write(self, out: Path, chunk: int = 256) -> None:
        """Decode every image into ``out/images.npy`` (written in place through a memory map,
        never whole in memory) and write ``split.parquet`` and ``meta.json``."""
        from numpy.lib.format import open_memmap

        n, s = len(self.files), self.size
        images = open_memmap(out / "images.npy", mode="w+", dtype=np.uint8, shape=(n, s, s, 3))
        paths = [str(self.root / f) for f in self.files]
        jobs = [(paths[i : i + chunk], s) for i in range(0, n, chunk)]
        is_train = self.split == "train"
        total, total_sq, count = np.zeros(3), np.zeros(3), 0
        executor = ProcessPoolExecutor(self.workers) if self.workers > 1 else None
        bar = Progress(n, f"decode {self.root.name}", unit="images", logger=log)
        try:
            batches = executor.map(_decode_chunk, jobs) if executor else map(_decode_chunk, jobs)
            for i, batch in zip(range(0, n, chunk), batches):
                images[i : i + len(batch)] = batch
                train = batch[is_train[i : i + len(batch)]].reshape(-1, 3).astype(np.float64) / 255.0
                total += train.sum(0)
                total_sq += (train**2).sum(0)
                count += len(train)
                bar.update(len(batch))
        finally:
            bar.close()
            if executor:
                executor.shutdown()
        images.flush()
        del images
        pd.DataFrame(
            {"index": np.arange(n), "label": self.labels, "split": self.split, "file": self.files}
        ).to_parquet(out / "split.parquet", index=False)
        mean = total / max(count, 1)
        std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean**2, 0.0))
        meta = {
            "classes": self.classes,
            "num_classes": len(self.classes),
            "image_size": [s, s],
            "channels": 3,
            "mean": mean.tolist(),
            "std": std.tolist(),
            "counts": {name: int(np.sum(self.split == name)) for name in ("train", "test")},
            **self.extra,
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _images_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _seeded_split(labels: np.ndarray, first: dict[int, int] | int, second: int | None, seed_parts: Sequence[int]):
    """Per class, a seeded permutation: its first ``first`` images and its next ``second``
    (all the rest when None). Returns two index arrays (sorted)."""
    a, b = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = first if isinstance(first, int) else first[int(c)]
        need = k + (second or 0)
        if need > len(idx):
            raise ValueError(f"class {c} has {len(idx)} images, {need} needed")
        perm = idx[np.random.default_rng([*seed_parts, int(c)]).permutation(len(idx))]
        a.append(perm[:k])
        b.append(perm[k : k + second] if second is not None else perm[k:])
    return np.sort(np.concatenate(a)), np.sort(np.concatenate(b))


@register_task_builder
def caltech256(
    *,
    images: str,
    per_class: int = 30,
    test_per_class: int = 20,
    split_seed: int = 0,
    clutter: bool = True,
    size: int = 256,
    workers: int = 1,
) -> FileListTask:
    """Caltech-256-``per_class`` (SPEC §5): ``images`` is the extracted
    ``256_ObjectCategories.tar`` (folders ``001.ak47`` … ``257.clutter``); per class
    ``test_per_class`` test and ``per_class`` training images, seeded (module docstring)."""
    root = Path(images)
    top = root / "256_ObjectCategories" if (root / "256_ObjectCategories").is_dir() else root
    folders = sorted(p.name for p in top.iterdir() if p.is_dir() and re.match(r"^\d{3}\.", p.name))
    if not clutter:
        folders = [f for f in folders if not f.endswith(".clutter")]
    files, labels = [], []
    for c, folder in enumerate(folders):
        names = _images_in(top / folder)
        files += [f"{folder}/{n}" for n in names]
        labels += [c] * len(names)
    labels = np.asarray(labels, dtype=np.int64)
    test, train = _seeded_split(labels, test_per_class, per_class, [split_seed])
    keep = np.concatenate([train, test])
    split = np.array(["train"] * len(train) + ["test"] * len(test))
    order = np.argsort(keep, kind="stable")
    keep, split = keep[order], split[order]
    return FileListTask(
        root=top,
        files=[files[i] for i in keep],
        labels=labels[keep],
        split=split,
        classes=[f.split(".", 1)[1] for f in folders],
        size=size,
        workers=workers,
        extra={"builder": "caltech256", "per_class": per_class, "test_per_class": test_per_class,
               "split_seed": split_seed, "clutter": clutter, "size": size},
    )


def _read_list(path: Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


@register_task_builder
def mit_indoor67(*, images: str, train_list: str, test_list: str, size: int = 256, workers: int = 1) -> FileListTask:
    """MIT Indoors 67 with its official split: ``images`` is the extracted ``indoorCVPR_09.tar``
    (``Images/<class>/<file>``); the lists name files as ``<class>/<file>``."""
    root = Path(images)
    top = root / "Images" if (root / "Images").is_dir() else root
    train, test = _read_list(Path(train_list)), _read_list(Path(test_list))
    classes = sorted({f.split("/", 1)[0] for f in train + test})
    index = {c: i for i, c in enumerate(classes)}
    files = train + test
    missing = [f for f in files if not (top / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} listed images missing under {top}, e.g. {missing[0]}")
    return FileListTask(
        root=top,
        files=files,
        labels=np.array([index[f.split("/", 1)[0]] for f in files]),
        split=np.array(["train"] * len(train) + ["test"] * len(test)),
        classes=classes,
        size=size,
        workers=workers,
        extra={"builder": "mit_indoor67", "size": size, "split": "official TrainImages.txt / TestImages.txt"},
    )


def _mat_list(path: Path) -> tuple[list[str], np.ndarray]:
    from scipy.io import loadmat

    mat = loadmat(path)
    files = [str(np.asarray(cell).ravel()[0]) for cell in mat["file_list"].ravel()]
    return files, np.asarray(mat["labels"]).ravel().astype(np.int64)


@register_task_builder
def stanford_dogs(*, images: str, lists: str, size: int = 256, workers: int = 1) -> FileListTask:
    """Stanford Dogs 120 with its official split: ``images`` is the extracted ``images.tar``
    (``Images/<wnid>-<breed>/<file>``), ``lists`` the extracted ``lists.tar``
    (``train_list.mat``, ``test_list.mat``: ``file_list`` and 1-based ``labels``)."""
    root = Path(images)
    top = root / "Images" if (root / "Images").is_dir() else root
    train, train_y = _mat_list(Path(lists) / "train_list.mat")
    test, test_y = _mat_list(Path(lists) / "test_list.mat")
    folders = sorted({f.split("/", 1)[0] for f in train + test})
    index = {c: i for i, c in enumerate(folders)}
    files = train + test
    labels = np.array([index[f.split("/", 1)[0]] for f in files])
    if not np.array_equal(labels + 1, np.concatenate([train_y, test_y])):
        raise ValueError("the .mat labels disagree with the breed folders of the listed files")
    return FileListTask(
        root=top,
        files=files,
        labels=labels,
        split=np.array(["train"] * len(train) + ["test"] * len(test)),
        classes=[f.split("-", 1)[1] if "-" in f else f for f in folders],
        size=size,
        workers=workers,
        extra={"builder": "stanford_dogs", "size": size, "split": "official train_list.mat / test_list.mat",
               "wnids": [f.split("-", 1)[0] for f in folders]},
    )


def _validation_task(root: Path, files: list[str], labels: np.ndarray, classes: list[str], *, fisher_per_class: int,
                     split_seed: int, size: int, workers: int, extra: dict) -> FileListTask:
    fisher, _ = _seeded_split(labels, fisher_per_class, None, [split_seed])
    split = np.full(len(files), "test", dtype=object)
    split[fisher] = "train"
    return FileListTask(root=root, files=files, labels=labels, split=split.astype(str), classes=classes, size=size,
                        workers=workers, extra={**extra, "fisher_per_class": fisher_per_class, "split_seed": split_seed,
                                                "size": size})


@register_task_builder
def places365_val(
    *, images: str, filelist: str, fisher_per_class: int = 20, split_seed: int = 0, size: int = 256, workers: int = 1
) -> FileListTask:
    """Places365 validation set (36,500 images, 100 per class): ``images`` is the extracted
    ``val_256.tar`` (``val_256/Places365_val_*.jpg``), ``filelist`` the extracted
    ``filelist_places365-standard.tar`` (``categories_places365.txt``, ``places365_val.txt``)."""
    root = Path(images)
    top = root / "val_256" if (root / "val_256").is_dir() else root
    lists = Path(filelist)
    categories = sorted((int(i), name) for name, i in (line.split() for line in _read_list(lists / "categories_places365.txt")))
    classes = [name for _, name in categories]
    rows = [line.split() for line in _read_list(lists / "places365_val.txt")]
    return _validation_task(
        top, [r[0] for r in rows], np.array([int(r[1]) for r in rows]), classes, fisher_per_class=fisher_per_class,
        split_seed=split_seed, size=size, workers=workers, extra={"builder": "places365_val"})


@register_task_builder
def imagenet_val(
    *, images: str, devkit: str, fisher_per_class: int = 10, split_seed: int = 0, size: int = 256, workers: int = 1
) -> FileListTask:
    """ImageNet (ILSVRC-2012) validation set, 50,000 images: ``images`` is the extracted
    ``ILSVRC2012_img_val.tar`` (flat ``ILSVRC2012_val_%08d.JPEG``), ``devkit`` the extracted
    ``ILSVRC2012_devkit_t12.tar.gz`` (``data/meta.mat``,
    ``data/ILSVRC2012_validation_ground_truth.txt``). Labels follow torchvision's class order:
    the 1,000 leaf synsets sorted by WordNet id."""
    from scipy.io import loadmat

    data = Path(devkit)
    data = data / "ILSVRC2012_devkit_t12" / "data" if (data / "ILSVRC2012_devkit_t12").is_dir() else data / "data"
    synsets = loadmat(data / "meta.mat", squeeze_me=True)["synsets"]
    leaves = [(int(s["ILSVRC2012_ID"]), str(s["WNID"]), str(s["words"])) for s in synsets if int(s["num_children"]) == 0]
    wnids = sorted(w for _, w, _ in leaves)
    rank = {w: i for i, w in enumerate(wnids)}
    id_to_label = {i: rank[w] for i, w, _ in leaves}
    words = {w: t for _, w, t in leaves}
    truth = [int(x) for x in _read_list(data / "ILSVRC2012_validation_ground_truth.txt")]
    files = [f"ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(len(truth))]
    return _validation_task(
        Path(images), files, np.array([id_to_label[t] for t in truth]), [words[w] for w in wnids],
        fisher_per_class=fisher_per_class, split_seed=split_seed, size=size, workers=workers,
        extra={"builder": "imagenet_val", "wnids": wnids})


#: Builder arguments that name a download (``downloads:`` in the config); the workflow passes
#: the builder that download's extracted folder (archives) or file instead of the name.
RAW_INPUTS: dict[str, tuple[str, ...]] = {
    "caltech256": ("images",),
    "mit_indoor67": ("images", "train_list", "test_list"),
    "stanford_dogs": ("images", "lists"),
    "places365_val": ("images", "filelist"),
    "imagenet_val": ("images", "devkit"),
}


# -- published source networks ------------------------------------------------------------------

#: Weight converters: a published checkpoint -> a state dict of spbench's Classifier
#: (``backbone.<torchvision name>``, ``head.weight``/``head.bias`` from the source's ``fc``).
CONVERTERS = ("torchvision", "places365")


def convert_weights(path: str | os.PathLike, converter: str) -> dict:
    """Read a published checkpoint with ``torch.load(weights_only=True)`` (no code runs) and
    rename its tensors. ``torchvision``: a plain torchvision ResNet state dict (e.g.
    ``resnet101-63fe2227.pth``). ``places365``: the Places365 CNN release
    (``resnet50_places365.pth.tar``: ``{'state_dict': {'module.conv1.weight': …}, …}``, saved
    from ``DataParallel``, ``fc`` over 365 classes)."""
    import torch

    blob = torch.load(path, map_location="cpu", weights_only=True)
    if converter == "places365":
        blob = blob["state_dict"] if "state_dict" in blob else blob
        blob = {k.removeprefix("module."): v for k, v in blob.items()}
    elif converter != "torchvision":
        raise ValueError(f"unknown weight converter {converter!r} (known: {list(CONVERTERS)})")
    if "fc.weight" not in blob:
        raise ValueError(f"{path}: no 'fc.weight' (is it a {converter} ResNet checkpoint?)")
    return {(f"head.{k[3:]}" if k.startswith("fc.") else f"backbone.{k}"): v for k, v in blob.items()}


def check_inputs(config: dict, error: type[Exception] = ValueError) -> None:
    """Semantic checks of the raw inputs (the schema checks their form): every download a
    task or source names exists; a checksum parses; a source with ``weights: download`` names
    its download and converter. Errors name the key."""
    from .download import parse_checksum

    downloads = config.get("downloads", {})
    known = f"(known: {sorted(downloads)})"
    for name, spec in downloads.items():
        try:
            parse_checksum(spec["checksum"])
        except ValueError as err:
            raise error(f"config key 'downloads.{name}.checksum': {err}") from None
    for name, task in config["tasks"].items():
        for key in RAW_INPUTS.get(task["builder"], ()):
            if key in task and task[key] not in downloads:
                raise error(f"config key 'tasks.{name}.{key}': no download named {task[key]!r} {known}")
    for name, src in config["sources"].items():
        if src["weights"] != "download":
            continue
        for key in ("download", "convert"):
            if key not in src:
                raise error(f"config key 'sources.{name}.{key}': required when weights is 'download'")
        if src["download"] not in downloads:
            raise error(f"config key 'sources.{name}.download': no download named {src['download']!r} {known}")
