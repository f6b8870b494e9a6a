"""Predict lesion masks for whole CT volumes with the trained nnU-Net 2d folds.

``nnUNetPredictor`` is initialised from the trained model folder with the chosen folds;
it averages their logits (the paper's 5-fold ensemble). Each CT volume is given to
nnU-Net as one ``(1, slices, rows, cols)`` array with spacing ``(z, y, x)``: for a 2d
configuration nnU-Net predicts it slice by slice with 2D tiles, and resamples only in-plane
(the preprocessor keeps the slice spacing), so this equals predicting each axial slice as
the 2D images it was trained on. The predicted ``(slices, rows, cols)`` mask is in the CT's
array order and is written with the CT's exact geometry (uint8 0/1), one file per case,
each atomically: ``OUT/<case>.nii.gz`` (the folder contract of :mod:`analysis.prediction.folder`).
"""
from __future__ import annotations

import importlib.metadata
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from analysis.errors import InputError
from analysis.prediction.folder import PredictionFolder, mask_path
from nnunet_bridge.device import resolve_device
from nnunet_bridge.env import CHECKPOINT, WorkLayout, nnunet_environment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictOptions:
    """Options of ``nnunet predict``.

    Attributes:
        cases: ``test``, ``all``, ``train`` or ``ID,ID,...`` (see :meth:`Cohort.select`).
        folds: folds to ensemble; None uses every trained fold.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        mirroring: nnU-Net's mirroring test-time augmentation (4 passes per 2D tile).
        overwrite: replace a folder written with other settings, or redo the selected cases.
        shard: ``(i, n)``: predict only the i-th of n interleaved shares of the cases
            (0-based), so n processes (e.g. one per GPU) can share a run.
        probabilities: also write ``probabilities/<case>.nii.gz``: the fold- and
            mirror-averaged softmax of the lesion class, in the input's geometry.
        dicom_seg: also write ``dicom_seg/<case>.dcm`` for DICOM input.
        preview: write ``preview/<case>.png``.
        crop: predict the body's bounding box (per slab) instead of whole slices. Off by default:
            nnU-Net pads a box smaller than its patch (512 x 512 for paper-sized CT) back to the
            patch, so the crop saves nothing (measured 53 s vs 47 s for 32 slices of 512^2 on a
            2-core CPU, BENCHMARKS.md "New patients").
        series: SeriesInstanceUID to use among a folder's DICOM series.
        bones: folder of bone maps ``<case>.nii.gz`` for the lesion table.
        bones_from: ``project`` or ``totalsegmentator``.
    """

    cases: str = "test"
    folds: tuple[int, ...] | None = None
    device: str = "auto"
    mirroring: bool = True
    overwrite: bool = False
    shard: tuple[int, int] | None = None
    probabilities: bool = False
    dicom_seg: bool = False
    preview: bool = True
    crop: bool = False
    series: str | None = None
    bones: str | None = None
    bones_from: str = "project"


def check_folds(layout: WorkLayout, folds: Sequence[int] | None) -> list[int]:
    """The folds to use: the requested ones, all trained, or every trained fold when None.

    Raises:
        InputError: no trained fold in the work folder, or a requested fold is not trained.
    """
    trained = layout.trained_folds()
    if not trained:
        raise InputError(f"{layout.work}: no trained nnU-Net fold (expected "
                         f"{layout.model_folder}/fold_K/{CHECKPOINT}); run `nnunet train` first")
    if folds is None:
        return trained
    missing = [f for f in folds if f not in trained]
    if missing:
        raise InputError(f"--folds: fold {missing[0]} is not trained ({layout.checkpoint(missing[0])} not found); "
                         f"trained folds: {','.join(map(str, trained))}")
    return list(folds)


def lesion_probability(predictor: Any, ct: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """The lesion class's softmax for a stack of axial slices, from an initialised ``nnUNetPredictor``.

    nnU-Net averages the folds' (and mirrorings') logits, applies softmax and resamples the
    probabilities back to the input's grid (``predict_single_npy_array`` with
    ``save_or_return_probabilities``); its own mask is their argmax, which for two classes is
    ``probability > 0.5``.

    Args:
        predictor: ``nnunetv2.inference.predict_from_raw_data.nnUNetPredictor``.
        ct: HU ``(slices, rows, cols)`` (canonical orientation).
        spacing_zyx: voxel size in mm along the array axes.

    Returns:
        float32 ``(slices, rows, cols)`` in [0, 1], the same shape and order as ``ct``.
    """
    _, probs = predictor.predict_single_npy_array(np.ascontiguousarray(ct, np.float32)[None],
                                                  {"spacing": [float(s) for s in spacing_zyx]},
                                                  None, None, True)
    probs = np.asarray(probs)
    if probs.shape[1:] != ct.shape:  # nnU-Net returns the input's shape; anything else is a bug, not bad input
        raise RuntimeError(f"nnU-Net returned probabilities of shape {probs.shape} for a CT of shape {ct.shape}")
    return probs[1].astype(np.float32)


def predict(dataset: str | Path | None, work: str | Path, out: str | Path, options: PredictOptions, *,
            images: str | Path | None = None) -> list[Path]:
    """Write ``OUT/<case>.nii.gz`` (and the lesion tables, previews, optional probability maps
    and DICOM-SEG) for a cohort's cases or new patients' CT with the trained nnU-Net folds.

    ``OUT`` follows the folder contract of :mod:`analysis.prediction.folder`, written case by case
    by :mod:`analysis.prediction.runner` (the same pipeline as the Keras ``predict``): the network sees
    the canonical (LPS) view, cropped to the body per slab unless ``crop`` is off; each case
    appears atomically, a rerun skips finished cases, shards fill one folder together, and
    ``predict.json`` lists every finished case.

    Args:
        dataset: cohort folder (read only), or None with ``images``.
        work: work folder of ``nnunet train``.
        out: output folder for the masks.
        options: see :class:`PredictOptions`.
        images: ``--images`` PATH (:mod:`analysis.imaging.inputs`) instead of a cohort.

    Returns:
        The mask paths of the cases predicted or already finished.

    Raises:
        InputError: no or missing trained folds, unknown cases, a folder written with
            other settings without ``overwrite``, unreadable CTs, unavailable device.
        DataProblems: with ``images``, the cases that could not be predicted (one line
            each); the others were written.
    """
    from analysis.errors import DataProblems
    from analysis.imaging.orientation import CANONICAL
    from analysis.prediction.runner import Network, Outputs, lesion_tables, plan_inputs, run_cases

    layout = WorkLayout(work)
    if options.bones_from not in ("project", "totalsegmentator"):
        raise InputError(f"--bones-from {options.bones_from}: expected project or totalsegmentator")
    if options.bones is not None and not Path(options.bones).is_dir():
        raise InputError(f"--bones {options.bones}: not a folder; expected DIR/<case>.nii.gz bone maps")
    inputs = plan_inputs(dataset, images, cases=options.cases, shard=options.shard, series=options.series,
                         dicom_seg=options.dicom_seg)
    folds = check_folds(layout, options.folds)
    from nnunet_bridge.train import training_status

    training = training_status(layout)
    if training.get("learned") is False:
        log.warning("nnU-Net %s: %s", layout.work, training["reason"])
    settings = {"mode": "segment", "model": str(layout.model_folder.resolve()), "folds": folds,
                "mirroring": options.mirroring, "input": inputs.source, "orientation": CANONICAL,
                **{k: getattr(options, k) for k in ("probabilities", "dicom_seg", "preview", "crop", "series", "bones",
                                                    "bones_from")}}
    folder = PredictionFolder(out, settings, overwrite=options.overwrite)
    device = resolve_device(options.device)
    t0 = time.perf_counter()
    with nnunet_environment(layout.work):
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=options.mirroring,
                                    perform_everything_on_device=device.type == "cuda", device=device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(layout.model_folder), use_folds=tuple(folds))
        log.info("nnU-Net: %d case(s), folds %s, mirroring %s, on %s", len(inputs.cases), folds,
                 "on" if options.mirroring else "off", device)
        net = Network(name="nnunet", fingerprint=layout_fingerprint(layout, folds),
                      segment=lambda volume, z, spacing_zyx: lesion_probability(predictor, volume[z], spacing_zyx),
                      crop=options.crop)
        outputs = Outputs(threshold=0.5, probabilities=options.probabilities, dicom_seg=options.dicom_seg,
                          preview=options.preview, bones=None if options.bones is None else Path(options.bones),
                          bones_from=options.bones_from)
        done, failures, seconds = run_cases(folder, inputs.cases, net, outputs, strict=inputs.strict)
    failures = inputs.failures + failures
    folder.finish({
        "mode": "segment", "model": {"work": str(layout.work), "model_folder": str(layout.model_folder),
                                     "folds": folds, "framework": "nnU-Net v2",
                                     "fingerprint": layout_fingerprint(layout, folds)},
        "training": training,
        "folds": folds, "mirroring": options.mirroring, "device": device.type, **inputs.describe(options.cases),
        "shard": None if options.shard is None else {"index": options.shard[0], "count": options.shard[1]},
        "cases_run": [p["case"] for p in done], "failed": failures, "orientation": CANONICAL,
        "threshold": 0.5, "crop": options.crop,
        "outputs": {k: getattr(options, k) for k in ("probabilities", "dicom_seg", "preview")},
        "timing": {"seconds_network": round(seconds, 3), "seconds_total": round(time.perf_counter() - t0, 3)},
        "versions": {pkg: importlib.metadata.version(pkg) for pkg in ("nnunetv2", "torch")},
    }, tables=lesion_tables())
    if failures:
        raise DataProblems(failures)
    return [mask_path(folder.out, c.case_id) for c in inputs.cases if folder.done(c.case_id)]


def layout_fingerprint(layout: WorkLayout, folds: Sequence[int]) -> str:
    """sha256 (16 hex digits) of the folds' checkpoints: identifies the trained weights."""
    import hashlib

    h = hashlib.sha256()
    for fold in folds:
        with open(layout.checkpoint(fold), "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:16]
