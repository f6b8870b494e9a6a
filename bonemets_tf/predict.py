"""``predict``: a trained Keras model on whole CT volumes, written as NIfTI masks or a
slice table, with an optional detection-to-segmentation cascade.

Outputs in ``PRED/NAME``, the folder contract of :mod:`analysis.predictions` (the layout
``analyze`` reads):

* segmenter: ``<case>.nii.gz``, uint8 0/1 with exactly the CT's size, spacing, origin and
  direction (:func:`analysis.io.write_mask`);
* detector: ``slices.csv``, columns ``case,slice,probability``, one row per slice;
* cascade (segmenter plus ``detector``): the masks, plus ``detector_slices.csv`` with the
  detector's probabilities;
* always ``predict.json``: models (RUN paths, arch), thresholds, min size, every finished
  case, the runs (shards) that wrote them, slices segmented and skipped, timing.

Each case's outputs appear atomically; a rerun of the same command skips finished cases, so
a killed run resumes, and ``--shard i/n`` runs fill one folder together (at the same time
too). The network work is :mod:`bonemets_tf.inference`.

The cascade follows the paper's workflow (Pawan, Rich et al.): a detector marks the
slices with lesion; only slices whose probability is at least ``detector_threshold``
are segmented, the others stay empty.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from analysis.cohort import Cohort
from analysis.errors import InputError
from analysis.io import Geometry, read_array, write_mask
from analysis.predictions import (DETECTOR_CSV, SLICES_CSV, PredictionFolder, check_ct, mask_path,
                                  remove_small_components, select_cases)
from bonemets_tf.inference import Predictor, check_memory, detect_volume, estimate_case_bytes, segment_volume
from bonemets_tf.models.catalog import DETECT, SEGMENT
from bonemets_tf.run import RunInfo, calibrated_threshold, read_run

log = logging.getLogger(__name__)


# --- options ------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictOptions:
    """Settings of :func:`predict`.

    Attributes:
        cases: ``--cases`` value (``test``, ``all`` or ``ID,ID,...``).
        threshold: a pixel is lesion when its probability is >= this; ``"auto"``: the
            segmenter RUN's validation-calibrated threshold (``RUN/calibration.json``, see
            :mod:`bonemets_tf.calibrate`).
        min_size: remove 3D components (26-connectivity) smaller than this many voxels;
            0 keeps everything.
        detector_threshold: cascade: a slice is segmented when the detector's
            probability is >= this (a value above 1 segments nothing).
        batch_size: slices per network call.
        shard: ``(i, n)``: only ``sorted(cases)[i::n]``.
    """

    cases: str = "test"
    threshold: float | str = 0.5
    min_size: int = 0
    detector_threshold: float = 0.5
    batch_size: int = 8
    shard: tuple[int, int] | None = None

    def check(self) -> None:
        """Raise :class:`InputError` for out-of-range values."""
        if isinstance(self.threshold, str):
            if self.threshold != "auto":
                raise InputError(f"--threshold {self.threshold}: expected a probability in [0, 1] or 'auto'")
        elif not 0.0 <= self.threshold <= 1.0:
            raise InputError(f"--threshold {self.threshold}: expected a probability in [0, 1]")
        if self.min_size < 0:
            raise InputError(f"--min-size {self.min_size}: expected >= 0 voxels (0 disables it)")
        if not math.isfinite(self.detector_threshold) or self.detector_threshold < 0:
            raise InputError(f"--detector-threshold {self.detector_threshold}: expected a finite value >= 0")
        if self.batch_size < 1:
            raise InputError(f"--batch-size {self.batch_size}: expected >= 1")


# --- the command ----------------------------------------------------------------------


@dataclass
class _Plan:
    """Everything validated before any output is written."""

    seg: RunInfo | None
    det: RunInfo | None
    cohort: Cohort
    cases: list[str]
    geometries: dict[str, Geometry]
    options: PredictOptions
    threshold_source: str | None
    folder: PredictionFolder


def _plan(model: str | os.PathLike, dataset: str | os.PathLike, out: Path, detector: str | os.PathLike | None,
          options: PredictOptions, overwrite: bool) -> _Plan:
    options.check()
    run = read_run(model)
    det = None
    if detector is not None:
        if run.task != SEGMENT:
            raise InputError(f"--model {run.path}: is a detector ({run.arch}); the --detector cascade needs a segmenter")
        det = read_run(detector, task=DETECT, option="--detector")
    seg, det_run = (run, det) if run.task == SEGMENT else (None, run)
    source = None
    if seg is not None:
        source = "option"
        if options.threshold == "auto":
            options = replace(options, threshold=calibrated_threshold(seg.path))
            source = f"auto: {seg.path / 'calibration.json'}"
            log.info("predict: validation-calibrated threshold %.2f", options.threshold)
    elif options.threshold == "auto":
        options = replace(options, threshold=0.5)
    cohort = Cohort(dataset)
    cohort.require_exists()
    settings = {
        "mode": "cascade" if seg and det_run else (SEGMENT if seg else DETECT),
        "model": str((seg or det_run).path), "detector": str(det_run.path) if seg and det_run else None,
        "input": str(cohort.root.resolve()),
        "threshold": options.threshold if seg else None,
        "detector_threshold": options.detector_threshold if seg and det_run else None,
        "min_size_voxels": options.min_size if seg else None,
    }
    folder = PredictionFolder(out, settings, overwrite=overwrite)
    cases = select_cases(cohort, options.cases, options.shard)
    geometries = {case: check_ct(cohort.image_path(case)) for case in cases}
    return _Plan(seg=seg, det=det_run, cohort=cohort, cases=cases, geometries=geometries, options=options,
                 threshold_source=source, folder=folder)


def predict(model: str | os.PathLike, dataset: str | os.PathLike, out: str | os.PathLike, *,
            options: PredictOptions = PredictOptions(), detector: str | os.PathLike | None = None,
            overwrite: bool = False) -> Path:
    """Run a segmenter or detector RUN (optionally as a cascade) on a cohort's cases.

    Args:
        model: RUN folder of a segmenter or a detector.
        dataset: cohort folder.
        out: output folder ``PRED/NAME`` (layout in the module docstring).
        options: thresholds, cases, batch size, shard.
        detector: RUN folder of a detector for the cascade (``model`` must be a segmenter).
        overwrite: replace a folder written with other settings, or redo finished cases.

    Returns:
        The output folder.

    Raises:
        InputError: bad RUN folders, cases, CT files (unreadable, not 3D, NaN/infinite),
            a non-empty ``out`` written otherwise without ``overwrite``, or a case that
            would not fit in memory. Nothing is written in any of these cases.
    """
    out = Path(out)
    plan = _plan(model, dataset, out, detector, options, overwrite)
    options = plan.options
    import tensorflow as tf  # heavy: only after the cheap checks

    t0 = time.perf_counter()
    seg = Predictor(plan.seg) if plan.seg else None
    det = Predictor(plan.det) if plan.det else None
    for p in (seg, det):
        if p is None:
            continue
        biggest = max(plan.geometries.items(), key=lambda kv: math.prod(kv[1].size))
        need = estimate_case_bytes(biggest[1].shape, task=p.run.task, context=p.run.context,
                                   batch_size=options.batch_size, first_filters=p.first_filters(),
                                   image_size=p.run.image_size, stride=p.run.stride, params=p.model.count_params())
        check_memory(need, f"case {biggest[0]} {tuple(biggest[1].shape)} with {p.run.arch}")
    for p in (seg, det):
        if p is not None:
            p.warm_up()
    todo = plan.folder.prepare(plan.cases)
    log.info("predict: %d case(s) with %s%s (tensorflow %s)", len(todo), (seg or det).run.arch,
             f" after detector {det.run.arch}" if seg and det else "", tf.__version__)
    timing = _run_cases(plan, todo, seg, det, options)
    timing["seconds_total"] = round(time.perf_counter() - t0, 3)
    plan.folder.finish(_record(plan, seg, det, options, todo, timing),
                                slices_name=None if det is None else (SLICES_CSV if seg is None else DETECTOR_CSV),
                                summary=_summary)
    log.info("predict: %d slices through the networks in %.1f s (%.1f slices/s); wrote %s",
             timing["network_slices"], timing["seconds_network"], timing["slices_per_s"] or 0.0, out)
    return out


def _run_cases(plan: _Plan, todo: list[str], seg: Predictor | None, det: Predictor | None,
               options: PredictOptions) -> dict[str, Any]:
    from tqdm import tqdm

    network_slices, network_seconds = 0, 0.0
    for case in tqdm(todo, desc="predict", unit="case", file=sys.stderr, disable=None):
        t_case = time.perf_counter()
        volume, geometry = read_array(plan.cohort.image_path(case), require_finite=False)  # checked in _plan
        volume = volume.astype(np.float32, copy=False)
        n = volume.shape[0]
        with plan.folder.case(case) as (staging, part):
            t = time.perf_counter()
            probs = detect_volume(det, volume, options.batch_size) if det else None
            network_slices += n if det else 0
            if probs is not None:
                part["slice_probabilities"] = [float(p) for p in probs]
            part["slices"] = n
            if seg is not None:
                chosen = None if probs is None else np.flatnonzero(probs >= options.detector_threshold)
                mask = segment_volume(seg, volume, options.batch_size, options.threshold, chosen)
                segmented = n if chosen is None else len(chosen)
                network_slices += segmented
                network_seconds += time.perf_counter() - t
                mask = remove_small_components(mask, options.min_size)
                write_mask(mask, geometry, mask_path(staging, case))
                part.update(segmented=segmented, skipped=n - segmented, lesion_voxels=int(mask.sum()))
            else:
                network_seconds += time.perf_counter() - t
            part["seconds"] = round(time.perf_counter() - t_case, 3)
        log.info("predict: %s done (%d slices, %.1f s)", case, n, part["seconds"])
        # release this case before the next is read: otherwise its CT (float32) and mask stay
        # bound while the next case loads, and the peak grows from the second case on
        del volume, probs
        mask = None
    return {"seconds_network": round(network_seconds, 3), "network_slices": network_slices,
            "slices_per_s": round(network_slices / network_seconds, 3) if network_seconds > 0 else None}


def _summary(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    total = sum(int(p.get("slices", 0)) for p in parts.values())
    skipped = sum(int(p.get("skipped", 0)) for p in parts.values())
    return {"slices": {"total": total, "skipped": skipped,
                       "skipped_fraction": round(skipped / total, 6) if total else 0.0}}


def _record(plan: _Plan, seg: Predictor | None, det: Predictor | None, options: PredictOptions,
            todo: list[str], timing: dict[str, Any]) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    return {
        "mode": "cascade" if seg and det else (SEGMENT if seg else DETECT),
        "model": (seg or det).run.describe(),
        "detector": det.run.describe() if seg and det else None,
        "dataset": str(plan.cohort.root.resolve()),
        "cases_option": options.cases,
        "shard": None if options.shard is None else {"index": options.shard[0], "count": options.shard[1]},
        "cases_run": todo,
        "threshold": options.threshold if seg else None,
        "threshold_source": plan.threshold_source,
        "detector_threshold": options.detector_threshold if seg and det else None,
        "min_size_voxels": options.min_size if seg else None,
        "connectivity": 26,
        "batch_size": options.batch_size,
        "timing": timing,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__},
    }
