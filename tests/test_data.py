"""The embedded demo's data (SPEC §8) and the task cache on disk: halves A and B, the source
task (digits 0-6 on A), the target task (digit mod 3 on B, k per class), prepare/load."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits

from spbench.data import digits_halves, digits_mod3, digits_source, load_task, prepare_task

DIGITS = load_digits()
TARGET = DIGITS.target
# The 8×8 originals as the library stores them at size 8 (no resampling): value/16 → uint8.
RAW8 = (DIGITS.images.astype(np.float32) / 16.0 * 255).round().astype(np.uint8)[..., None]


def _rows_of(task, candidates: np.ndarray) -> np.ndarray:
    """Original digit indices of the task's rows, checking that the task keeps the order of
    ``candidates`` (the original indices it was built from) by comparing the 8×8 pixels."""
    assert task.images.shape == (len(candidates), 8, 8, 1)
    np.testing.assert_array_equal(task.images, RAW8[candidates])
    return candidates


@pytest.mark.parametrize("seed", [0, 3])
def test_halves_are_a_stratified_partition(seed):
    """A and B are disjoint, cover the 1,797 digits, and split every digit in half."""
    in_a = digits_halves(TARGET, seed)
    assert in_a.dtype == bool and in_a.shape == (1797,)
    a, b = set(np.flatnonzero(in_a)), set(np.flatnonzero(~in_a))
    assert not a & b and len(a | b) == 1797
    for d in range(10):
        n = np.sum(TARGET == d)
        assert np.sum(in_a & (TARGET == d)) == n // 2


def test_halves_depend_on_seed():
    """Same seed, same halves; another seed, other halves."""
    assert np.array_equal(digits_halves(TARGET, 0), digits_halves(TARGET, 0))
    assert not np.array_equal(digits_halves(TARGET, 0), digits_halves(TARGET, 1))


def test_source_is_digits_0_to_6_of_half_a():
    """The source task holds exactly the digits 0-6 of half A, labelled 0..6, in their order."""
    task = digits_source(size=8, split_seed=0)
    in_a = digits_halves(TARGET, 0)
    rows = _rows_of(task, np.flatnonzero(in_a & (TARGET <= 6)))
    np.testing.assert_array_equal(task.labels, TARGET[rows])
    assert set(np.unique(task.labels)) == set(range(7))
    assert task.classes == [str(d) for d in range(7)]
    assert set(np.unique(task.split)) == {"train", "test"}


def test_source_test_fraction_is_20_percent_per_class():
    """The source train/test split is stratified: round(20%) of every class is test."""
    task = digits_source(split_seed=0)
    for c in range(7):
        in_c = task.labels == c
        n_test = np.sum(task.split[in_c] == "test")
        assert abs(n_test - 0.2 * np.sum(in_c)) <= 0.5, c


@pytest.mark.parametrize("k", [5, 10, 20])
def test_target_is_half_b_mod_3_with_k_per_class(k):
    """The target is all of half B labelled digit mod 3: k train images per class, the rest
    (which includes the digits 7-9 the source never saw) is test; disjoint from the source."""
    task = digits_mod3(size=8, split_seed=0, per_class=k)
    in_a = digits_halves(TARGET, 0)
    rows = _rows_of(task, np.flatnonzero(~in_a))
    np.testing.assert_array_equal(task.labels, TARGET[rows] % 3)
    assert len(task.classes) == 3
    train = task.split == "train"
    assert [int(np.sum(task.labels[train] == c)) for c in range(3)] == [k, k, k]
    assert np.sum(~train) == len(rows) - 3 * k
    assert {7, 8, 9} <= set(TARGET[rows[~train]])
    source = digits_source(size=8, split_seed=0)
    source_rows = np.flatnonzero(in_a & (TARGET <= 6))
    assert len(source.labels) == len(source_rows)
    assert not set(source_rows) & set(rows)


@pytest.mark.parametrize("builder", [digits_source, lambda **kw: digits_mod3(per_class=10, **kw)], ids=["source", "mod3"])
def test_splits_are_seeded(builder):
    """Same split seed, identical task; another seed, another split."""
    a, b, c = builder(split_seed=0), builder(split_seed=0), builder(split_seed=1)
    assert np.array_equal(a.images, b.images)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.split, b.split)
    assert a.images.shape[1:] == (16, 16, 1) and a.images.dtype == np.uint8
    assert a.images.shape != c.images.shape or not np.array_equal(a.images, c.images)


def test_target_train_sets_differ_across_seeds():
    """The k training images of the target change with the split seed."""
    a = digits_mod3(size=8, split_seed=0, per_class=5)
    b = digits_mod3(size=8, split_seed=1, per_class=5)
    assert not np.array_equal(a.images[a.split == "train"], b.images[b.split == "train"])


def test_too_many_per_class_raises():
    """Asking for more training images than a class has fails."""
    with pytest.raises(ValueError):
        digits_mod3(size=8, per_class=10_000)


# -- on disk -------------------------------------------------------------------------------------


def test_prepare_and_load_task(tmp_path):
    """prepare_task writes images.npy (uint8 NHWC), split.parquet and meta.json; load_task
    reads them back as NCHW floats with the training split's per-channel mean subtracted."""
    out = tmp_path / "tasks" / "digits_mod3_k5"
    returned = prepare_task("digits_mod3", {"size": 8, "per_class": 5}, out)
    assert returned == out
    assert sorted(p.name for p in out.iterdir()) == ["images.npy", "meta.json", "split.parquet"]
    assert [p.name for p in out.parent.iterdir()] == [out.name], "temporary folder left behind"

    task = digits_mod3(size=8, per_class=5)
    images = np.load(out / "images.npy")
    assert images.dtype == np.uint8 and images.shape == task.images.shape
    np.testing.assert_array_equal(images, task.images)
    split = pd.read_parquet(out / "split.parquet")
    np.testing.assert_array_equal(split["index"], np.arange(len(images)))
    np.testing.assert_array_equal(split["label"], task.labels)
    np.testing.assert_array_equal(split["split"], task.split)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_classes"] == 3 and meta["channels"] == 1 and meta["image_size"] == [8, 8]
    assert meta["counts"] == {"train": 15, "test": int(np.sum(task.split == "test"))}
    assert meta["mean"] == pytest.approx([images[task.split == "train"].mean() / 255.0])

    data = load_task(out)
    assert data.num_classes == 3 and data.channels == 1
    assert data.x["train"].shape == (15, 1, 8, 8) and data.x["train"].dtype.is_floating_point
    assert data.x["test"].shape == (len(images) - 15, 1, 8, 8)
    assert abs(float(data.x["train"].double().mean(dim=(0, 2, 3)))) < 1e-6
    assert [int((data.y["train"] == c).sum()) for c in range(3)] == [5, 5, 5]
    np.testing.assert_array_equal(data.y["test"].numpy(), task.labels[task.split == "test"])
    first_test = images[task.split == "test"][0, :, :, 0] / 255.0 - meta["mean"][0]
    np.testing.assert_allclose(data.x["test"][0, 0].numpy(), first_test, atol=1e-6)


def test_prepare_task_replaces_existing_folder(tmp_path):
    """Preparing into an existing folder replaces its content."""
    out = tmp_path / "task"
    prepare_task("digits_mod3", {"size": 8, "per_class": 5}, out)
    prepare_task("digits_mod3", {"size": 8, "per_class": 10}, out)
    assert json.loads((out / "meta.json").read_text())["counts"]["train"] == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task"]


@pytest.mark.parametrize(
    "builder, params",
    [("no_such_builder", {}), ("digits_mod3", {"size": 8, "per_class": 10_000}), ("digits_mod3", {"colour": True})],
    ids=["unknown-builder", "builder-fails", "bad-parameter"],
)
def test_failed_prepare_leaves_nothing(tmp_path, builder, params):
    """A prepare_task that fails (unknown builder, builder error) leaves no output folder and
    no temporary folder."""
    out = tmp_path / "tasks" / "t"
    with pytest.raises((ValueError, TypeError)) as err:
        prepare_task(builder, params, out)
    if builder == "no_such_builder":
        assert err.type is ValueError and "digits_mod3" in str(err.value)
    assert not out.exists()
    assert not (tmp_path / "tasks").exists() or not any((tmp_path / "tasks").iterdir())
