"""Inference of a trained Keras model on whole CT volumes, written as NIfTI masks or a
slice table, with an optional detection-to-segmentation cascade.

Outputs in ``PRED/NAME`` (the layout ``analyze`` reads; the folder is built in a
temporary sibling and renamed into place, so a failure leaves nothing behind):

* segmenter: ``<case>.nii.gz``, uint8 0/1 with exactly the CT's size, spacing, origin and
  direction (:func:`analysis.io.write_mask`);
* detector: ``slices.csv``, columns ``case,slice,probability``, one row per slice;
* cascade (segmenter plus ``detector``): the masks, plus ``detector_slices.csv`` with the
  detector's probabilities (not named ``slices.csv``, so ``analyze`` scores the folder as
  the segmenter it is);
* always ``predict.json``: models (RUN paths, arch), thresholds, min size, cases, shard,
  slices segmented and skipped, timing and throughput.

Slices go through the network at full resolution in batches, each as ``(rows, cols,
context)`` raw HU with the ``context`` neighbours that training used (centre slice in the
middle, edge slices repeated; :func:`context_indices` is the same rule as
:class:`bonemets_tf.data.SliceStore`). Padding rows/cols to the segmenter's stride and
cropping back happens inside the model (``PadToMultiple``/``CropLike``, padding with the
bottom of the HU window, i.e. air); detectors resize to their training ``image_size``
inside the model, the same bilinear resize the training pipeline applies.

The cascade follows the paper's workflow (Pawan, Rich et al.): a detector marks the
slices with lesion; only slices whose probability is at least ``detector_threshold``
are segmented, the others stay empty.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from analysis.cohort import Cohort
from analysis.errors import InputError
from analysis.io import (Geometry, atomic_directory, atomic_write_json, atomic_write_text, count_nonfinite, read_array,
                         read_header, write_mask)
from analysis.shards import parse_shard, shard_cases  # noqa: F401  (re-exported: the CLI and tests use them here)
from bonemets_tf.models.catalog import DETECT, SEGMENT
from bonemets_tf.run import RunInfo, read_run

log = logging.getLogger(__name__)

SLICES_CSV = "slices.csv"
DETECTOR_CSV = "detector_slices.csv"
RECORD = "predict.json"

#: Rough float32 activation channels alive at once per input pixel, in units of the
#: network's first-layer filters (skip tensors, decoder concatenations, BatchNorm
#: temporaries). Only used to refuse volumes that obviously cannot fit in memory.
ACTIVATION_FACTOR = 8


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


# --- slices and context ---------------------------------------------------------------


def context_indices(z: np.ndarray | int, n_slices: int, context: int) -> np.ndarray:
    """Slice indices feeding centre slice(s) ``z``: ``z - context//2 .. z + context//2``,
    clamped to ``0 .. n_slices - 1`` (edge slices repeat), as in training.

    Returns:
        ``(len(z), context)`` int64 (``(context,)`` for a scalar ``z``).
    """
    offsets = np.arange(context, dtype=np.int64) - context // 2
    return np.clip(np.asarray(z, np.int64)[..., None] + offsets, 0, n_slices - 1)


def context_batch(volume: np.ndarray, z: Sequence[int], context: int) -> np.ndarray:
    """Network input for centre slices ``z`` of ``volume``.

    Args:
        volume: CT in HU, ``(slices, rows, cols)``.
        z: centre slice indices.
        context: slices per input (odd).

    Returns:
        ``(len(z), rows, cols, context)`` float32 HU.
    """
    idx = context_indices(np.asarray(z), volume.shape[0], context)
    return np.ascontiguousarray(np.moveaxis(volume[idx], 1, -1), dtype=np.float32)


class Predictor:
    """A loaded model behind one ``tf.function`` for any batch, rows and cols.

    One input signature ``(None, None, None, context)`` means one trace for every batch
    and slice size (``predict_on_batch`` would retrace per shape).

    Args:
        run: the model's RUN.
        model: the loaded ``keras.Model`` (None: load it from ``run``).
    """

    def __init__(self, run: RunInfo, model=None) -> None:
        import tensorflow as tf

        self.run = run
        self.model = model if model is not None else run.load_model()
        self._fn = tf.function(lambda x: self.model(x, training=False),
                               input_signature=[tf.TensorSpec([None, None, None, run.context], tf.float32)])
        try:
            self._fn.get_concrete_function()
        except Exception as exc:  # a layer that needs static rows/cols (e.g. bilinear UpSampling2D)
            log.warning("%s does not trace with unknown rows/cols (%s); tracing per slice size instead",
                        run.arch, type(exc).__name__)
            # exact shapes: reduce_retracing would relax rows/cols to None on the second shape
            # and hit the same error (found by benchmarks/run.py: warm-up 32^2, then 512^2)
            self._fn = tf.function(lambda x: self.model(x, training=False))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for ``batch`` ``(B, rows, cols, context)`` HU: ``(B,)`` for a
        detector, ``(B, rows, cols)`` for a segmenter (float32)."""
        out = self._fn(batch).numpy()
        return out[:, 0] if self.run.task == DETECT else out[..., 0]

    def warm_up(self) -> None:
        """Trace the function once on a small batch, so timings measure steady-state inference."""
        self._fn(np.zeros((1, 32, 32, self.run.context), np.float32))

    def first_filters(self) -> int:
        """Filters of the model's first convolution (a scale for memory estimates)."""
        import keras

        for layer in self.model.layers:
            if isinstance(layer, keras.layers.Conv2D):
                return int(layer.filters)
        return 64


def detect_volume(predictor: Predictor, volume: np.ndarray, batch_size: int) -> np.ndarray:
    """Detector probability of every slice of ``volume`` ``(slices, rows, cols)`` HU.

    Returns:
        ``(slices,)`` float32 probabilities.
    """
    n = volume.shape[0]
    out = np.empty(n, np.float32)
    for start in range(0, n, batch_size):
        z = np.arange(start, min(start + batch_size, n))
        out[z] = predictor(context_batch(volume, z, predictor.run.context))
    return out


def segment_volume(predictor: Predictor, volume: np.ndarray, batch_size: int, threshold: float,
                   slices: Sequence[int] | None = None) -> np.ndarray:
    """Binary lesion mask of ``volume`` ``(slices, rows, cols)`` HU.

    Args:
        predictor: a segmenter.
        volume: CT in HU.
        batch_size: slices per call.
        threshold: probability at or above which a pixel is lesion.
        slices: centre slices to segment (None: all); the others stay 0.

    Returns:
        uint8 0/1 mask, same shape as ``volume``.
    """
    mask = np.zeros(volume.shape, np.uint8)
    todo = np.arange(volume.shape[0]) if slices is None else np.asarray(sorted(slices), np.int64)
    for start in range(0, len(todo), batch_size):
        z = todo[start:start + batch_size]
        mask[z] = predictor(context_batch(volume, z, predictor.run.context)) >= threshold
    return mask


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 3D connected components (26-connectivity, cc3d) with fewer than ``min_size``
    voxels; ``min_size <= 1`` returns the mask unchanged.

    Args:
        mask: ``(slices, rows, cols)`` 0/1.

    Returns:
        uint8 0/1 mask.
    """
    mask = (np.asarray(mask) != 0).astype(np.uint8)
    if min_size <= 1 or not mask.any():
        return mask
    import cc3d

    labels = cc3d.connected_components(mask, connectivity=26)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels].astype(np.uint8)


# --- memory ---------------------------------------------------------------------------


def estimate_case_bytes(shape: Sequence[int], *, task: str, context: int, batch_size: int, first_filters: int,
                        image_size: int, stride: int, params: int) -> int:
    """Rough upper estimate of the memory one case needs, in bytes.

    The volume as float32 plus its native copy and the uint8 mask (9 bytes a voxel), the
    input batch, ``ACTIVATION_FACTOR * first_filters`` float32 activations per network
    pixel (the padded slice for segmenters, ``image_size**2`` for detectors) and the
    weights. It is meant to catch volumes that obviously cannot fit, not to be exact.

    Args:
        shape: ``(slices, rows, cols)``.
    """
    z, rows, cols = (int(s) for s in shape)
    volume = 9 * z * rows * cols
    batch_input = 4 * batch_size * rows * cols * context
    if task == SEGMENT:
        pixels = (-(-rows // stride) * stride) * (-(-cols // stride) * stride)
    else:
        pixels = image_size * image_size + rows * cols
    activations = 4 * batch_size * pixels * ACTIVATION_FACTOR * first_filters
    return volume + batch_input + activations + 4 * params


def check_memory(needed: int, what: str) -> None:
    """Raise :class:`InputError` when ``needed`` bytes exceed the available memory
    (:func:`analysis.resources.require_memory`)."""
    from analysis.resources import require_memory

    require_memory(needed, what, hint="use a smaller --batch-size")


# --- the command ----------------------------------------------------------------------


@dataclass
class _Plan:
    """Everything validated before any output is written."""

    seg: RunInfo | None
    det: RunInfo | None
    cohort: Cohort
    cases: list[str]
    geometries: dict[str, Geometry]


def _plan(model: str | os.PathLike, dataset: str | os.PathLike, out: Path, detector: str | os.PathLike | None,
          options: PredictOptions, overwrite: bool) -> _Plan:
    options.check()
    run = read_run(model)
    det = None
    if detector is not None:
        if run.task != SEGMENT:
            raise InputError(f"--model {run.path}: is a detector ({run.arch}); the --detector cascade needs a segmenter")
        det = read_run(detector, task=DETECT, option="--detector")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out}: output folder exists and is not empty; pass --overwrite to replace it")
    cohort = Cohort(dataset)
    cohort.require_exists()
    chosen = cohort.select(options.cases)
    cases = shard_cases(chosen, options.shard)
    if not cases:
        raise InputError(f"--shard {options.shard[0]}/{options.shard[1]}: selects none of the {len(chosen)} case(s); "
                         f"use n <= {len(chosen)}")
    geometries = {}
    for case in cases:
        path = cohort.image_path(case)
        g = read_header(path)
        if len(g.size) != 3:
            raise InputError(f"{path}: is a {len(g.size)}D image, expected a 3D CT")
        bad = count_nonfinite(path)  # decodes float files only; integer CTs are finite
        if bad:
            raise InputError(f"{path}: {bad} voxel(s) are NaN or infinite; expected finite values (HU)")
        geometries[case] = g
    seg, det_run = (run, det) if run.task == SEGMENT else (None, run)
    return _Plan(seg=seg, det=det_run, cohort=cohort, cases=cases, geometries=geometries)


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
        overwrite: replace a non-empty ``out``.

    Returns:
        The output folder.

    Raises:
        InputError: bad RUN folders, cases, CT files (unreadable, not 3D, NaN/infinite),
            a non-empty ``out`` without ``overwrite``, or a case that would not fit in memory.
            Nothing is written in any of these cases.
    """
    out = Path(out)
    plan = _plan(model, dataset, out, detector, options, overwrite)
    source = "option"
    if options.threshold == "auto":
        source = "auto"
        threshold = 0.5
        if plan.seg:
            from bonemets_tf.calibrate import calibrated_threshold

            threshold = calibrated_threshold(plan.seg.path)
            source = f"auto: {plan.seg.path / 'calibration.json'}"
            log.info("predict: validation-calibrated threshold %.2f", threshold)
        options = replace(options, threshold=threshold)
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
    log.info("predict: %d case(s) with %s%s (tensorflow %s)", len(plan.cases), (seg or det).run.arch,
             f" after detector {det.run.arch}" if seg and det else "", tf.__version__)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        record = _run_cases(plan, seg, det, options, tmp)
        record["threshold_source"] = source if seg else None
        record["timing"]["seconds_total"] = round(time.perf_counter() - t0, 3)
        atomic_write_json(tmp / RECORD, record)
    log.info("predict: %d slices through the networks in %.1f s (%.1f slices/s); wrote %s",
             record["timing"]["network_slices"], record["timing"]["seconds_network"],
             record["timing"]["slices_per_s"], out)
    return out


def _run_cases(plan: _Plan, seg: Predictor | None, det: Predictor | None, options: PredictOptions,
               tmp: Path) -> dict[str, Any]:
    from tqdm import tqdm

    rows: list[tuple[str, int, float]] = []
    per_case: dict[str, dict[str, int]] = {}
    network_slices, network_seconds = 0, 0.0
    for case in tqdm(plan.cases, desc="predict", unit="case", file=sys.stderr, disable=None):
        volume, geometry = read_array(plan.cohort.image_path(case), require_finite=False)  # checked in _plan
        volume = volume.astype(np.float32, copy=False)
        n = volume.shape[0]
        t = time.perf_counter()
        probs = detect_volume(det, volume, options.batch_size) if det else None
        network_slices += n if det else 0
        if probs is not None:
            rows += [(case, z, float(p)) for z, p in enumerate(probs)]
        if seg is not None:
            chosen = None if probs is None else np.flatnonzero(probs >= options.detector_threshold)
            mask = segment_volume(seg, volume, options.batch_size, options.threshold, chosen)
            segmented = n if chosen is None else len(chosen)
            network_slices += segmented
            network_seconds += time.perf_counter() - t
            mask = remove_small_components(mask, options.min_size)
            write_mask(mask, geometry, tmp / f"{case}.nii.gz")
            per_case[case] = {"slices": n, "segmented": segmented, "skipped": n - segmented,
                              "lesion_voxels": int(mask.sum())}
        else:
            network_seconds += time.perf_counter() - t
            per_case[case] = {"slices": n}
        log.info("predict: %s done (%d slices)", case, n)
        # release this case before the next is read: otherwise its CT (float32) and mask stay
        # bound while the next case loads, and the peak grows from the second case on
        del volume, probs
        mask = None
    if det is not None:
        atomic_write_text(tmp / (SLICES_CSV if seg is None else DETECTOR_CSV), _slices_csv(rows))
    return _record(plan, seg, det, options, per_case, network_slices, network_seconds)


def _slices_csv(rows: list[tuple[str, int, float]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("case", "slice", "probability"))
    writer.writerows((case, z, f"{p:.6g}") for case, z, p in rows)
    return buf.getvalue()


def _record(plan: _Plan, seg: Predictor | None, det: Predictor | None, options: PredictOptions,
            per_case: dict[str, dict[str, int]], network_slices: int, network_seconds: float) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    total = sum(c["slices"] for c in per_case.values())
    skipped = sum(c.get("skipped", 0) for c in per_case.values())
    return {
        "mode": "cascade" if seg and det else (SEGMENT if seg else DETECT),
        "model": (seg or det).run.describe(),
        "detector": det.run.describe() if seg and det else None,
        "dataset": str(plan.cohort.root.resolve()),
        "cases_option": options.cases,
        "cases": plan.cases,
        "shard": None if options.shard is None else {"index": options.shard[0], "count": options.shard[1]},
        "threshold": options.threshold if seg else None,
        "detector_threshold": options.detector_threshold if seg and det else None,
        "min_size_voxels": options.min_size if seg else None,
        "connectivity": 26,
        "batch_size": options.batch_size,
        "slices": {"total": total, "skipped": skipped, "skipped_fraction": round(skipped / total, 6) if total else 0.0},
        "per_case": per_case,
        "timing": {"seconds_network": round(network_seconds, 3), "network_slices": network_slices,
                   "slices_per_s": round(network_slices / network_seconds, 3) if network_seconds > 0 else None},
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__},
    }
