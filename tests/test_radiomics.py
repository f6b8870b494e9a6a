"""pyradiomics extraction on lesion crops and the per-class ICC summary."""
from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.evaluation.radiomics import FEATURE_CLASSES, RoiTask, crop_roi, extract_all, extract_roi, icc_by_class
from analysis.lesions import lesion_instances, lesion_table


def _roi(seed: int, size: int = 4) -> RoiTask:
    rng = np.random.default_rng(seed)
    ct = rng.integers(200, 900, (size + 2, size + 4, size + 4)).astype(np.int16)
    mask = np.zeros(ct.shape, np.uint8)
    mask[1:-1, 2:-2, 2:-2] = 1
    return RoiTask(("gt", "c", seed), ct, mask, (1.0, 1.0, 2.0))


def test_features_are_pyradiomics_values_on_the_roi():
    task = _roi(0)
    key, feats = extract_roi(task)
    assert key == ("gt", "c", 0)
    assert {f.split("_")[1] for f in feats} == set(FEATURE_CLASSES)
    assert feats["original_firstorder_Mean"] == pytest.approx(task.ct[task.mask == 1].mean())
    assert feats["original_firstorder_Maximum"] == task.ct[task.mask == 1].max()


def test_too_small_region_is_skipped_not_fatal():
    task = _roi(1)
    one = np.zeros_like(task.mask)
    one[2, 3, 3] = 1
    assert extract_roi(RoiTask("tiny", task.ct, one, task.spacing)) == ("tiny", None)


def test_crop_keeps_lesion_and_margin():
    labels, n = lesion_instances(np.pad(np.ones((2, 3, 3), bool), ((3, 3), (4, 4), (1, 5))))
    ct = np.arange(labels.size, dtype=np.int16).reshape(labels.shape)
    c_ct, c_mask = crop_roi(ct, labels, lesion_table(labels, n).boxes[0], 1, margin=2)
    assert c_ct.shape == (6, 7, 6)                 # x side clipped at the volume's edge (1 voxel margin)
    assert c_mask.sum() == 18 and np.array_equal(c_ct[c_mask == 1], ct[labels == 1])


def test_identical_masks_give_icc_one():
    feats = extract_all([_roi(s) for s in range(4)], jobs=1)
    pairs = [(f, dict(f)) for f in feats.values()]
    per_feature, per_class = icc_by_class(pairs)
    assert [c["feature_class"] for c in per_class] == list(FEATURE_CLASSES)
    for c in per_class:
        assert c["n_pairs"] == 4 and c["n_features"] + c["n_constant"] > 0
        if c["n_features"]:
            assert (c["icc"], c["icc_low"], c["icc_high"]) == (1.0, 1.0, 1.0)
    assert all(v == (1.0, 1.0, 1.0) for v in per_feature.values())


def test_disagreeing_masks_give_icc_below_one():
    tasks = [_roi(s) for s in range(5)]
    shrunk = []
    for t in tasks:
        m = t.mask.copy()
        m[1] = 0                                   # drop one slice of the region
        shrunk.append(RoiTask(("pred",) + t.key[1:], t.ct, m, t.spacing))
    feats = extract_all(tasks + shrunk, jobs=2)
    pairs = [(feats[t.key], feats[("pred",) + t.key[1:]]) for t in tasks]
    _, per_class = icc_by_class(pairs)
    first = per_class[0]
    assert first["feature_class"] == "firstorder" and first["icc"] < 1.0
    assert first["icc_low"] <= first["icc"] <= first["icc_high"]
    assert not math.isnan(first["icc"])


def test_jobs_fork_only_when_the_work_pays_for_it_and_never_change_results(monkeypatch):
    import analysis.evaluation.radiomics as rad

    tasks = [_roi(s) for s in range(7)]
    inline = extract_all(tasks, jobs=1)

    class NoPool:
        def __init__(self, *a, **k):
            raise AssertionError("a pool was started for a few tiny regions")

    monkeypatch.setattr(rad, "ProcessPoolExecutor", NoPool)
    assert extract_all(tasks, jobs=2) == inline      # ~0.03 s of work: stays in this process
    monkeypatch.undo()
    monkeypatch.setattr(rad, "MIN_SECONDS_PER_WORKER", 0.0)
    assert extract_all(tasks, jobs=2) == inline      # forced into 2 workers: same features
