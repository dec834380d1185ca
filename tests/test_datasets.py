"""The real data sets' builders, end to end on generated archives in each real layout: served
on 127.0.0.1, fetched and verified, extracted safely, decoded into the cache; the splits and
class counts are checked against the lists the archives hold."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from fake_sources import (
    FileServer,
    Served,
    caltech_entries,
    dogs_entries,
    imagenet_entries,
    indoor_entries,
    make_tar,
    places_entries,
)
from spbench.data import load_task, prepare_task
from spbench.datasets import caltech256, decode_image
from spbench.download import extract_archive, fetch

SIZE = 24  # the real tasks use 256; small here to keep the tests fast


@pytest.fixture(scope="module")
def server():
    srv = FileServer().start()
    yield srv
    srv.stop()


def download(server, tmp_path, name: str, body: bytes, *, extract: bool = True):
    """Serve ``body``, fetch it with its sha256 and (for archives) extract it: what the
    workflow's download and extract rules do."""
    server.files[f"/{name}"] = Served(body)
    raw = fetch(server.url(f"/{name}"), tmp_path / "raw" / name, checksum="sha256:" + hashlib.sha256(body).hexdigest(),
                progress=False)
    return extract_archive(raw, tmp_path / "extracted" / name) if extract else raw


def tar_bytes(tmp_path, entries, name="x.tar"):
    return make_tar(entries, tmp_path / name).read_bytes()


def read_split(task_dir):
    return pd.read_parquet(task_dir / "split.parquet"), json.loads((task_dir / "meta.json").read_text())


@pytest.mark.parametrize("per_class", [3, 6])
def test_caltech256_seeded_per_class_split(server, tmp_path, per_class):
    sizes = (26, 27, 30)
    images = download(server, tmp_path, "256_ObjectCategories.tar", tar_bytes(tmp_path, caltech_entries(per_class=sizes)))
    out = prepare_task("caltech256", {"images": str(images), "per_class": per_class, "test_per_class": 20,
                                      "split_seed": 3, "size": SIZE}, tmp_path / "task")
    split, meta = read_split(out)
    assert meta["classes"] == ["class0", "class1", "clutter"]  # clutter kept as the last class
    counts = split.groupby(["label", "split"]).size().unstack()
    assert (counts["train"] == per_class).all() and (counts["test"] == 20).all()
    assert split["file"].is_unique
    for row in split.itertuples():
        assert row.file.startswith(f"{row.label + 1:03d}.")
    cache = np.load(out / "images.npy")
    assert cache.shape == (len(split), SIZE, SIZE, 3) and cache.dtype == np.uint8
    # the cache holds the decoded listed file, row by row (grey files as three equal channels)
    root = images / "256_ObjectCategories"
    for row in split.iloc[[0, 7, -1]].itertuples():
        np.testing.assert_array_equal(cache[row.index], decode_image(root / row.file, SIZE))
    grey = [r for r in split.itertuples() if r.file.endswith("_0001.jpg")]
    assert grey and all(np.array_equal(cache[r.index][..., 0], cache[r.index][..., 2]) for r in grey)
    train = cache[split["split"].to_numpy() == "train"].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(meta["mean"], train.mean(0), rtol=1e-9)
    np.testing.assert_allclose(meta["std"], train.std(0), rtol=1e-6)


def test_caltech_30_and_60_share_the_test_set_and_nest(tmp_path):
    root = tmp_path / "c"
    for name, data in caltech_entries(per_class=(26, 27, 30)).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    small, large = (caltech256(images=str(root), per_class=k, test_per_class=20, split_seed=0) for k in (3, 6))
    files = lambda t, s: {f for f, x in zip(t.files, t.split) if x == s}  # noqa: E731
    assert files(small, "test") == files(large, "test")
    assert files(small, "train") < files(large, "train")
    other = caltech256(images=str(root), per_class=3, test_per_class=20, split_seed=1)
    assert files(other, "test") != files(small, "test")
    no_clutter = caltech256(images=str(root), per_class=3, test_per_class=20, clutter=False)
    assert len(no_clutter.classes) == 2
    with pytest.raises(ValueError, match="class 0 has 26 images, 27 needed"):
        caltech256(images=str(root), per_class=7, test_per_class=20)


def test_mit_indoor67_official_lists(server, tmp_path):
    entries, train_txt, test_txt = indoor_entries()
    images = download(server, tmp_path, "indoorCVPR_09.tar", tar_bytes(tmp_path, entries))
    train_list = download(server, tmp_path, "TrainImages.txt", train_txt.encode(), extract=False)
    test_list = download(server, tmp_path, "TestImages.txt", test_txt.encode(), extract=False)
    out = prepare_task("mit_indoor67", {"images": str(images), "train_list": str(train_list),
                                        "test_list": str(test_list), "size": SIZE}, tmp_path / "task")
    split, meta = read_split(out)
    assert meta["classes"] == ["bakery", "kitchen"] and meta["counts"] == {"train": 8, "test": 2}
    assert list(split.loc[split["split"] == "train", "file"]) == train_txt.split()
    assert list(split.loc[split["split"] == "test", "file"]) == test_txt.split()
    assert list(split["label"]) == [int(f.startswith("kitchen")) for f in split["file"]]


def test_mit_indoor67_missing_listed_image_is_an_error(tmp_path):
    from spbench.datasets import mit_indoor67

    (tmp_path / "Images" / "a").mkdir(parents=True)
    (tmp_path / "tr.txt").write_text("a/missing.jpg\n")
    (tmp_path / "te.txt").write_text("")
    with pytest.raises(FileNotFoundError, match="a/missing.jpg"):
        mit_indoor67(images=str(tmp_path), train_list=str(tmp_path / "tr.txt"), test_list=str(tmp_path / "te.txt"))


def test_stanford_dogs_official_mat_lists(server, tmp_path):
    images, lists = dogs_entries()
    img_dir = download(server, tmp_path, "images.tar", tar_bytes(tmp_path, images, "i.tar"))
    list_dir = download(server, tmp_path, "lists.tar", tar_bytes(tmp_path, lists, "l.tar"))
    out = prepare_task("stanford_dogs", {"images": str(img_dir), "lists": str(list_dir), "size": SIZE}, tmp_path / "t")
    split, meta = read_split(out)
    assert meta["classes"] == ["Chihuahua", "Japanese_spaniel"]
    assert meta["wnids"] == ["n02085620", "n02085782"]
    assert meta["counts"] == {"train": 6, "test": 2}
    assert split.loc[split["split"] == "test", "file"].tolist() == [
        "n02085620-Chihuahua/n02085620_3.jpg", "n02085782-Japanese_spaniel/n02085782_3.jpg"]
    assert list(split["label"]) == [int("Japanese" in f) for f in split["file"]]


def test_places365_val_fisher_and_accuracy_images_are_disjoint(server, tmp_path):
    images, lists = places_entries(n_classes=3, per_class=4)
    img_dir = download(server, tmp_path, "val_256.tar", tar_bytes(tmp_path, images, "v.tar"))
    list_dir = download(server, tmp_path, "filelist_places365-standard.tar", tar_bytes(tmp_path, lists, "f.tar"))
    out = prepare_task("places365_val", {"images": str(img_dir), "filelist": str(list_dir), "fisher_per_class": 1,
                                         "size": SIZE}, tmp_path / "t")
    split, meta = read_split(out)
    assert meta["classes"] == ["/a/place0", "/b/place1", "/c/place2"]
    assert meta["counts"] == {"train": 3, "test": 9}
    assert (split[split["split"] == "train"].groupby("label").size() == 1).all()
    expected = {line.split()[0]: int(line.split()[1]) for line in lists["places365_val.txt"].decode().splitlines()}
    assert dict(zip(split["file"], split["label"])) == expected


def test_imagenet_val_labels_follow_sorted_wnids(server, tmp_path):
    """Manual files (the user's): checked and extracted; ILSVRC2012_ID -> sorted-WNID rank."""
    images, devkit, wnids, truth = imagenet_entries(n_classes=3, per_class=3)
    img_dir = download(server, tmp_path, "ILSVRC2012_img_val.tar", tar_bytes(tmp_path, images, "v.tar"))
    dk_dir = download(server, tmp_path, "ILSVRC2012_devkit_t12.tar.gz",
                      make_tar(devkit, tmp_path / "d.tar.gz", "w:gz").read_bytes())
    out = prepare_task("imagenet_val", {"images": str(img_dir), "devkit": str(dk_dir), "fisher_per_class": 1,
                                        "size": SIZE}, tmp_path / "t")
    split, meta = read_split(out)
    assert meta["wnids"] == sorted(wnids) and len(meta["classes"]) == 3
    rank = {w: i for i, w in enumerate(sorted(wnids))}
    assert list(split["label"]) == [rank[wnids[t - 1]] for t in truth]
    assert meta["counts"] == {"train": 3, "test": 6}
    data = load_task(out)  # the demo's reader works on a real task's cache too
    assert data.x["test"].shape == (6, 3, SIZE, SIZE)
