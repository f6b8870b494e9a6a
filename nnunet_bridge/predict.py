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

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from analysis.errors import InputError
from analysis.prediction.folder import mask_path
from analysis.prediction.request import (PredictRequest, WingRun, plan_request, predict_folder, raise_failures,
                                         training_budget)
from analysis.prediction.runner import InputPlan, Network
from nnunet_bridge.device import resolve_device
from nnunet_bridge.env import CHECKPOINT, WorkLayout, nnunet_environment

log = logging.getLogger(__name__)

#: nnU-Net's own mask is the argmax of its two classes' softmax: lesion probability > 0.5
#: (the runner's ``>=`` differs only on exact ties).
NNUNET_THRESHOLD = 0.5
#: Sliding-window step as a fraction of the patch (nnU-Net's default: tiles overlap by half).
TILE_STEP = 0.5


@dataclass(frozen=True)
class PredictOptions(PredictRequest):
    """Options of ``nnunet predict``: the request both wings share
    (:class:`~analysis.prediction.request.PredictRequest`: cases, shard, series, outputs, crop,
    bones, min size, overwrite) plus the nnU-Net wing's own.

    The crop is off by default, as for the Keras wing; for nnU-Net it also saves nothing:
    nnU-Net pads a box smaller than its patch (512 x 512 for paper-sized CT) back to the patch
    (measured 53 s vs 47 s for 32 slices of 512^2 on a 2-core CPU, BENCHMARKS.md "New patients").

    Attributes:
        folds: folds to ensemble; None uses every trained fold.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        mirroring: nnU-Net's mirroring test-time augmentation (4 passes per 2D tile).
    """

    folds: tuple[int, ...] | None = None
    device: str = "auto"
    mirroring: bool = True


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
    by :func:`analysis.prediction.request.predict_folder` (the same path as the Keras
    ``predict``): the network sees the canonical (LPS) view, whole slices unless ``crop``;
    each case appears atomically, a rerun skips finished cases, shards fill one folder
    together, and ``predict.json`` lists every finished case.

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
    from nnunet_bridge.train import training_status

    layout = WorkLayout(work)
    inputs = plan_request(options, dataset, images)
    folds = check_folds(layout, options.folds)
    training = training_status(layout)
    if training.get("learned") is False:
        log.warning("nnU-Net %s: %s", layout.work, training["reason"])
    device = resolve_device(options.device)
    fingerprint = layout_fingerprint(layout, folds)
    wing = WingRun(
        mode="segment",
        settings={"model": str(layout.model_folder.resolve()), "folds": folds, "mirroring": options.mirroring},
        network=lambda plan: _network(layout, folds, device, options, plan, fingerprint),
        outputs=options.outputs(threshold=NNUNET_THRESHOLD),
        record=lambda: {"model": {"name": "nnunet", "work": str(layout.work), "model_folder": str(layout.model_folder),
                                  "folds": folds, "plans": layout.plans_identifier, "framework": "nnU-Net v2",
                                  "fingerprint": fingerprint, "spacing_xy_mm": training.get("spacing_xy_mm"),
                                  "spacing_source": _spacing_source(layout)},
                        "training": training, "folds": folds, "mirroring": options.mirroring,
                        "budget": training_budget(width=training.get("width"), steps=training.get("iterations"),
                                                  batch_size=training.get("batch_size"),
                                                  patch=training.get("patch_size"), plan=training.get("plans"),
                                                  spacing_xy=training.get("spacing_xy_mm")),
                        "device": device.type, "threshold": NNUNET_THRESHOLD},
        inference=lambda: {"precision": "float32", "threshold": NNUNET_THRESHOLD,
                           "threshold_source": "nnU-Net: argmax of the two classes", "folds": folds,
                           "tile_step": TILE_STEP, "mirroring": options.mirroring,
                           "mirror_passes": 4 if options.mirroring else 1,
                           "spacing": _spacing_record(layout, training)},
        versions=("nnunetv2", "torch"),
    )
    result = predict_folder(options, wing, out, inputs=inputs)
    raise_failures(result)
    finished = set(result.record["cases"])
    return [mask_path(result.out, c.case_id) for c in inputs.cases if c.case_id in finished]


def _spacing_source(layout: WorkLayout) -> str:
    return f"nnU-Net plan {layout.plans_identifier}: its 2d configuration's spacing (the training slices' median)"


def _spacing_record(layout: WorkLayout, training: dict[str, Any]) -> dict[str, Any]:
    """``predict.json["inference"]["spacing"]``, as the Keras wing's: nnU-Net's preprocessing resamples
    every slice to its plan's pixel spacing (the runner passes the input's grid; ``per_case.<case>.spacing``
    therefore says the runner did not resample), so the model runs at the spacing it was trained at."""
    xy = training.get("spacing_xy_mm")
    return {"resample": True, "model": {"xy_mm": xy, "source": _spacing_source(layout),
                                        "used": "model's (nnU-Net's preprocessing resamples each slice)"
                                        if xy else "unknown (no trained plan recorded)"}}


@contextlib.contextmanager
def _network(layout: WorkLayout, folds: list[int], device: Any, options: PredictOptions, inputs: InputPlan,
             fingerprint: str) -> Iterator[Network]:
    """nnU-Net's predictor for ``folds``, as the runner's :class:`Network` (inside nnU-Net's environment)."""
    with nnunet_environment(layout.work):
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        predictor = nnUNetPredictor(tile_step_size=TILE_STEP, use_gaussian=True, use_mirroring=options.mirroring,
                                    perform_everything_on_device=device.type == "cuda", device=device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(layout.model_folder), use_folds=tuple(folds))
        log.info("nnU-Net: %d case(s), folds %s, mirroring %s, on %s", len(inputs.cases), folds,
                 "on" if options.mirroring else "off", device)
        yield Network(name="nnunet", fingerprint=fingerprint,
                      segment=lambda volume, z, spacing_zyx: lesion_probability(predictor, volume[z], spacing_zyx),
                      crop=options.crop)


def model_identity(work: str | Path, folds: Sequence[int] | None = None) -> tuple[Path, str, str]:
    """The work folder (resolved), the model's name and its weights' fingerprint, as ``predict``
    records them (``serve`` names each result's model with them).

    Raises:
        InputError: no trained folds (or not the ones asked for) in ``work``.
    """
    layout = WorkLayout(Path(work).resolve())
    chosen = check_folds(layout, folds)
    return layout.work, "nnunet", layout_fingerprint(layout, chosen)


def layout_fingerprint(layout: WorkLayout, folds: Sequence[int]) -> str:
    """sha256 (16 hex digits) of the folds' checkpoints: identifies the trained weights."""
    import hashlib

    h = hashlib.sha256()
    for fold in folds:
        with open(layout.checkpoint(fold), "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:16]
