"""Radiomics agreement between ground-truth and predicted lesions (the paper's ICC analysis).

Features: pyradiomics (``radiomics.featureextractor.RadiomicsFeatureExtractor``) on the
original CT inside a lesion, with pyradiomics' CT defaults: ``binWidth`` 25, no intensity
normalisation, no resampling, ``minimumROIDimensions`` 2; classes firstorder, glcm, gldm,
glrlm, glszm and ngtdm (shape is left out, as in the paper's table). Each lesion is
cropped to its bounding box plus a small margin first (pyradiomics crops to the mask's
bounding box itself, so the values are those of the full image; the crop only saves time
and memory when work is sent to other processes).

A ground-truth lesion and its matched predicted lesion form a pair. When pyradiomics
rejects either region (a single voxel, or a region that is flat in more than one
dimension), the pair is skipped and counted.

Agreement: per feature, ICC(A,1) over the pairs with its 95% CI
(:func:`analysis.evaluation.stats.icc_a1`). Features constant over every pair and both raters have
no defined ICC; they are left out of the class means and counted (``n_constant``). Per
class, ``icc`` is the mean of its features' ICCs and ``icc_low``/``icc_high`` the means of
their CI bounds (features with an undefined bound left out of that bound's mean).
"""
from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Hashable, Iterable

import numpy as np

from analysis.evaluation.stats import icc_a1

log = logging.getLogger(__name__)

__all__ = ["FEATURE_CLASSES", "EXTRACTOR_SETTINGS", "RoiTask", "crop_roi", "extract_roi", "extract_all",
           "feature_class", "icc_by_class"]

FEATURE_CLASSES = ("firstorder", "glcm", "gldm", "glrlm", "glszm", "ngtdm")
#: pyradiomics settings for CT (its defaults, written out so they are recorded in config.json).
EXTRACTOR_SETTINGS = {"binWidth": 25, "normalize": False, "resampledPixelSpacing": None,
                      "minimumROIDimensions": 2, "label": 1, "additionalInfo": False}
CROP_MARGIN = 2


@dataclass(frozen=True)
class RoiTask:
    """One region for pyradiomics.

    Attributes:
        key: identifies the region, e.g. ``("gt", case, lesion_id)``.
        ct: CT crop ``(slices, rows, cols)`` in HU.
        mask: uint8 0/1 crop of the same shape.
        spacing: voxel size in mm in ITK ``(x, y, z)`` order.
    """

    key: Hashable
    ct: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float, float]


def crop_roi(ct: np.ndarray, labels: np.ndarray, box: tuple[slice, ...], lesion_id: int,
             margin: int = CROP_MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """CT and 0/1 mask of one lesion, cropped to its bounding box plus ``margin`` voxels.

    Args:
        ct: ``(slices, rows, cols)`` CT volume.
        labels: lesion label volume of the same shape.
        box: the lesion's bounding box (``find_objects`` slices).
        lesion_id: its label.
        margin: voxels added on every side (clipped at the volume's edges).

    Returns:
        ``(ct_crop, mask_crop)``, copies.
    """
    sl = tuple(slice(max(s.start - margin, 0), min(s.stop + margin, dim)) for s, dim in zip(box, ct.shape))
    return ct[sl].copy(), (labels[sl] == lesion_id).astype(np.uint8)


def _quiet_radiomics() -> None:
    import radiomics

    radiomics.setVerbosity(logging.ERROR)
    logging.getLogger("radiomics").setLevel(logging.ERROR)


def _extractor():
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    _quiet_radiomics()
    extractor = RadiomicsFeatureExtractor(**EXTRACTOR_SETTINGS)
    extractor.disableAllFeatures()
    extractor.disableAllImageTypes()
    extractor.enableImageTypeByName("Original")
    for name in FEATURE_CLASSES:
        extractor.enableFeatureClassByName(name)
    return extractor


_EXTRACTOR = None


def extract_roi(task: RoiTask) -> tuple[Hashable, dict[str, float] | None]:
    """pyradiomics features of one region; None when pyradiomics rejects it as too small.

    Returns:
        ``(task.key, {"original_<class>_<feature>": value} or None)``.
    """
    import SimpleITK as sitk

    global _EXTRACTOR
    if _EXTRACTOR is None:
        _EXTRACTOR = _extractor()
    image = sitk.GetImageFromArray(task.ct.astype(np.float32))
    mask = sitk.GetImageFromArray(task.mask)
    for im in (image, mask):
        im.SetSpacing(tuple(float(s) for s in task.spacing))
    try:
        result = _EXTRACTOR.execute(image, mask, label=1)
    except ValueError as exc:  # "mask only contains 1 segmented voxel", too few dimensions, ...
        log.debug("radiomics skipped %s: %s", task.key, exc)
        return task.key, None
    return task.key, {k: float(v) for k, v in result.items() if k.startswith("original_")}


#: Regions extracted inline before deciding whether worker processes pay off.
PROBE_REGIONS = 4
#: Start workers only when the remaining regions are expected to take at least this long
#: per worker inline: a worker costs about a second to start and import pyradiomics, so for
#: a few small lesions ``--jobs 2`` was slower than one process (0.66x, BENCHMARKS.md).
MIN_SECONDS_PER_WORKER = 2.0


def extract_all(tasks: Iterable[RoiTask], jobs: int = 1) -> dict[Hashable, dict[str, float] | None]:
    """Run :func:`extract_roi` on every task, in up to ``jobs`` processes.

    The first :data:`PROBE_REGIONS` regions run inline and time the rest: workers start only
    when the remaining work is worth at least :data:`MIN_SECONDS_PER_WORKER` per worker
    (fewer workers, or none, otherwise). Results do not depend on the number of processes.

    Returns:
        Features (or None) by task key.
    """
    tasks = list(tasks)
    out: dict[Hashable, dict[str, float] | None] = {}
    if not tasks:
        return out

    def collect(results, first: int) -> None:
        for i, (key, feats) in enumerate(results, first):
            out[key] = feats
            if i % 50 == 0:
                log.info("radiomics: %d/%d regions", i, len(tasks))

    probe = tasks if jobs <= 1 else tasks[:PROBE_REGIONS]
    start = time.perf_counter()
    collect(map(extract_roi, probe), 1)
    rest = tasks[len(probe):]
    if not rest:
        return out
    per_region = (time.perf_counter() - start) / len(probe)
    workers = jobs if MIN_SECONDS_PER_WORKER <= 0 else min(jobs, int(per_region * len(rest) // MIN_SECONDS_PER_WORKER))
    log.info("radiomics: %d regions, %.2f s each inline; %d more in %d process(es)", len(tasks), per_region,
             len(rest), max(workers, 1))
    if workers <= 1:
        collect(map(extract_roi, rest), len(probe) + 1)
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=_quiet_radiomics) as pool:
            collect(pool.map(extract_roi, rest, chunksize=4), len(probe) + 1)
    return out


def feature_class(feature: str) -> str:
    """``original_glcm_Contrast`` -> ``glcm``."""
    parts = feature.split("_")
    return parts[1] if len(parts) > 2 else parts[0]


def icc_by_class(pairs: list[tuple[dict[str, float], dict[str, float]]]) -> tuple[dict[str, tuple[float, float, float]], list[dict]]:
    """ICC(A,1) per feature and its per-class means.

    Args:
        pairs: ``(gt_features, pred_features)`` per lesion pair.

    Returns:
        ``(per_feature, per_class)``: ICC, low, high by feature name; and one dict per
        class with ``feature_class, n_pairs, n_features, n_constant, icc, icc_low, icc_high``
        (classes in :data:`FEATURE_CLASSES` order).
    """
    names = sorted(set.intersection(*(set(g) & set(p) for g, p in pairs))) if pairs else []
    per_feature: dict[str, tuple[float, float, float]] = {}
    constant: dict[str, int] = {}
    used_pairs: dict[str, int] = {}
    for name in names:
        y = np.array([[g[name], p[name]] for g, p in pairs], np.float64)
        y = y[np.isfinite(y).all(axis=1)]
        cls = feature_class(name)
        used_pairs[cls] = max(used_pairs.get(cls, 0), len(y))
        if len(y) >= 2 and np.ptp(y) == 0:
            constant[cls] = constant.get(cls, 0) + 1
            continue
        per_feature[name] = icc_a1(y)
    per_class = []
    for cls in FEATURE_CLASSES:
        vals = [v for k, v in per_feature.items() if feature_class(k) == cls and math.isfinite(v[0])]

        def mean(i: int) -> float:
            xs = [v[i] for v in vals if math.isfinite(v[i])]
            return float(np.mean(xs)) if xs else math.nan

        per_class.append({"feature_class": cls, "n_pairs": used_pairs.get(cls, len(pairs)),
                          "n_features": len(vals), "n_constant": constant.get(cls, 0),
                          "icc": mean(0), "icc_low": mean(1), "icc_high": mean(2)})
    return per_feature, per_class
