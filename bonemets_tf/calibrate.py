"""Validation-calibrated probability threshold of a segmenter.

A segmenter trained briefly, or on lesions much smaller than its crops, rarely puts the
best cut of its probabilities at 0.5. After training, :func:`calibrate_run` runs the best
model (``RUN/model.keras``) over the whole slices of the run's *validation* cases (never
the test set), scores every threshold of :data:`THRESHOLDS` with the same per-slice Dice
that ``analyze`` reports (slices whose ground truth has lesion; see
:func:`analysis.metrics.overlap.slice_overlap`) and writes ``RUN/calibration.json``::

    {"metric": "per-slice Dice on validation slices with lesion", "cases": [...],
     "n_slices": 57, "thresholds": [0.05, ...], "dice": [...],
     "threshold": 0.3, "dice_at_threshold": 0.61, "dice_at_0.5": 0.55}

``predict --threshold auto`` uses ``threshold`` (:func:`bonemets_tf.run.calibrated_threshold`). Ties go to the threshold nearest 0.5.
Choosing an operating point on held-out validation data, not on the test set, is the usual
practice (e.g. the post-processing choices nnU-Net makes on its cross-validation folds,
Isensee et al., Nat. Methods 2021).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from analysis.io import atomic_write_json
from analysis.metrics.overlap import slice_overlap
from bonemets_tf.run import CALIBRATION_FILE, read_run

log = logging.getLogger(__name__)

#: Thresholds scored (0.05 .. 0.95 in steps of 0.05).
THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))
METRIC = "per-slice Dice on validation slices with lesion"


def dice_curve(prob: np.ndarray, truth: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> tuple[np.ndarray, int]:
    """Per-slice Dice summed over the lesion slices of one volume, for every threshold.

    Args:
        prob: ``(slices, rows, cols)`` probabilities of the slices to score.
        truth: same shape, 0/1 ground truth.
        thresholds: a pixel is lesion when its probability is >= the threshold.

    Returns:
        ``(sums, n)``: the sum over the ``n`` slices with lesion of each threshold's Dice
        (``(len(thresholds),)`` float64), so several volumes combine by adding.
    """
    truth = (np.asarray(truth) > 0).astype(np.uint8)
    sums = np.array([slice_overlap((prob >= t).astype(np.uint8), truth)[1].sum() for t in thresholds], np.float64)
    return sums, int(truth.any(axis=(1, 2)).sum())


def choose_threshold(thresholds: Sequence[float], dice: Sequence[float]) -> float:
    """The threshold of the highest Dice; ties go to the one nearest 0.5, then the lower one."""
    d = np.asarray(dice, np.float64)
    best = np.flatnonzero(np.isclose(d, d.max(), rtol=0, atol=1e-12))
    return float(min((thresholds[i] for i in best), key=lambda t: (round(abs(t - 0.5), 9), t)))


def calibrate_run(run_dir: str | Path, cases: Sequence[Any], batch_size: int = 16) -> dict[str, Any]:
    """Score :data:`THRESHOLDS` on ``cases`` with the run's best model; write ``calibration.json``.

    Args:
        run_dir: a segmenter RUN with ``model.keras``.
        cases: the validation cases as :class:`bonemets_tf.cache.CachedCase` (``ct()``/``mask()``).
        batch_size: slices per inference call.

    Returns:
        The record written (see the module docstring).
    """
    from bonemets_tf.inference import Predictor, slice_probabilities

    run = read_run(run_dir, task="segment")
    predictor = Predictor(run)
    sums = np.zeros(len(THRESHOLDS), np.float64)
    n = 0
    for cached in cases:
        ct, mask = cached.ct(), cached.mask()
        z = np.flatnonzero(np.asarray(cached.positive, bool))
        if z.size == 0:
            continue
        s, k = dice_curve(slice_probabilities(predictor, ct, z, batch_size), mask[z])
        sums += s
        n += k
    record: dict[str, Any] = {"metric": METRIC, "cases": [c.case for c in cases], "n_slices": n,
                              "thresholds": list(THRESHOLDS)}
    if n == 0:
        record.update(dice=None, threshold=0.5, dice_at_threshold=None, **{"dice_at_0.5": None})
        log.warning("%s: no validation slice with lesion; calibrated threshold left at 0.5", run.path)
    else:
        dice = sums / n
        t = choose_threshold(THRESHOLDS, dice)
        record.update(dice=[round(float(v), 6) for v in dice], threshold=t,
                      dice_at_threshold=round(float(dice[THRESHOLDS.index(t)]), 6),
                      **{"dice_at_0.5": round(float(dice[THRESHOLDS.index(0.5)]), 6)})
        log.info("%s: validation per-slice Dice %.3f at threshold %.2f (%.3f at 0.5; %d slices)",
                 run.arch, record["dice_at_threshold"], t, record["dice_at_0.5"], n)
    atomic_write_json(run.path / CALIBRATION_FILE, record)
    return record
