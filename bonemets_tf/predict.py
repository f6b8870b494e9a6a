"""``predict``: a trained Keras model on whole CT volumes, written as NIfTI masks or a
slice table, with an optional detection-to-segmentation cascade, on a cohort or on new
patients' CT (``--images``: NIfTI/NRRD/MHA files, DICOM series folders, nested exports).

Outputs in ``PRED/NAME``, the folder contract of :mod:`analysis.prediction.folder` (the layout
``analyze`` reads), written case by case by :mod:`analysis.prediction.runner`:

* segmenter: ``<case>.nii.gz``, uint8 0/1 with exactly the input's size, spacing, origin and
  direction; ``lesions.csv`` and ``patients.csv``; ``preview/<case>.png``; with
  ``--probabilities`` ``probabilities/<case>.nii.gz``; with ``--dicom-seg`` and DICOM input
  ``dicom_seg/<case>.dcm``;
* detector: ``slices.csv``, columns ``case,slice,probability``, one row per slice;
* cascade (segmenter plus ``detector``): the segmenter's outputs, plus ``detector_slices.csv``;
* always ``predict.json``: the model (RUN or SavedModel, its fingerprint and training
  record), thresholds, orientation, every finished case with its input's sha256 (and the
  DICOM series used and skipped), seconds per case, the runs (shards) that wrote it, and
  the cases that failed.

Every network sees the canonical view (LPS, :mod:`analysis.imaging.orientation`), the orientation
its RUN was trained in; outputs go back to each input's own geometry. Segmenters run on the
body's bounding box per slab (``--no-crop``: whole slices). Each case's outputs appear
atomically; a rerun of the same command skips finished cases, so a killed run resumes, and
``--shard i/n`` runs fill one folder together (at the same time too). With ``--images`` a
case that cannot be read is reported and skipped, the others are done; the command then
fails with one line per bad case. The network work is :mod:`bonemets_tf.inference`.

The cascade follows the paper's workflow (Pawan, Rich et al.): a detector marks the
slices with lesion; only slices whose probability is at least ``detector_threshold``
are segmented, the others stay empty.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from analysis.errors import DataProblems, InputError
from analysis.imaging.orientation import CANONICAL
from analysis.prediction.folder import DETECTOR_CSV, SLICES_CSV, PredictionFolder
from analysis.prediction.runner import InputPlan, Network, Outputs, lesion_tables, plan_inputs, run_cases
from bonemets_tf.inference import (
    PRECISIONS,
    Predictor,
    check_memory,
    detect_volume,
    estimate_case_bytes,
    slice_probabilities,
)
from bonemets_tf.models.catalog import DETECT, SEGMENT
from bonemets_tf.run import RunInfo, calibrated_threshold, read_run, training_status

log = logging.getLogger(__name__)


# --- options ------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictOptions:
    """Settings of :func:`predict`.

    Attributes:
        cases: ``--cases`` value (``test``, ``all`` or ``ID,ID,...``; cohort input).
        threshold: a pixel is lesion when its probability is >= this; ``"auto"``: the
            segmenter RUN's validation-calibrated threshold (``RUN/calibration.json``, see
            :mod:`bonemets_tf.calibrate`).
        min_size: remove 3D components (26-connectivity) smaller than this many voxels;
            0 keeps everything.
        detector_threshold: cascade: a slice is segmented when the detector's
            probability is >= this (a value above 1 segments nothing).
        batch_size: slices per network call.
        shard: ``(i, n)``: only ``sorted(cases)[i::n]``.
        probabilities: also write ``probabilities/<case>.nii.gz`` (uint8, scale 1/255).
        dicom_seg: also write ``dicom_seg/<case>.dcm`` for DICOM input.
        preview: write ``preview/<case>.png``.
        crop: run segmenters on the body's bounding box (per slab) instead of whole slices.
        precision: ``float32`` or ``mixed_bfloat16`` (CPUs and GPUs with bf16 units).
        series: SeriesInstanceUID to use among a folder's DICOM series.
        bones: folder of bone maps ``<case>.nii.gz`` for the lesion table's bone columns.
        bones_from: ``project`` (the cohort's bone codes) or ``totalsegmentator`` ("total" ids).
    """

    cases: str = "test"
    threshold: float | str = 0.5
    min_size: int = 0
    detector_threshold: float = 0.5
    batch_size: int = 8
    shard: tuple[int, int] | None = None
    probabilities: bool = False
    dicom_seg: bool = False
    preview: bool = True
    crop: bool = True
    precision: str = "float32"
    series: str | None = None
    bones: str | None = None
    bones_from: str = "project"

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
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision {self.precision}: expected one of {', '.join(PRECISIONS)}")
        if self.bones_from not in ("project", "totalsegmentator"):
            raise InputError(f"--bones-from {self.bones_from}: expected project or totalsegmentator")
        if self.bones is not None and not Path(self.bones).is_dir():
            raise InputError(f"--bones {self.bones}: not a folder; expected DIR/<case>.nii.gz bone maps")


# --- the command ----------------------------------------------------------------------


@dataclass
class _Plan:
    """Everything validated before any output is written."""

    seg: RunInfo | None
    det: RunInfo | None
    inputs: InputPlan
    options: PredictOptions
    threshold_source: str | None
    folder: PredictionFolder


def _plan(model: str | os.PathLike, dataset: str | os.PathLike | None, images: str | os.PathLike | None, out: Path,
          detector: str | os.PathLike | None, options: PredictOptions, overwrite: bool) -> _Plan:
    options.check()
    if (dataset is None) == (images is None):
        raise InputError("predict: give either --dataset (a cohort) or --images (files or DICOM folders)")
    run = read_run(model, savedmodel=True)
    det = None
    if detector is not None:
        if run.task != SEGMENT:
            raise InputError(f"--model {run.path}: is a detector ({run.arch}); the --detector cascade needs a segmenter")
        det = read_run(detector, task=DETECT, option="--detector", savedmodel=True)
    seg, det_run = (run, det) if run.task == SEGMENT else (None, run)
    source = None
    if seg is not None:
        source = "option"
        if options.threshold == "auto":
            if seg.kind == "savedmodel":
                raise InputError(f"--threshold auto: {seg.path} is a SavedModel without its calibration; "
                                 f"pass a number or the RUN folder")
            options = replace(options, threshold=calibrated_threshold(seg.path))
            source = f"auto: {seg.path / 'calibration.json'}"
            log.info("predict: validation-calibrated threshold %.2f", options.threshold)
    elif options.threshold == "auto":
        options = replace(options, threshold=0.5)
    inputs = plan_inputs(dataset, images, cases=options.cases, shard=options.shard, series=options.series,
                         dicom_seg=options.dicom_seg)
    settings = {
        "mode": "cascade" if seg and det_run else (SEGMENT if seg else DETECT),
        "model": str((seg or det_run).path), "detector": str(det_run.path) if seg and det_run else None,
        "input": inputs.source, "threshold": options.threshold if seg else None,
        "detector_threshold": options.detector_threshold if seg and det_run else None,
        "min_size_voxels": options.min_size if seg else None, "orientation": CANONICAL,
        **({k: getattr(options, k) for k in ("probabilities", "dicom_seg", "preview", "crop", "precision", "series",
                                             "bones", "bones_from")} if seg else {"precision": options.precision}),
    }
    folder = PredictionFolder(out, settings, overwrite=overwrite)
    return _Plan(seg=seg, det=det_run, inputs=inputs, options=options, threshold_source=source, folder=folder)


def predict(model: str | os.PathLike, dataset: str | os.PathLike | None, out: str | os.PathLike, *,
            options: PredictOptions = PredictOptions(), detector: str | os.PathLike | None = None,
            overwrite: bool = False, images: str | os.PathLike | None = None) -> Path:
    """Run a segmenter or detector (RUN or SavedModel; optionally as a cascade) on a cohort's
    cases or on new patients' CT.

    Args:
        model: RUN folder or SavedModel of a segmenter or a detector.
        dataset: cohort folder (or None with ``images``).
        out: output folder ``PRED/NAME`` (layout in the module docstring).
        options: thresholds, cases, batch size, shard, extra outputs.
        detector: RUN folder or SavedModel of a detector for the cascade (``model`` must be
            a segmenter).
        overwrite: replace a folder written with other settings, or redo finished cases.
        images: ``--images`` PATH (:mod:`analysis.imaging.inputs`) instead of a cohort.

    Returns:
        The output folder.

    Raises:
        InputError: bad RUN folders, cases, CT files (unreadable, not 3D, NaN/infinite),
            a non-empty ``out`` written otherwise without ``overwrite``, or a case that
            would not fit in memory. Nothing is written in any of these cases.
        DataProblems: with ``images``, the cases that could not be predicted (one line
            each); the others were written.
    """
    out = Path(out)
    plan = _plan(model, dataset, images, out, detector, options, overwrite)
    options = plan.options
    for run in (plan.seg, plan.det):
        status = training_status(run) if run is not None else {}
        if status.get("learned") is False:  # predict anyway (the user asked), but say so
            log.warning("predict: %s (%s): %s", run.path, run.arch, status["reason"])
    import tensorflow as tf  # heavy: only after the cheap checks

    t0 = time.perf_counter()
    seg = Predictor(plan.seg, precision=options.precision) if plan.seg else None
    det = Predictor(plan.det, precision=options.precision) if plan.det else None
    biggest = max(plan.inputs.shapes.items(), key=lambda kv: math.prod(kv[1]))
    for p in (seg, det):
        if p is None:
            continue
        need = estimate_case_bytes(biggest[1], task=p.run.task, context=p.run.context,
                                   batch_size=options.batch_size, first_filters=p.first_filters(),
                                   image_size=p.run.image_size, stride=p.run.stride, params=p.count_params())
        check_memory(need, f"case {biggest[0]} {tuple(biggest[1])} with {p.run.arch}")
        p.warm_up()
    main = seg or det
    net = Network(name=main.run.arch, fingerprint=main.run.fingerprint(),
                  segment=None if seg is None else (lambda v, z, _: slice_probabilities(seg, v, z, options.batch_size)),
                  detect=None if det is None else (lambda v: detect_volume(det, v, options.batch_size)),
                  stride=main.run.stride, crop=options.crop)
    outputs = Outputs(threshold=float(options.threshold), min_size=options.min_size,
                      detector_threshold=options.detector_threshold, probabilities=options.probabilities,
                      dicom_seg=options.dicom_seg, preview=options.preview, lesions=True,
                      bones=None if options.bones is None else Path(options.bones), bones_from=options.bones_from)
    log.info("predict: %d case(s) with %s%s (tensorflow %s)", len(plan.inputs.cases), main.run.arch,
             f" after detector {det.run.arch}" if seg and det else "", tf.__version__)
    done, failures, seconds = run_cases(plan.folder, plan.inputs.cases, net, outputs, strict=plan.inputs.strict)
    failures = plan.inputs.failures + failures
    slices = sum((p["slices"] if det else 0) + (p.get("segmented", 0) if seg else 0) for p in done)
    timing = {"seconds_network": round(seconds, 3), "network_slices": slices,
              "slices_per_s": round(slices / seconds, 3) if seconds > 0 else None,
              "seconds_total": round(time.perf_counter() - t0, 3)}
    plan.folder.finish(_record(plan, seg, det, options, [p["case"] for p in done], failures, timing),
                       slices_name=None if det is None else (SLICES_CSV if seg is None else DETECTOR_CSV),
                       tables=lesion_tables() if seg is not None else (), summary=_summary)
    log.info("predict: %d case(s) in %.1f s (%d slices through the networks in %.1f s); wrote %s", len(done),
             timing["seconds_total"], slices, seconds, out)
    if failures:
        raise DataProblems(failures)
    return out


def _summary(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    total = sum(int(p.get("slices", 0)) for p in parts.values())
    skipped = sum(int(p.get("skipped", 0)) for p in parts.values())
    return {"slices": {"total": total, "skipped": skipped,
                       "skipped_fraction": round(skipped / total, 6) if total else 0.0}}


def _record(plan: _Plan, seg: Predictor | None, det: Predictor | None, options: PredictOptions,
            done: list[str], failures: list[str], timing: dict[str, Any]) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    main = seg or det
    return {
        "mode": "cascade" if seg and det else (SEGMENT if seg else DETECT),
        "model": {**main.run.describe(), "fingerprint": main.run.fingerprint()},
        "detector": {**det.run.describe(), "fingerprint": det.run.fingerprint()} if seg and det else None,
        "training": training_status(main.run),
        "detector_training": training_status(det.run) if seg and det else None,
        **plan.inputs.describe(options.cases),
        "shard": None if options.shard is None else {"index": options.shard[0], "count": options.shard[1]},
        "cases_run": done,
        "failed": failures,
        "orientation": CANONICAL,
        "threshold": options.threshold if seg else None,
        "threshold_source": plan.threshold_source,
        "detector_threshold": options.detector_threshold if seg and det else None,
        "min_size_voxels": options.min_size if seg else None,
        "connectivity": 26,
        "batch_size": options.batch_size,
        "precision": options.precision,
        "crop": options.crop if seg else None,
        "outputs": {k: getattr(options, k) for k in ("probabilities", "dicom_seg", "preview")} if seg else None,
        "bones": {"folder": options.bones, "kind": options.bones_from} if options.bones else None,
        "timing": timing,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__},
    }
