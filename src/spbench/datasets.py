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
- ``cub200``: the official ``train_test_split.txt`` (5,994 train / 5,794 test, 200 species).
- ``stanford_cars``: the official ``cars_train_annos.mat`` / ``cars_test_annos_withlabels.mat``
  (8,144 / 8,041, 196 models).
- ``fgvc_aircraft``: the official ``trainval`` lists as the training set (6,667) and ``test``
  (3,333), at the ``variant`` (100 classes), ``family`` or ``manufacturer`` level.
- ``oxford_pets``: the official ``trainval.txt`` as the training set (3,680) and ``test.txt``
  (3,669), 37 breeds.
- ``flowers102``: the official ``setid.mat``: ``trnid`` + ``valid`` as the training set (2,040)
  and ``tstid`` the test set (6,149).
- ``dtd``: official partition ``k`` of 10: ``train<k>.txt`` + ``val<k>.txt`` as the training set
  (3,760) and ``test<k>.txt`` (1,880), 47 textures.

Label rates (the six fine-grained builders above; TLlib's 15 / 30 / 50 / 100 % protocol):
``label_rate`` percent of each class's training images are kept, the rest left out of the task;
the test set is untouched. Per class ``c`` with ``n_c`` training images (in the builder's order),
a permutation drawn from ``[label_seed, c]``; its first ``max(1, round(n_c * label_rate / 100))``
images are kept (Python's ``round``: halves go to the even neighbour). So with the same seed the
15 % images are among the 30 %, those among the 50 %, and 100 % is the whole official training
set. ``label_rate`` and ``label_seed`` are recorded in meta.json.
"""

from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence, get_args

import numpy as np

from .data import register_task_builder
from .progress import Progress

__all__ = [
    "FileListTask",
    "decode_image",
    "caltech256",
    "mit_indoor67",
    "stanford_dogs",
    "cub200",
    "stanford_cars",
    "fgvc_aircraft",
    "oxford_pets",
    "flowers102",
    "dtd",
    "places365_val",
    "imagenet_val",
    "RAW_INPUTS",
    "CONVERTERS",
    "HEAD_PREFIXES",
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
        import pandas as pd

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


def _subfolder(root: Path, name: str) -> Path:
    """``root / name`` where the extracted archive holds that folder, else ``root`` (the folder
    itself was given)."""
    return root / name if (root / name).is_dir() else root


def _require_files(top: Path, files: Sequence[str]) -> None:
    missing = [f for f in files if not (top / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} listed images missing under {top}, e.g. {missing[0]}")


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
    top = _subfolder(Path(images), "256_ObjectCategories")
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
    top = _subfolder(Path(images), "Images")
    train, test = _read_list(Path(train_list)), _read_list(Path(test_list))
    classes = sorted({f.split("/", 1)[0] for f in train + test})
    index = {c: i for i, c in enumerate(classes)}
    files = train + test
    _require_files(top, files)
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
    top = _subfolder(Path(images), "Images")
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


# -- fine-grained targets, with label rates -------------------------------------------------------


def _with_label_rate(task: FileListTask, label_rate: int, label_seed: int) -> FileListTask:
    """The task with ``label_rate`` percent of each class's training images (module docstring:
    per class ``c``, the first ``max(1, round(n_c * label_rate / 100))`` of a permutation drawn
    from ``[label_seed, c]``); every test image kept, file order kept."""
    if isinstance(label_rate, bool) or not isinstance(label_rate, int) or not 0 < label_rate <= 100:
        raise ValueError(f"label_rate is a percentage in (0, 100], not {label_rate!r}")
    train = np.flatnonzero(task.split == "train")
    y = task.labels[train]
    keep_n = {int(c): max(1, round(int(np.sum(y == c)) * label_rate / 100)) for c in np.unique(y)}
    kept, _ = _seeded_split(y, keep_n, None, [label_seed])
    keep = np.sort(np.concatenate([train[kept], np.flatnonzero(task.split != "train")]))
    return replace(task, files=[task.files[i] for i in keep], labels=task.labels[keep], split=task.split[keep],
                   extra={**task.extra, "label_rate": label_rate, "label_seed": label_seed})


def _id_table(path: Path) -> dict[int, str]:
    """``<id> <value>`` lines (CUB's list files) -> {id: value}."""
    return {int(i): v for i, v in (line.split(maxsplit=1) for line in _read_list(path))}


@register_task_builder
def cub200(
    *, images: str, label_rate: int = 100, label_seed: int = 0, size: int = 256, workers: int = 1
) -> FileListTask:
    """CUB-200-2011 with its official split (5,994 train / 5,794 test, 200 species): ``images``
    is the extracted ``CUB_200_2011.tgz`` (``CUB_200_2011/images/<NNN.Name>/<file>.jpg``;
    ``images.txt``: ``<id> <NNN.Name>/<file>.jpg``, ``image_class_labels.txt``: ``<id> <class
    1..200>``, ``train_test_split.txt``: ``<id> <1 train, 0 test>``, ``classes.txt``: ``<class>
    <NNN.Name>``). Images by id; label rates: module docstring."""
    top = _subfolder(Path(images), "CUB_200_2011")
    paths, labels, is_train = (_id_table(top / n) for n in ("images.txt", "image_class_labels.txt",
                                                             "train_test_split.txt"))
    classes = _id_table(top / "classes.txt")
    if not (paths.keys() == labels.keys() == is_train.keys()):
        raise ValueError(f"{top}: images.txt, image_class_labels.txt and train_test_split.txt list different ids")
    if sorted(classes) != list(range(1, len(classes) + 1)):
        raise ValueError(f"{top / 'classes.txt'}: class ids are not 1..{len(classes)}")
    ids = sorted(paths)
    files = [paths[i] for i in ids]
    label = np.array([int(labels[i]) - 1 for i in ids])
    folders = [classes[k] for k in sorted(classes)]
    if any(f.split("/", 1)[0] != folders[y] for f, y in zip(files, label) if 0 <= y < len(folders)):
        raise ValueError("image_class_labels.txt disagrees with the species folders of images.txt")
    _require_files(top / "images", files)
    task = FileListTask(
        root=top / "images",
        files=files,
        labels=label,
        split=np.array(["train" if is_train[i].strip() == "1" else "test" for i in ids]),
        classes=[f.split(".", 1)[1] if "." in f else f for f in folders],
        size=size,
        workers=workers,
        extra={"builder": "cub200", "size": size, "split": "official train_test_split.txt"},
    )
    return _with_label_rate(task, label_rate, label_seed)


def _cars_annotations(path: Path) -> tuple[list[str], list[int]]:
    """A Stanford Cars annotation file: struct array ``annotations`` (``bbox_x1`` … ``bbox_y2``,
    1-based ``class``, ``fname``) -> file names and 0-based labels."""
    from scipy.io import loadmat

    rows = np.atleast_1d(loadmat(path, squeeze_me=True)["annotations"])
    return [str(r["fname"]) for r in rows], [int(r["class"]) - 1 for r in rows]


@register_task_builder
def stanford_cars(
    *,
    train_images: str,
    test_images: str,
    devkit: str,
    test_annos: str,
    label_rate: int = 100,
    label_seed: int = 0,
    size: int = 256,
    workers: int = 1,
) -> FileListTask:
    """Stanford Cars (196 models, 8,144 train / 8,041 test) with its official split, the
    original release as torchvision's ``StanfordCars`` reads it: ``train_images`` and
    ``test_images`` are the extracted ``cars_train.tgz`` / ``cars_test.tgz``
    (``cars_train/<NNNNN>.jpg``, ``cars_test/<NNNNN>.jpg``), ``devkit`` the extracted
    ``car_devkit.tgz`` (``devkit/cars_meta.mat``: ``class_names``; ``devkit/cars_train_annos.mat``:
    struct array ``annotations`` with ``fname``, 1-based ``class`` and ``bbox_*``), ``test_annos``
    the file ``cars_test_annos_withlabels.mat`` (the same struct for the test images; the
    devkit's ``cars_test_annos.mat`` has no labels). Whole images: the boxes are not used. Files
    are named relative to the two image folders' common parent; label rates: module docstring."""
    from scipy.io import loadmat

    kit = _subfolder(Path(devkit), "devkit")
    classes = [str(c) for c in np.atleast_1d(loadmat(kit / "cars_meta.mat", squeeze_me=True)["class_names"])]
    folders = {"train": _subfolder(Path(train_images), "cars_train"),
               "test": _subfolder(Path(test_images), "cars_test")}
    annos = {"train": kit / "cars_train_annos.mat", "test": Path(test_annos)}
    root = Path(os.path.commonpath([folders["train"].resolve(), folders["test"].resolve()]))
    files, labels, split = [], [], []
    for name in ("train", "test"):
        names, ys = _cars_annotations(annos[name])
        prefix = folders[name].resolve().relative_to(root)
        files += [(prefix / f).as_posix() for f in names]
        labels += ys
        split += [name] * len(names)
    _require_files(root, files)
    task = FileListTask(
        root=root,
        files=files,
        labels=np.array(labels),
        split=np.array(split),
        classes=classes,
        size=size,
        workers=workers,
        extra={"builder": "stanford_cars", "size": size,
               "split": "official cars_train_annos.mat / cars_test_annos_withlabels.mat"},
    )
    return _with_label_rate(task, label_rate, label_seed)


#: FGVC-Aircraft's annotation levels (the config checks ``annotation`` against them before any
#: job runs) and the files that name (and order) their classes.
AircraftLevel = Literal["variant", "family", "manufacturer"]
AIRCRAFT_LEVELS = dict(zip(get_args(AircraftLevel), ("variants.txt", "families.txt", "manufacturers.txt")))


@register_task_builder
def fgvc_aircraft(
    *,
    images: str,
    annotation: AircraftLevel = "variant",
    label_rate: int = 100,
    label_seed: int = 0,
    size: int = 256,
    workers: int = 1,
) -> FileListTask:
    """FGVC-Aircraft 2013b with its official split, ``trainval`` (6,667) as the training set and
    ``test`` (3,333): ``images`` is the extracted ``fgvc-aircraft-2013b.tar.gz``
    (``fgvc-aircraft-2013b/data/images/<id>.jpg``; ``data/images_<annotation>_trainval.txt`` and
    ``data/images_<annotation>_test.txt``: ``<id> <class name>``, names with spaces and slashes;
    the classes in the order of ``data/variants.txt`` / ``families.txt`` / ``manufacturers.txt``,
    as torchvision's ``FGVCAircraft``). ``annotation``: ``variant`` (100 classes), ``family`` or
    ``manufacturer``. **Banner**: the images keep the 20-pixel copyright banner along their
    bottom edge (no crop, as in torchvision): the whole image is resized like every task's.
    Label rates: module docstring."""
    if annotation not in AIRCRAFT_LEVELS:
        raise ValueError(f"annotation must be one of {list(AIRCRAFT_LEVELS)}, not {annotation!r}")
    data = _subfolder(Path(images), "fgvc-aircraft-2013b") / "data"
    classes = _read_list(data / AIRCRAFT_LEVELS[annotation])
    index = {c: i for i, c in enumerate(classes)}
    files, labels, split = [], [], []
    for name, listed in (("train", "trainval"), ("test", "test")):
        path = data / f"images_{annotation}_{listed}.txt"
        for line in _read_list(path):
            image_id, label = line.split(" ", 1)
            if label not in index:
                raise ValueError(f"{path}: class {label!r} is not in {AIRCRAFT_LEVELS[annotation]}")
            files.append(f"{image_id}.jpg")
            labels.append(index[label])
            split.append(name)
    _require_files(data / "images", files)
    task = FileListTask(
        root=data / "images",
        files=files,
        labels=np.array(labels),
        split=np.array(split),
        classes=classes,
        size=size,
        workers=workers,
        extra={"builder": "fgvc_aircraft", "size": size, "annotation": annotation,
               "split": "official trainval / test", "banner": "kept (not cropped)"},
    )
    return _with_label_rate(task, label_rate, label_seed)


@register_task_builder
def oxford_pets(
    *, images: str, annotations: str, label_rate: int = 100, label_seed: int = 0, size: int = 256, workers: int = 1
) -> FileListTask:
    """Oxford-IIIT Pets (37 breeds) with its official split, ``trainval`` (3,680) as the training
    set and ``test`` (3,669): ``images`` is the extracted ``images.tar.gz``
    (``images/<Breed_name>_<n>.jpg``), ``annotations`` the extracted ``annotations.tar.gz``
    (``annotations/trainval.txt``, ``annotations/test.txt``: ``<image name without .jpg> <class
    1..37> <species> <breed id>``, lines starting with ``#`` are comments). Class names are the
    image names' breed part (``Abyssinian``, ``american_bulldog``, …), ordered by class id.
    Label rates: module docstring."""
    top = _subfolder(Path(images), "images")
    anns = _subfolder(Path(annotations), "annotations")
    files, labels, split, breeds = [], [], [], {}
    for name, listed in (("train", "trainval.txt"), ("test", "test.txt")):
        for line in _read_list(anns / listed):
            if line.startswith("#"):
                continue
            image, class_id = line.split()[:2]
            breeds.setdefault(int(class_id), set()).add(image.rsplit("_", 1)[0])
            files.append(f"{image}.jpg")
            labels.append(int(class_id) - 1)
            split.append(name)
    if sorted(breeds) != list(range(1, len(breeds) + 1)) or any(len(b) != 1 for b in breeds.values()):
        raise ValueError(f"{anns}: class ids must be 1..{len(breeds)}, each naming one breed")
    _require_files(top, files)
    task = FileListTask(
        root=top,
        files=files,
        labels=np.array(labels),
        split=np.array(split),
        classes=[next(iter(breeds[k])) for k in sorted(breeds)],
        size=size,
        workers=workers,
        extra={"builder": "oxford_pets", "size": size, "split": "official trainval.txt / test.txt"},
    )
    return _with_label_rate(task, label_rate, label_seed)


@register_task_builder
def flowers102(
    *,
    images: str,
    labels: str,
    setid: str,
    label_rate: int = 100,
    label_seed: int = 0,
    size: int = 256,
    workers: int = 1,
) -> FileListTask:
    """Oxford Flowers-102 with its official split: ``trnid`` + ``valid`` (10 + 10 per class,
    2,040) as the training set and ``tstid`` (6,149) the test set. ``images`` is the extracted
    ``102flowers.tgz`` (``jpg/image_%05d.jpg``), ``labels`` the file ``imagelabels.mat``
    (``labels``: 1..102, one per image, by image number), ``setid`` the file ``setid.mat``
    (``trnid``, ``valid``, ``tstid``: 1-based image numbers). The release names no classes:
    they are named by their label, ``"1"`` … ``"102"``. Label rates: module docstring."""
    from scipy.io import loadmat

    top = _subfolder(Path(images), "jpg")
    per_image = np.atleast_1d(loadmat(labels, squeeze_me=True)["labels"]).astype(np.int64)
    sets = loadmat(setid, squeeze_me=True)
    files, label, split = [], [], []
    for name, keys in (("train", ("trnid", "valid")), ("test", ("tstid",))):
        for key in keys:
            ids = np.atleast_1d(sets[key]).astype(np.int64)
            if ids.size and (ids.min() < 1 or ids.max() > len(per_image)):
                raise ValueError(f"{setid}: {key} names images outside 1..{len(per_image)}")
            files += [f"image_{i:05d}.jpg" for i in ids]
            label += [int(per_image[i - 1]) - 1 for i in ids]
            split += [name] * len(ids)
    _require_files(top, files)
    n_classes = int(per_image.max())
    task = FileListTask(
        root=top,
        files=files,
        labels=np.array(label),
        split=np.array(split),
        classes=[str(k) for k in range(1, n_classes + 1)],
        size=size,
        workers=workers,
        extra={"builder": "flowers102", "size": size, "split": "official setid.mat: trnid + valid / tstid"},
    )
    return _with_label_rate(task, label_rate, label_seed)


@register_task_builder
def dtd(
    *, images: str, partition: int = 1, label_rate: int = 100, label_seed: int = 0, size: int = 256, workers: int = 1
) -> FileListTask:
    """Describable Textures (47 classes, 120 images each) with official partition ``partition``
    (1..10): ``train<k>.txt`` + ``val<k>.txt`` (80 per class) as the training set and
    ``test<k>.txt`` (40 per class) the test set. ``images`` is the extracted
    ``dtd-r1.0.1.tar.gz`` (``dtd/images/<class>/<file>.jpg``; ``dtd/labels/train<k>.txt``,
    ``val<k>.txt``, ``test<k>.txt``: ``<class>/<file>.jpg``). Classes sorted by name, as
    torchvision's ``DTD``. Label rates: module docstring."""
    if isinstance(partition, bool) or not isinstance(partition, int) or not 1 <= partition <= 10:
        raise ValueError(f"partition must be an integer in 1..10, not {partition!r}")
    top = _subfolder(Path(images), "dtd")
    lists = {name: _read_list(top / "labels" / f"{name}{partition}.txt") for name in ("train", "val", "test")}
    train, test = lists["train"] + lists["val"], lists["test"]
    classes = sorted({f.split("/", 1)[0] for f in train + test})
    index = {c: i for i, c in enumerate(classes)}
    files = train + test
    _require_files(top / "images", files)
    task = FileListTask(
        root=top / "images",
        files=files,
        labels=np.array([index[f.split("/", 1)[0]] for f in files]),
        split=np.array(["train"] * len(train) + ["test"] * len(test)),
        classes=classes,
        size=size,
        workers=workers,
        extra={"builder": "dtd", "size": size, "partition": partition,
               "split": f"official train{partition}.txt + val{partition}.txt / test{partition}.txt"},
    )
    return _with_label_rate(task, label_rate, label_seed)


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
    top = _subfolder(Path(images), "val_256")
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
    "cub200": ("images",),
    "stanford_cars": ("train_images", "test_images", "devkit", "test_annos"),
    "fgvc_aircraft": ("images",),
    "oxford_pets": ("images", "annotations"),
    "flowers102": ("images", "labels", "setid"),
    "dtd": ("images",),
    "places365_val": ("images", "filelist"),
    "imagenet_val": ("images", "devkit"),
}


# -- published source networks ------------------------------------------------------------------

#: Weight converters: a published checkpoint -> a state dict of spbench's Classifier
#: (``backbone.<torchvision name>``, ``head.weight``/``head.bias`` from the source's
#: classification layer, see :data:`HEAD_PREFIXES`).
CONVERTERS = ("torchvision", "places365")

#: The classification layer of each torchvision family in :data:`spbench.models.ARCHITECTURES`,
#: as its state-dict key prefix: ResNet ``fc``, ViT ``heads.head``, ConvNeXt ``classifier.2``
#: (its ``classifier.0``, the final LayerNorm2d, stays in the backbone).
HEAD_PREFIXES = ("fc.", "heads.head.", "classifier.2.")


def convert_weights(path: str | os.PathLike, converter: str) -> dict:
    """Read a published checkpoint with ``torch.load(weights_only=True)`` (no code runs) and
    rename its tensors: those of the one classification layer it holds (the prefix of
    :data:`HEAD_PREFIXES` whose ``weight`` is among its keys) to ``head.*``, all others to
    ``backbone.*``. ``torchvision``: a plain torchvision state dict of a registered
    architecture (e.g. ``resnet101-63fe2227.pth``, ``vit_b_16-c867db91.pth``,
    ``convnext_tiny-983f1562.pth``). ``places365``: the Places365 CNN release
    (``resnet50_places365.pth.tar``: ``{'state_dict': {'module.conv1.weight': …}, …}``, saved
    from ``DataParallel``, ``fc`` over 365 classes)."""
    import torch

    blob = torch.load(path, map_location="cpu", weights_only=True)
    if converter == "places365":
        blob = blob["state_dict"] if "state_dict" in blob else blob
        blob = {k.removeprefix("module."): v for k, v in blob.items()}
    elif converter != "torchvision":
        raise ValueError(f"unknown weight converter {converter!r} (known: {list(CONVERTERS)})")
    heads = [p for p in HEAD_PREFIXES if f"{p}weight" in blob]
    if not heads:
        keys = ", ".join(repr(f"{p}weight") for p in HEAD_PREFIXES)
        raise ValueError(f"{path}: no {keys} (no classification layer: is it a {converter} checkpoint "
                         "of a registered architecture?)")
    if len(heads) > 1:
        raise ValueError(f"{path}: more than one classification layer ({', '.join(p + 'weight' for p in heads)})")
    head = heads[0]
    return {(f"head.{k[len(head):]}" if k.startswith(head) else f"backbone.{k}"): v for k, v in blob.items()}


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
