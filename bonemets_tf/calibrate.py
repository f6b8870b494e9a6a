"""Validation-calibrated probability threshold of a segmenter or a detector.

A segmenter trained briefly, or on lesions much smaller than its crops, rarely puts the
best cut of its probabilities at 0.5. After training, :func:`calibrate_run` runs the best
model (``RUN/model.keras``) over the whole slices of the run's *validation* cases (never
the test set), scores every threshold of :data:`THRESHOLDS` with the same per-slice Dice
that ``analyze`` reports (slices whose ground truth has lesion; see
:func:`analysis.evaluation.metrics.overlap.slice_overlap`) and writes ``RUN/calibration.json``::

    {"metric": "per-slice Dice on validation slices with lesion", "cases": [...],
     "n_slices": 57, "thresholds": [0.05, ...], "dice": [...],
     "threshold": 0.3, "dice_at_threshold": 0.61, "dice_at_0.5": 0.55}

``predict --threshold auto`` uses ``threshold`` (:func:`bonemets_tf.run.calibrated_threshold`). Ties go to the threshold nearest 0.5.

Detectors (issue #16) are scored on every slice of the validation patients (label: the slice
holds lesion), at :data:`DETECTOR_THRESHOLDS` (0.01 .. 0.99, recorded as curves) and at every
distinct validation probability (a briefly trained detector's probabilities may all lie
within 0.01 of each other: EfficientNet-B0 on the demo phantom put every slice near 0.3), and
the threshold of the highest **F1** of slice calls is chosen (F1 rather than Youden's J, because the report and the cascade judge a detector by
its precision/recall/F1 on whole patients, whose slice prevalence the validation patients
share; J is recorded beside it)::

    {"task": "detect", "metric": "F1 of slice calls on validation slices", "cases": [...],
     "n_slices": 240, "n_positive": 60, "auc": 0.83, "thresholds": [0.01, ...],
     "f1": [...], "precision": [...], "recall": [...], "youden_j": [...],
     "threshold": 0.31, "f1_at_threshold": 0.71, "precision_at_threshold": 0.64,
     "recall_at_threshold": 0.8, "f1_at_0.5": 0.52,
     "positive_calls_at_0.5": 12, "positive_calls_at_threshold": 70}

Segmenter records keep their keys and gain ``"task": "segment"``.
Choosing an operating point on held-out validation data, not on the test set, is the usual
practice (e.g. the post-processing choices nnU-Net makes on its cross-validation folds,
Isensee et al., Nat. Methods 2021).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from analysis.evaluation.metrics.overlap import slice_overlap
from analysis.imaging.io import atomic_write_json
from bonemets_tf.run import CALIBRATION_FILE, read_run

log = logging.getLogger(__name__)

#: Thresholds scored (0.05 .. 0.95 in steps of 0.05).
THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))
METRIC = "per-slice Dice on validation slices with lesion"
#: Detector thresholds scored (0.01 .. 0.99 in steps of 0.01).
DETECTOR_THRESHOLDS = tuple(round(0.01 * k, 2) for k in range(1, 100))
DETECTOR_METRIC = "F1 of slice calls on validation slices"


def detection_curves(labels: np.ndarray, probs: np.ndarray,
                     thresholds: Sequence[float] = DETECTOR_THRESHOLDS) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and Youden's J of slice calls ``probs >= t`` for every threshold.

    Empty cases: no positive call gives precision 0 (and F1 0); no positive slice gives
    recall 0; no negative slice gives specificity 0.

    Args:
        labels: ``(n,)`` bool truth per slice.
        probs: ``(n,)`` probabilities.
        thresholds: the thresholds.

    Returns:
        ``{"precision", "recall", "f1", "youden_j", "positive_calls"}``, each ``(len(thresholds),)``.
    """
    y = np.asarray(labels, bool)
    calls = np.asarray(probs, np.float64)[None, :] >= np.asarray(thresholds, np.float64)[:, None]
    tp = (calls & y).sum(1).astype(np.float64)
    fp = (calls & ~y).sum(1).astype(np.float64)
    n_pos, n_neg = float(y.sum()), float((~y).sum())
    called = tp + fp
    precision = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
    recall = tp / n_pos if n_pos else np.zeros_like(tp)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    specificity = 1.0 - fp / n_neg if n_neg else np.zeros_like(tp)
    return {"precision": precision, "recall": recall, "f1": f1, "youden_j": recall + specificity - 1.0,
            "positive_calls": called.astype(np.int64)}


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
    """Score the thresholds on ``cases`` with the run's best model; write ``calibration.json``.

    Args:
        run_dir: a RUN with ``model.keras`` (segmenter: :data:`THRESHOLDS` by per-slice Dice;
            detector: :data:`DETECTOR_THRESHOLDS` by F1).
        cases: the validation cases as :class:`bonemets_tf.cache.CachedCase` (``ct()``/``mask()``).
        batch_size: slices per inference call.

    Returns:
        The record written (see the module docstring).
    """
    from bonemets_tf.inference import Predictor, detect_volume, slice_probabilities

    run = read_run(run_dir)
    predictor = Predictor(run)
    if run.task == "detect":
        labels, probs = [], []
        for cached in cases:
            probs.append(detect_volume(predictor, cached.ct(), batch_size))
            labels.append(np.asarray(cached.positive, bool))
        return calibrate_detector(run.path, [c.case for c in cases], np.concatenate(labels), np.concatenate(probs))
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
    record: dict[str, Any] = {"task": "segment", "metric": METRIC, "cases": [c.case for c in cases], "n_slices": n,
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


def calibrate_detector(run_path: Path, cases: Sequence[str], labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Choose a detector's threshold by validation F1 and write ``calibration.json``.

    Args:
        run_path: the RUN folder.
        cases: the validation case ids (recorded).
        labels: ``(n,)`` bool truth of every validation slice.
        probs: ``(n,)`` the detector's probabilities.

    Returns:
        The record written (module docstring); with no positive slice the threshold stays 0.5.
    """
    from analysis.evaluation.metrics.detection import roc_auc

    labels, probs = np.asarray(labels, bool), np.asarray(probs, np.float64)
    curves = detection_curves(labels, probs)
    auc = roc_auc(labels, probs) if labels.any() and not labels.all() else None
    record: dict[str, Any] = {"task": "detect", "metric": DETECTOR_METRIC, "cases": list(cases),
                              "n_slices": int(labels.size), "n_positive": int(labels.sum()),
                              "auc": None if auc is None else round(float(auc), 6),
                              "thresholds": list(DETECTOR_THRESHOLDS),
                              **{k: [round(float(v), 6) for v in curves[k]]
                                 for k in ("f1", "precision", "recall", "youden_j")}}
    half = DETECTOR_THRESHOLDS.index(0.5)
    candidates = np.unique(np.round(probs, 6))
    if candidates.size > 2000:
        candidates = np.unique(np.round(np.quantile(probs, np.linspace(0, 1, 2001)), 6))
    candidates = tuple(float(t) for t in np.union1d(candidates, DETECTOR_THRESHOLDS))
    chosen = detection_curves(labels, probs, candidates)
    if not labels.any():
        t = 0.5
        log.warning("%s: no validation slice with lesion; detector threshold left at 0.5", run_path)
    else:
        t = choose_threshold(candidates, chosen["f1"])
    i = candidates.index(t)
    record.update(threshold=t, f1_at_threshold=round(float(chosen["f1"][i]), 6),
                  precision_at_threshold=round(float(chosen["precision"][i]), 6),
                  recall_at_threshold=round(float(chosen["recall"][i]), 6),
                  **{"f1_at_0.5": round(float(curves["f1"][half]), 6),
                     "positive_calls_at_0.5": int(curves["positive_calls"][half])},
                  positive_calls_at_threshold=int(chosen["positive_calls"][i]))
    log.info("%s: validation F1 %.3f at threshold %.2f (%.3f at 0.5; AUC %s; %d slices)", run_path.name,
             record["f1_at_threshold"], t, record["f1_at_0.5"], record["auc"], labels.size)
    atomic_write_json(run_path / CALIBRATION_FILE, record)
    return record
