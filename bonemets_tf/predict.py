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
its RUN was trained in; outputs go back to each input's own geometry. Segmenters run on whole
slices (``--crop``: the body's bounding box per slab, a faster approximation). The options
both wings share are :class:`analysis.prediction.request.PredictRequest`, run by
:func:`analysis.prediction.request.predict_folder`; this module adds the Keras wing's own:
RUN/SavedModel reading, ``--threshold auto``, the cascade, precision and the memory check.
Each case's outputs appear
atomically; a rerun of the same command skips finished cases, so a killed run resumes, and
``--shard i/n`` runs fill one folder together (at the same time too). With ``--images`` a
case that cannot be read is reported and skipped, the others are done; the command then
fails with one line per bad case. The network work is :mod:`bonemets_tf.inference`.

The cascade follows the paper's workflow (Pawan, Rich et al.): a detector marks the
slices with lesion; only slices whose probability is at least ``detector_threshold``
are segmented, the others stay empty.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from analysis.errors import InputError
from analysis.imaging.resample import in_plane_shape, needs_resampling
from analysis.prediction.folder import DETECTOR_CSV, SLICES_CSV
from analysis.prediction.request import PredictRequest, WingRun, plan_request, predict_folder, raise_failures
from analysis.prediction.runner import InputPlan, Network
from bonemets_tf.choices import PREDICT_PRECISIONS
from bonemets_tf.inference import (Predictor, check_memory, crop_context, detect_volume,
                                   estimate_case_bytes, slice_probabilities)
from bonemets_tf.models.catalog import DETECT, SEGMENT
from bonemets_tf.run import RunInfo, calibrated_threshold, read_run, training_status

log = logging.getLogger(__name__)


# --- options ------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictOptions(PredictRequest):
    """Settings of :func:`predict`: the request both wings share
    (:class:`~analysis.prediction.request.PredictRequest`: cases, shard, series, outputs, crop,
    bones, min size, overwrite) plus the Keras wing's own.

    Attributes:
        threshold: a pixel is lesion when its probability is >= this; ``"auto"``: the
            segmenter RUN's validation-calibrated threshold (``RUN/calibration.json``, see
            :mod:`bonemets_tf.calibrate`).
        detector_threshold: cascade: a slice is segmented when the detector's
            probability is >= this (a value above 1 segments nothing).
        batch_size: slices per network call.
        precision: ``float32`` or ``mixed_bfloat16`` (CPUs and GPUs with bf16 units).
        mirror: average the segmenter's logits over the slice and its mirror images along
            rows, cols and both (4 passes), the test-time mirroring nnU-Net applies in 2D.
        resample: run each model on slices resampled in-plane to the pixel spacing it was
            trained at (:meth:`bonemets_tf.run.RunInfo.training_spacing`) and bring its
            probabilities back onto the input's grid, so that a lesion's mask does not depend
            on the scanner's pixel size; False (``--no-resample``): at the input's own spacing.
    """

    threshold: float | str = 0.5
    detector_threshold: float = 0.5
    batch_size: int = 8
    precision: str = "float32"
    mirror: bool = False
    resample: bool = True

    def check(self) -> None:
        """Raise :class:`InputError` for out-of-range values."""
        if isinstance(self.threshold, str):
            if self.threshold != "auto":
                raise InputError(f"--threshold {self.threshold}: expected a probability in [0, 1] or 'auto'")
        elif not 0.0 <= self.threshold <= 1.0:
            raise InputError(f"--threshold {self.threshold}: expected a probability in [0, 1]")
        super().check()
        if not math.isfinite(self.detector_threshold) or self.detector_threshold < 0:
            raise InputError(f"--detector-threshold {self.detector_threshold}: expected a finite value >= 0")
        if self.batch_size < 1:
            raise InputError(f"--batch-size {self.batch_size}: expected >= 1")
        if self.precision not in PREDICT_PRECISIONS:
            raise InputError(f"--precision {self.precision}: expected one of {', '.join(PREDICT_PRECISIONS)}")


# --- the command ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Models:
    """The RUNs (or SavedModels) of one prediction, read and checked before any output."""

    seg: RunInfo | None
    det: RunInfo | None
    options: PredictOptions  # with ``threshold`` resolved to a number
    threshold_source: str | None

    @property
    def mode(self) -> str:
        return "cascade" if self.seg and self.det else (SEGMENT if self.seg else DETECT)

    @property
    def main(self) -> RunInfo:
        return self.seg or self.det


def _read_models(model: str | os.PathLike, detector: str | os.PathLike | None, options: PredictOptions) -> _Models:
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
    return _Models(seg=seg, det=det_run, options=options, threshold_source=source)


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
        overwrite: replace a folder written with other settings, or redo finished cases
            (the same as ``options.overwrite``).
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
    if overwrite:
        options = replace(options, overwrite=True)
    options.check()
    if (dataset is None) == (images is None):
        raise InputError("predict: give either --dataset (a cohort) or --images (files or DICOM folders)")
    models = _read_models(model, detector, options)
    options = models.options
    inputs = plan_request(options, dataset, images)
    for run in (models.seg, models.det):
        status = training_status(run) if run is not None else {}
        if status.get("learned") is False:  # predict anyway (the user asked), but say so
            log.warning("predict: %s (%s): %s", run.path, run.arch, status["reason"])
    seg = models.seg is not None
    wing = WingRun(
        mode=models.mode,
        settings={"model": str(models.main.path), "detector": str(models.det.path) if models.mode == "cascade" else None,
                  "threshold": options.threshold if seg else None,
                  "detector_threshold": options.detector_threshold if models.mode == "cascade" else None,
                  "precision": options.precision, "mirror": options.mirror if seg else None,
                  "resample": options.resample},
        network=lambda plan: _network(models, plan),
        outputs=options.outputs(threshold=float(options.threshold), detector_threshold=options.detector_threshold),
        record=lambda: _record(models),
        inference=lambda: {"precision": options.precision, "threshold": options.threshold if seg else None,
                           "threshold_source": models.threshold_source, "folds": None, "tile_step": None,
                           "batch_size": options.batch_size, "spacing": _spacing_record(models)},
        versions=("tensorflow", "keras"),
        slices_name=None if models.det is None else (DETECTOR_CSV if seg else SLICES_CSV),
        summary=_summary,
    )
    result = predict_folder(options, wing, out, inputs=inputs)
    raise_failures(result)
    return result.out


@contextlib.contextmanager
def _network(models: _Models, inputs: InputPlan) -> Iterator[Network]:
    """The Keras networks of ``models``, loaded (TensorFlow imported only here), memory-checked
    against the largest planned case and warmed up."""
    import tensorflow as tf

    options = models.options
    seg = Predictor(models.seg, precision=options.precision) if models.seg else None
    det = Predictor(models.det, precision=options.precision) if models.det else None
    spacing = {role: _model_spacing(p.run, options.resample) if p else None for role, p in (("seg", seg), ("det", det))}
    for role, p in (("seg", seg), ("det", det)):
        if p is None:
            continue
        need, case = max((_case_bytes(p, shape, inputs.pixel_mm.get(c), spacing[role], options.batch_size), c)
                         for c, shape in inputs.shapes.items())
        check_memory(need, f"case {case} {tuple(inputs.shapes[case])} with {p.run.arch}")
        p.warm_up()
    main = seg or det
    crop, context = options.crop and seg is not None, None
    if crop:
        context = crop_context(seg)
        if context is None:
            log.warning("predict: %s: its receptive radius is not known (a SavedModel, or a layer of unknown "
                        "reach), so the crop is approximate: masks may differ from whole slices near the "
                        "windows' edges (predict.json records the check)", seg.run.arch)
        else:
            log.info("predict: exact crop with %d px of context (%s's receptive radius)", context, seg.run.arch)
    log.info("predict: %d case(s) with %s%s%s (tensorflow %s)", len(inputs.cases), main.run.arch,
             f" after detector {det.run.arch}" if seg and det else "", ", mirrored" if options.mirror else "",
             tf.__version__)
    yield Network(name=main.run.name, fingerprint=main.run.fingerprint(),
                  segment=None if seg is None else (lambda v, z, _: slice_probabilities(seg, v, z, options.batch_size)),
                  detect=None if det is None else (lambda v: detect_volume(det, v, options.batch_size)),
                  stride=main.run.stride, crop=crop, context=context, mirror=options.mirror and seg is not None,
                  spacing_xy=spacing["seg"], detect_spacing_xy=spacing["det"])


def _case_bytes(p: Predictor, shape: tuple[int, int, int], pixel_mm: tuple[float, float] | None,
                spacing_xy: tuple[float, float] | None, batch_size: int) -> int:
    """:func:`estimate_case_bytes` of one case for one model, at the slice size the model sees:
    resampled to its pixel spacing ``spacing_xy`` when it runs at one (a 0.5 mm CT for a 1 mm
    model: a quarter of the pixels; a 2 mm CT: four times as many)."""
    network_rc = None
    if spacing_xy is not None and pixel_mm is not None and needs_resampling(pixel_mm, spacing_xy[::-1]):
        network_rc = in_plane_shape(shape[1:], pixel_mm, spacing_xy[::-1])
    return estimate_case_bytes(shape, task=p.run.task, context=p.run.context, batch_size=batch_size,
                               first_filters=p.first_filters(), image_size=p.run.image_size, stride=p.run.stride,
                               params=p.count_params(), network_rc=network_rc)


def _model_spacing(run: RunInfo, resample: bool) -> tuple[float, float] | None:
    """The pixel spacing a model runs at: its training spacing, or None (each input's own) with
    ``--no-resample`` or when it is unknown (said once, here)."""
    if not resample:
        return None
    spacing, source = run.training_spacing()
    if spacing is None:
        log.warning("predict: %s (%s): training pixel spacing %s; running at each input's own spacing "
                    "(as with --no-resample)", run.path, run.arch, source)
    else:
        log.info("predict: %s runs at %.4g x %.4g mm pixels (%s)", run.arch, spacing[0], spacing[1], source)
    return spacing


def _spacing_record(models: _Models) -> dict[str, Any]:
    """``predict.json["inference"]["spacing"]``: whether slices were resampled and to what (per case:
    ``per_case.<case>.spacing``)."""
    options = models.options
    out: dict[str, Any] = {"resample": options.resample}
    for role, run in (("model", models.seg or models.det), ("detector", models.det if models.seg else None)):
        if run is not None:
            spacing, source = run.training_spacing()
            out[role] = {"xy_mm": None if spacing is None else list(spacing), "source": source,
                         "used": "input's own" if spacing is None or not options.resample else "model's"}
    return out


def _summary(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    total = sum(int(p.get("slices", 0)) for p in parts.values())
    skipped = sum(int(p.get("skipped", 0)) for p in parts.values())
    return {"slices": {"total": total, "skipped": skipped,
                       "skipped_fraction": round(skipped / total, 6) if total else 0.0}}


def _record(models: _Models) -> dict[str, Any]:
    """The Keras wing's fields of ``predict.json`` (the common ones come from the request)."""
    options, main, cascade = models.options, models.main, models.mode == "cascade"
    seg = models.seg is not None
    return {
        "model": {**main.describe(), "fingerprint": main.fingerprint()},
        "detector": {**models.det.describe(), "fingerprint": models.det.fingerprint()} if cascade else None,
        "training": training_status(main),
        "budget": main.budget(),
        "detector_training": training_status(models.det) if cascade else None,
        "threshold": options.threshold if seg else None,
        "threshold_source": models.threshold_source,
        "detector_threshold": options.detector_threshold if cascade else None,
        "batch_size": options.batch_size,
        "precision": options.precision,
        "mirroring": options.mirror if seg else None,
    }
