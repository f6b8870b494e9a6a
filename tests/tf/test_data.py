"""Slice cache and tf.data pipeline."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from analysis.cohort.layout import Cohort  # noqa: E402
from bonemets_tf import data  # noqa: E402
from bonemets_tf.cache import ensure_cached  # noqa: E402

TRAIN = ["case_01", "case_02", "case_03"]


@pytest.fixture
def cached(cohort_dir: Path, tmp_path: Path):
    return ensure_cached(Cohort(cohort_dir), TRAIN, tmp_path / "cache")


def test_cache_content_and_staleness(cohort_dir, tmp_path, cached):
    c = cached[0]
    assert c.ct().dtype == np.int16 and c.mask().dtype == np.uint8 and c.ct().shape == (6, 40, 48)
    assert c.positive == (False, True, False, True, False, True)
    assert not any((cohort_dir / "imagesTr").glob("*.npy"))  # nothing written into the dataset
    label = Cohort(cohort_dir).label_path("case_01")
    label.write_bytes(label.read_bytes())  # touch: new mtime -> new key, new entry
    import os
    os.utime(label, ns=(1, 1))
    again = ensure_cached(Cohort(cohort_dir), ["case_01"], tmp_path / "cache")
    assert again[0].key != c.key


def test_training_cache_never_reads_test_case(cohort_dir, tmp_path):
    image = Cohort(cohort_dir).image_path("case_04")  # the test case
    image.write_bytes(b"")  # unreadable: any read would raise
    cached = ensure_cached(Cohort(cohort_dir), TRAIN, tmp_path / "cache")
    store = data.SliceStore(cached)
    assert {c.case for c in store.cases} == set(TRAIN)
    assert not list((tmp_path / "cache").glob("case_04*"))


@pytest.mark.parametrize("mode", ["memory", "memmap"])
@pytest.mark.parametrize("task", ["detect", "segment"])
def test_shapes_dtypes_and_determinism(cached, mode, task):
    store = data.SliceStore(cached, context=3, store=mode)
    sampling = data.Sampling(task, image_size=32)
    first = [tuple(t.numpy() for t in b) for b in data.training_dataset(store, sampling, batch_size=4, seed=7).take(2)]
    again = [tuple(t.numpy() for t in b) for b in data.training_dataset(store, sampling, batch_size=4, seed=7).take(2)]
    other = next(iter(data.training_dataset(store, sampling, batch_size=4, seed=8)))[0].numpy()
    image, target = first[0]
    assert image.shape == (4, 32, 32, 3) and image.dtype == np.float32
    assert target.shape == ((4, 1) if task == "detect" else (4, 32, 32, 1)) and target.dtype == np.float32
    assert set(np.unique(target)) <= {0.0, 1.0}
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(other, image)


def test_resume_start_continues_the_stream(cached):
    store = data.SliceStore(cached)
    sampling = data.Sampling("segment", image_size=32)
    full = [b[0].numpy() for b in data.training_dataset(store, sampling, batch_size=2, seed=1).take(3)]
    resumed = next(iter(data.training_dataset(store, sampling, batch_size=2, seed=1, start=4)))[0].numpy()
    np.testing.assert_array_equal(resumed, full[2])


def test_class_balance(cached):
    store = data.SliceStore(cached)
    sampling = data.Sampling("detect", image_size=32, positive_fraction=0.8)
    labels = np.concatenate([b[1].numpy() for b in data.training_dataset(store, sampling, batch_size=50, seed=0).take(4)])
    assert 0.7 < labels.mean() < 0.9  # 200 draws, p = 0.8


def test_augmentation_keeps_image_and_mask_aligned():
    rng = np.random.default_rng(0)
    mask = np.zeros((48, 48, 1), np.float32)
    mask[10:20, 25:40] = 1
    mask[30:44, 5:12] = 1
    image = np.repeat(np.where(mask > 0, 1000.0, -1000.0), 3, axis=-1).astype(np.float32)  # image = f(mask)
    aug = data.Augmentation(flip=True, rotate_deg=15, scale=0.1, hu_offset=0, hu_scale=0)
    moved = 0
    for i in range(8):
        seed = tf.constant([int(rng.integers(1000)), i], tf.int64)
        img, msk = data.augment(tf.constant(image), tf.constant(mask), seed, aug)
        img, msk = img.numpy(), msk.numpy()
        assert np.array_equal(img[..., 0], img[..., 2])  # channels move together
        bone, lesion = img[..., 0] > 0, msk[..., 0] > 0.5
        iou = (bone & lesion).sum() / (bone | lesion).sum()
        assert iou > 0.9, f"seed {i}: image and mask misaligned (IoU {iou:.2f})"
        moved += not np.array_equal(msk, mask)
    assert moved >= 6  # the augmentation really moves things


def test_lesion_biased_crop_hits_lesion():
    mask = np.zeros((120, 120, 1), np.float32)
    mask[100:104, 5:9] = 1
    image = np.zeros((120, 120, 1), np.float32)
    hits = sum(float(data.lesion_biased_crop(tf.constant(image), tf.constant(mask), 32,
                                             tf.constant([3, i], tf.int64), 1.0)[1].numpy().sum()) > 0 for i in range(10))
    assert hits == 10


def test_validation_full_slices(cached):
    store = data.SliceStore(cached)
    batches = list(data.validation_dataset(store, "segment", batch_size=4))
    assert sum(b[0].shape[0] for b in batches) == store.num_slices == 18
    assert batches[0][0].shape[1:] == (40, 48, 1)
