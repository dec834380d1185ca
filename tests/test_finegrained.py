"""The six fine-grained targets (CUB-200-2011, Stanford Cars, FGVC-Aircraft, Oxford-IIIT Pets,
Flowers-102, DTD) on generated archives in each real layout, packed as the provider ships them
and unpacked by the workflow's extractor: splits, labels and class names checked against the
list files; then the label rates (15 / 30 / 50 / 100 % per class) against a brute-force
expectation, and a config that uses the new builders."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fake_sources import jpeg, make_tar
from spbench.config import ConfigError, validate_config
from spbench.data import prepare_task
from spbench.datasets import (
    RAW_INPUTS,
    FileListTask,
    _with_label_rate,
    cub200,
    dtd,
    fgvc_aircraft,
    flowers102,
    oxford_pets,
    stanford_cars,
)
from spbench.download import extract_archive

REPO = Path(__file__).resolve().parents[1]
SIZE = 24  # the real tasks use 256


def png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def unpack(tmp_path: Path, name: str, entries: dict[str, bytes], mode: str = "w:gz") -> Path:
    """Pack ``entries`` as the gzipped tar ``raw/<name>`` and extract it as the workflow does."""
    (tmp_path / "raw").mkdir(exist_ok=True)
    return extract_archive(make_tar(entries, tmp_path / "raw" / name, mode), tmp_path / "extracted" / name)


def mat(**arrays) -> bytes:
    from scipy.io import savemat

    buf = io.BytesIO()
    savemat(buf, arrays)
    return buf.getvalue()


def lines(rows) -> bytes:
    return "".join(f"{r}\n" for r in rows).encode()


def by_split(task: FileListTask, name: str) -> list[tuple[str, int]]:
    return [(f, int(y)) for f, y, s in zip(task.files, task.labels, task.split) if s == name]


# -- CUB-200-2011 -------------------------------------------------------------------------------

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


def cub_entries(per_class=(4, 3, 5)):
    """``CUB_200_2011.tgz``: ``CUB_200_2011/images/<NNN.Name>/<Name>_<n>.jpg`` and the four
    list files (ids 1.., in folder order); every third image a test image."""
    top, entries, images, labels, split, i = "CUB_200_2011", {}, [], [], [], 0
    for c, folder in enumerate(CUB_CLASSES):
        for k in range(per_class[c]):
            i += 1
            rel = f"{folder}/{folder[4:]}_{k + 1:04d}_{i}.jpg"
            entries[f"{top}/images/{rel}"] = jpeg(i, mode="L" if k == 2 else "RGB")
            images.append(f"{i} {rel}")
            labels.append(f"{i} {c + 1}")
            split.append(f"{i} {0 if k % 3 == 1 else 1}")
    entries[f"{top}/images.txt"] = lines(images)
    entries[f"{top}/image_class_labels.txt"] = lines(labels)
    entries[f"{top}/train_test_split.txt"] = lines(split)
    entries[f"{top}/classes.txt"] = lines(f"{c + 1} {name}" for c, name in enumerate(CUB_CLASSES))
    entries[f"{top}/README"] = b"The Caltech-UCSD Birds-200-2011 Dataset\n"
    entries["attributes.txt"] = b"1 has_bill_shape::curved_(up_or_down)\n"  # beside the folder, as shipped
    return entries


def test_cub200_official_split(tmp_path):
    entries = cub_entries()
    task = cub200(images=str(unpack(tmp_path, "CUB_200_2011.tgz", entries)))
    assert task.classes == ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    top = "CUB_200_2011"
    path = dict(line.split() for line in entries[f"{top}/images.txt"].decode().splitlines())
    label = dict(line.split() for line in entries[f"{top}/image_class_labels.txt"].decode().splitlines())
    train = dict(line.split() for line in entries[f"{top}/train_test_split.txt"].decode().splitlines())
    assert task.files == [path[i] for i in path]  # images.txt order
    assert [int(y) + 1 for y in task.labels] == [int(label[i]) for i in path]
    assert list(task.split) == ["train" if train[i] == "1" else "test" for i in path]
    assert (int(np.sum(task.split == "train")), int(np.sum(task.split == "test"))) == (8, 4)
    assert all((task.root / f).is_file() for f in task.files)


def test_cub200_labels_must_match_the_folders(tmp_path):
    entries = cub_entries()
    entries["CUB_200_2011/image_class_labels.txt"] = entries["CUB_200_2011/image_class_labels.txt"].replace(
        b"1 1\n", b"1 2\n", 1)
    with pytest.raises(ValueError, match="disagrees with the species folders"):
        cub200(images=str(unpack(tmp_path, "CUB_200_2011.tgz", entries)))


# -- Stanford Cars ------------------------------------------------------------------------------

CAR_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Aston Martin V8 Vantage Convertible 2012"]


def cars_annotations(rows, with_class=True) -> bytes:
    """A struct array ``annotations`` (1 × n) as in ``cars_train_annos.mat``."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else []) + ["fname"]
    annos = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for j, (fname, cls) in enumerate(rows):
        values = [np.array([[v]], dtype=np.uint16) for v in (1, 2, 30, 20)]
        values += [np.array([[cls]], dtype=np.uint8)] if with_class else []
        annos[0, j] = tuple(values + [np.array([fname])])
    return mat(annotations=annos)


def cars_inputs(tmp_path):
    """The original release: ``cars_train.tgz``, ``cars_test.tgz``, ``car_devkit.tgz`` and the
    file ``cars_test_annos_withlabels.mat``; labels deliberately not in file order."""
    train_rows = [(f"{i + 1:05d}.jpg", [3, 1, 2, 1, 3, 2, 2][i]) for i in range(7)]
    test_rows = [(f"{i + 1:05d}.jpg", [2, 3, 1, 1][i]) for i in range(4)]
    train = unpack(tmp_path, "cars_train.tgz", {f"cars_train/{f}": jpeg(10 + i) for i, (f, _) in enumerate(train_rows)})
    test = unpack(tmp_path, "cars_test.tgz", {f"cars_test/{f}": jpeg(50 + i) for i, (f, _) in enumerate(test_rows)})
    names = np.empty((1, len(CAR_CLASSES)), dtype=object)
    for j, name in enumerate(CAR_CLASSES):
        names[0, j] = np.array([name])
    devkit = unpack(tmp_path, "car_devkit.tgz", {
        "devkit/cars_meta.mat": mat(class_names=names),
        "devkit/cars_train_annos.mat": cars_annotations(train_rows),
        "devkit/cars_test_annos.mat": cars_annotations(test_rows, with_class=False),
        "devkit/README.txt": b"This file gives documentation for the cars 196 dataset.\n",
    })
    annos = tmp_path / "raw" / "cars_test_annos_withlabels.mat"
    annos.write_bytes(cars_annotations(test_rows))
    return dict(train_images=str(train), test_images=str(test), devkit=str(devkit), test_annos=str(annos)), \
        train_rows, test_rows


def test_stanford_cars_official_annotations(tmp_path):
    args, train_rows, test_rows = cars_inputs(tmp_path)
    task = stanford_cars(**args)
    assert task.classes == CAR_CLASSES
    assert by_split(task, "train") == [(f"cars_train.tgz/cars_train/{f}", c - 1) for f, c in train_rows]
    assert by_split(task, "test") == [(f"cars_test.tgz/cars_test/{f}", c - 1) for f, c in test_rows]
    assert task.root == (tmp_path / "extracted").resolve()  # the two image folders' common parent
    assert all((task.root / f).is_file() for f in task.files)


# -- FGVC-Aircraft ------------------------------------------------------------------------------

# (variant, family, manufacturer); the class files list them in this (unsorted) order.
AIRCRAFT = [("Falcon 2000", "Falcon 2000", "Dassault Aviation"), ("707-320", "Boeing 707", "Boeing"),
            ("F/A-18", "F/A-18", "McDonnell Douglas")]


def aircraft_entries():
    """``fgvc-aircraft-2013b.tar.gz``: ``data/images/<id>.jpg`` (7-digit ids), the class files and
    ``images_<level>_{train,val,trainval,test}.txt`` for the three levels."""
    data, entries, rows = "fgvc-aircraft-2013b/data", {}, {"trainval": [], "test": []}
    for i in range(12):
        image_id, model = f"{34309 + 37 * i:07d}", AIRCRAFT[i % 3]
        entries[f"{data}/images/{image_id}.jpg"] = jpeg(200 + i, size=(40, 50))
        rows["test" if i in (3, 7, 11, 4) else "trainval"].append((image_id, model))
    for level, (name, listing) in enumerate([("variant", "variants.txt"), ("family", "families.txt"),
                                             ("manufacturer", "manufacturers.txt")]):
        entries[f"{data}/{listing}"] = lines(dict.fromkeys(m[level] for m in AIRCRAFT))
        for split, chosen in rows.items():
            entries[f"{data}/images_{name}_{split}.txt"] = lines(f"{i} {m[level]}" for i, m in chosen)
        entries[f"{data}/images_{name}_train.txt"] = lines(f"{i} {m[level]}" for i, m in rows["trainval"][::2])
        entries[f"{data}/images_{name}_val.txt"] = lines(f"{i} {m[level]}" for i, m in rows["trainval"][1::2])
    entries[f"{data}/images_box.txt"] = lines(f"{i} 1 1 30 30" for i, _ in rows["trainval"] + rows["test"])
    entries["fgvc-aircraft-2013b/README.md"] = b"# FGVC-Aircraft Benchmark\n"
    return entries, rows


def test_fgvc_aircraft_levels(tmp_path):
    entries, rows = aircraft_entries()
    root = unpack(tmp_path, "fgvc-aircraft-2013b.tar.gz", entries)
    for level, annotation in enumerate(["variant", "family", "manufacturer"]):
        task = fgvc_aircraft(images=str(root), annotation=annotation)
        classes = list(dict.fromkeys(m[level] for m in AIRCRAFT))
        assert task.classes == classes  # the class file's order, not sorted
        for split, listed in (("train", "trainval"), ("test", "test")):
            assert by_split(task, split) == [(f"{i}.jpg", classes.index(m[level])) for i, m in rows[listed]]
        assert task.extra["annotation"] == annotation
    with pytest.raises(ValueError, match="annotation must be one of"):
        fgvc_aircraft(images=str(root), annotation="model")


# -- Oxford-IIIT Pets ---------------------------------------------------------------------------

PETS = [("Abyssinian", 1), ("american_bulldog", 2), ("Egyptian_Mau", 1)]  # (breed, species: 1 cat, 2 dog)


def pets_inputs(tmp_path):
    images, rows = {}, {"trainval": [], "test": []}
    for c, (breed, species) in enumerate(PETS):
        for n in range(1, 5):
            images[f"images/{breed}_{n}.jpg"] = png(10 * c + n) if n == 2 else jpeg(10 * c + n)
            rows["test" if n == 4 else "trainval"].append((f"{breed}_{n}", c + 1, species))
    header = "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n"
    ann = {f"annotations/{name}.txt": (header if name == "trainval" else "").encode()
           + lines(f"{i} {c} {s} {c}" for i, c, s in chosen) for name, chosen in rows.items()}
    ann["annotations/list.txt"] = header.encode() + lines(f"{i} {c} {s} {c}" for i, c, s in rows["trainval"])
    ann["annotations/trimaps/Abyssinian_1.png"] = png(99)
    return unpack(tmp_path, "images.tar.gz", images), unpack(tmp_path, "annotations.tar.gz", ann), rows


def test_oxford_pets_official_split(tmp_path):
    images, annotations, rows = pets_inputs(tmp_path)
    task = oxford_pets(images=str(images), annotations=str(annotations))
    assert task.classes == ["Abyssinian", "american_bulldog", "Egyptian_Mau"]
    assert by_split(task, "train") == [(f"{i}.jpg", c - 1) for i, c, _ in rows["trainval"]]
    assert by_split(task, "test") == [(f"{i}.jpg", c - 1) for i, c, _ in rows["test"]]
    assert all((task.root / f).is_file() for f in task.files)


# -- Oxford Flowers-102 -------------------------------------------------------------------------

def flowers_inputs(tmp_path):
    """``102flowers.tgz`` (``jpg/image_%05d.jpg``) and the files ``imagelabels.mat`` (1 × N
    doubles) and ``setid.mat`` (1 × k ids, not sorted)."""
    labels = [2, 1, 3, 3, 1, 2, 1, 2, 3, 1, 2, 3]
    images = unpack(tmp_path, "102flowers.tgz", {f"jpg/image_{i + 1:05d}.jpg": jpeg(300 + i) for i in range(12)})
    sets = {"trnid": [5, 1, 6, 3], "valid": [2, 4, 9], "tstid": [12, 7, 8, 10, 11]}
    (tmp_path / "raw" / "imagelabels.mat").write_bytes(mat(labels=np.array([labels], dtype=np.float64)))
    (tmp_path / "raw" / "setid.mat").write_bytes(mat(**{k: np.array([v], dtype=np.uint16) for k, v in sets.items()}))
    return images, tmp_path / "raw" / "imagelabels.mat", tmp_path / "raw" / "setid.mat", labels, sets


def test_flowers102_trnid_and_valid_train(tmp_path):
    images, labels_mat, setid_mat, labels, sets = flowers_inputs(tmp_path)
    task = flowers102(images=str(images), labels=str(labels_mat), setid=str(setid_mat))
    assert task.classes == ["1", "2", "3"]
    assert by_split(task, "train") == [(f"image_{i:05d}.jpg", labels[i - 1] - 1) for i in sets["trnid"] + sets["valid"]]
    assert by_split(task, "test") == [(f"image_{i:05d}.jpg", labels[i - 1] - 1) for i in sets["tstid"]]


# -- DTD ----------------------------------------------------------------------------------------

DTD_CLASSES = ["banded", "zigzagged", "cracked"]


def dtd_entries():
    """``dtd-r1.0.1.tar.gz``: ``dtd/images/<class>/<class>_NNNN.jpg`` and ``dtd/labels/
    {train,val,test}<k>.txt`` for k = 1..10, each partition a rotation of the images."""
    entries, names = {}, {}
    for c, cls in enumerate(DTD_CLASSES):
        names[cls] = [f"{cls}/{cls}_{n:04d}.jpg" for n in range(1, 7)]
        for j, rel in enumerate(names[cls]):
            entries[f"dtd/images/{rel}"] = jpeg(400 + 10 * c + j)
    splits = {}
    for k in range(1, 11):
        rot = {cls: names[cls][k % 6:] + names[cls][:k % 6] for cls in DTD_CLASSES}
        for s, (a, b) in (("train", (0, 2)), ("val", (2, 4)), ("test", (4, 6))):
            splits[(s, k)] = [rel for cls in DTD_CLASSES for rel in rot[cls][a:b]]
            entries[f"dtd/labels/{s}{k}.txt"] = lines(splits[(s, k)])
    entries["dtd/labels/labels_joint_anno.txt"] = lines(f"{r} {r.split('/')[0]}" for v in names.values() for r in v)
    entries["dtd/imdb/imdb.mat"] = mat(x=np.zeros((1, 1)))
    return entries, splits


def test_dtd_partitions(tmp_path):
    entries, splits = dtd_entries()
    root = unpack(tmp_path, "dtd-r1.0.1.tar.gz", entries)
    order = sorted(DTD_CLASSES)
    for k in (1, 2):
        task = dtd(images=str(root), partition=k)
        assert task.classes == order == ["banded", "cracked", "zigzagged"]
        assert by_split(task, "train") == [(f, order.index(f.split("/")[0])) for f in splits[("train", k)]
                                           + splits[("val", k)]]
        assert by_split(task, "test") == [(f, order.index(f.split("/")[0])) for f in splits[("test", k)]]
    assert set(dtd(images=str(root), partition=1).files) == set(dtd(images=str(root), partition=2).files)
    for bad in (0, 11):
        with pytest.raises(ValueError, match="partition must be an integer in 1..10"):
            dtd(images=str(root), partition=bad)


# -- the cache, end to end ----------------------------------------------------------------------

def test_prepare_task_writes_the_cache(tmp_path):
    images = unpack(tmp_path, "CUB_200_2011.tgz", cub_entries(per_class=(6, 6, 9)))
    out = prepare_task("cub200", {"images": str(images), "label_rate": 50, "label_seed": 2, "size": SIZE},
                       tmp_path / "task")
    meta = json.loads((out / "meta.json").read_text())
    split = pd.read_parquet(out / "split.parquet")
    cache = np.load(out / "images.npy")
    # per class 4/4/6 training images (every third is a test image): 50 % keeps 2/2/3
    assert meta["counts"] == {"train": 7, "test": 7} and len(split) == 14
    assert cache.shape == (14, SIZE, SIZE, 3) and cache.dtype == np.uint8
    assert meta["classes"] == ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    assert meta["builder"] == "cub200" and meta["label_rate"] == 50 and meta["label_seed"] == 2
    assert meta["image_size"] == [SIZE, SIZE] and len(meta["mean"]) == 3 and "content_sha256" in meta
    assert split[split["split"] == "train"].groupby("label").size().tolist() == [2, 2, 3]
    for row in split.itertuples():
        assert row.file.split("/")[0] == f"{row.label + 1:03d}.{meta['classes'][row.label]}"


# -- label rates ---------------------------------------------------------------------------------

TRAIN_SIZES = [7, 10, 13, 1, 30, 4]  # per class; 30 * 15 % = 4.5 rounds to 4 (Python's round)


def synthetic_task() -> FileListTask:
    """Training and test images of six classes, interleaved (no files: only the lists matter)."""
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(TRAIN_SIZES)] + [np.arange(6).repeat(3)])
    split = np.array(["train"] * sum(TRAIN_SIZES) + ["test"] * 18)
    order = rng.permutation(len(labels))
    return FileListTask(root=Path("/nowhere"), files=[f"img_{i:03d}.jpg" for i in range(len(labels))],
                        labels=labels[order], split=split[order], classes=[f"c{c}" for c in range(6)],
                        extra={"builder": "synthetic"})


def expected_train(task: FileListTask, rate: int, seed: int) -> set[str]:
    """The protocol, written out: per class, its training images in task order, permuted by
    default_rng([seed, class]); the first max(1, round(n * rate / 100))."""
    keep = set()
    for c in range(len(task.classes)):
        mine = [f for f, y, s in zip(task.files, task.labels, task.split) if s == "train" and y == c]
        perm = np.random.default_rng([seed, c]).permutation(len(mine))
        keep |= {mine[j] for j in perm[: max(1, round(len(mine) * rate / 100))]}
    return keep


def files_of(task: FileListTask, split: str) -> set[str]:
    return {f for f, s in zip(task.files, task.split) if s == split}


@pytest.mark.parametrize("seed", [0, 5])
def test_label_rates_follow_the_protocol(seed):
    base = synthetic_task()
    subsets = {}
    for rate in (15, 30, 50, 100):
        task = _with_label_rate(base, rate, seed)
        subsets[rate] = files_of(task, "train")
        assert subsets[rate] == expected_train(base, rate, seed)
        counts = np.bincount(task.labels[task.split == "train"], minlength=6).tolist()
        assert counts == [max(1, round(n * rate / 100)) for n in TRAIN_SIZES]
        if rate == 15:
            assert counts == [1, 2, 2, 1, 4, 1]  # 1.05, 1.5, 1.95, 0.15 -> 1, 4.5 -> 4, 0.6 -> 1
        assert files_of(task, "test") == files_of(base, "test")  # test split untouched
        assert task.files == [f for f in base.files if f in set(task.files)]  # order kept
        assert task.classes == base.classes
        assert task.extra == {"builder": "synthetic", "label_rate": rate, "label_seed": seed}
    assert subsets[15] < subsets[30] < subsets[50] < subsets[100] == files_of(base, "train")
    again = _with_label_rate(synthetic_task(), 30, seed)
    assert files_of(again, "train") == subsets[30]  # deterministic
    assert files_of(_with_label_rate(base, 30, seed + 1), "train") != subsets[30]


@pytest.mark.parametrize("rate", [0, -15, 101, 150, 12.5, True, "50"])
def test_bad_label_rate_is_refused(rate):
    with pytest.raises(ValueError, match=r"label_rate is a percentage in \(0, 100\]"):
        _with_label_rate(synthetic_task(), rate, 0)


def test_builders_apply_label_rates(tmp_path):
    entries, _ = dtd_entries()
    root = unpack(tmp_path, "dtd-r1.0.1.tar.gz", entries)
    full = dtd(images=str(root), partition=3)
    half = dtd(images=str(root), partition=3, label_rate=50, label_seed=1)
    assert files_of(half, "train") == expected_train(full, 50, 1)
    assert files_of(half, "test") == files_of(full, "test")
    assert half.extra["label_rate"] == 50 and half.extra["label_seed"] == 1 and half.extra["partition"] == 3
    assert full.extra["label_rate"] == 100
    with pytest.raises(ValueError, match="label_rate"):
        dtd(images=str(root), label_rate=0)


# -- config -------------------------------------------------------------------------------------

def finegrained_config() -> dict:
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    url = "https://example.org/"
    config["downloads"] = {name: {"url": url + name, "checksum": "tofu"} for name in (
        "cub", "cars-train", "cars-test", "cars-devkit", "cars-test-annos", "aircraft", "pets-images",
        "pets-annotations", "flowers-images", "flowers-labels", "flowers-setid", "dtd")}
    config["tasks"].update({
        "cub-15": {"builder": "cub200", "images": "cub", "label_rate": 15, "label_seed": 0},
        "cars-30": {"builder": "stanford_cars", "train_images": "cars-train", "test_images": "cars-test",
                    "devkit": "cars-devkit", "test_annos": "cars-test-annos", "label_rate": 30},
        "aircraft-family": {"builder": "fgvc_aircraft", "images": "aircraft", "annotation": "family", "workers": 4},
        "pets": {"builder": "oxford_pets", "images": "pets-images", "annotations": "pets-annotations"},
        "flowers-50": {"builder": "flowers102", "images": "flowers-images", "labels": "flowers-labels",
                       "setid": "flowers-setid", "label_rate": 50, "label_seed": 3},
        "dtd-2": {"builder": "dtd", "images": "dtd", "partition": 2, "size": 224},
    })
    return config


def test_every_download_argument_is_a_raw_input():
    for builder in ("cub200", "stanford_cars", "fgvc_aircraft", "oxford_pets", "flowers102", "dtd"):
        assert builder in RAW_INPUTS
    assert RAW_INPUTS["stanford_cars"] == ("train_images", "test_images", "devkit", "test_annos")
    assert RAW_INPUTS["flowers102"] == ("images", "labels", "setid")


def test_config_with_the_finegrained_builders_validates():
    validate_config(finegrained_config(), base_dir=REPO)
    cases = [
        (("cub-15", "label_rate", 0), "tasks.cub-15.label_rate", "at least 1"),
        (("cub-15", "label_seed", -1), "tasks.cub-15.label_seed", "at least 0"),
        (("cub-15", "label_rate", 150), "tasks.cub-15.label_rate", "at most 100"),
        (("flowers-50", "label_rate", 50.0), "tasks.flowers-50.label_rate", "must be an integer"),
        (("aircraft-family", "annotation", "model"), "tasks.aircraft-family.annotation",
         r"must be one of \['variant', 'family', 'manufacturer'\], not 'model'"),
        (("dtd-2", "partition", 0), "tasks.dtd-2.partition", "at least 1"),
        (("pets", "annotations", "nope"), "tasks.pets.annotations", "no download named"),
        (("cars-30", "test_annos", "nope"), "tasks.cars-30.test_annos", "no download named"),
        (("pets", "label_ratio", 50), "tasks.pets", "unexpected keyword"),
    ]
    for (task, key, value), where, reason in cases:
        config = copy.deepcopy(finegrained_config())
        config["tasks"][task][key] = value
        with pytest.raises(ConfigError, match=f"config key '{where}'.*{reason}"):
            validate_config(config, base_dir=REPO)
