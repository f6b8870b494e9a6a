"""Predict lesion masks for whole CT volumes with the trained nnU-Net 2d folds.

``nnUNetPredictor`` is initialised from the trained model folder with the chosen folds;
it averages their logits (the paper's 5-fold ensemble). Each CT volume is given to
nnU-Net as one ``(1, slices, rows, cols)`` array with spacing ``(z, y, x)``: for a 2d
configuration nnU-Net predicts it slice by slice with 2D tiles, and resamples only in-plane
(the preprocessor keeps the slice spacing), so this equals predicting each axial slice as
the 2D images it was trained on. The predicted ``(slices, rows, cols)`` mask is in the CT's
array order and is written with the CT's exact geometry (uint8 0/1), one file per case,
each atomically: ``OUT/<case>.nii.gz`` (the folder contract of :mod:`analysis.predictions`).
"""
from __future__ import annotations

import importlib.metadata
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from analysis.cohort import Cohort
from analysis.errors import InputError
from analysis.io import Geometry, read_array, write_mask
from analysis.predictions import PredictionFolder, check_ct, mask_path, select_cases
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
    """

    cases: str = "test"
    folds: tuple[int, ...] | None = None
    device: str = "auto"
    mirroring: bool = True
    overwrite: bool = False
    shard: tuple[int, int] | None = None


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


def predict_volume(predictor: Any, ct: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Predict one CT volume with an initialised ``nnUNetPredictor``.

    Args:
        predictor: ``nnunetv2.inference.predict_from_raw_data.nnUNetPredictor``.
        ct: HU volume ``(slices, rows, cols)``.
        geometry: its geometry (spacing in ITK ``(x, y, z)`` order).

    Returns:
        uint8 0/1 mask ``(slices, rows, cols)``, same shape and order as ``ct``.
    """
    spacing_zyx = [float(s) for s in reversed(geometry.spacing)]
    seg = predictor.predict_single_npy_array(ct.astype(np.float32)[None], {"spacing": spacing_zyx})
    seg = np.asarray(seg)
    if seg.shape != ct.shape:  # nnU-Net returns the input's shape; anything else is a bug, not bad input
        raise RuntimeError(f"nnU-Net returned shape {seg.shape} for a CT of shape {ct.shape}")
    return (seg == 1).astype(np.uint8)


def predict(dataset: str | Path, work: str | Path, out: str | Path, options: PredictOptions) -> list[Path]:
    """Write ``OUT/<case>.nii.gz`` for the selected cases with the trained nnU-Net folds.

    ``OUT`` follows the folder contract of :mod:`analysis.predictions`: each case appears
    atomically, a rerun skips finished cases, shards fill one folder together, and
    ``predict.json`` lists every finished case.

    Args:
        dataset: cohort folder (read only).
        work: work folder of ``nnunet train``.
        out: output folder for the masks.
        options: see :class:`PredictOptions`.

    Returns:
        The mask paths of the selected cases.

    Raises:
        InputError: no or missing trained folds, unknown cases, a folder written with
            other settings without ``overwrite``, unreadable CTs, unavailable device.
    """
    cohort = Cohort(dataset)
    cohort.require_exists()
    layout = WorkLayout(work)
    folds = check_folds(layout, options.folds)
    settings = {"mode": "segment", "model": str(layout.model_folder.resolve()), "folds": folds,
                "mirroring": options.mirroring, "input": str(cohort.root.resolve())}
    folder = PredictionFolder(out, settings, overwrite=options.overwrite)
    cases = select_cases(cohort, options.cases, options.shard)
    for case in cases:  # every input is checked before the first mask is written
        check_ct(cohort.image_path(case))
    device = resolve_device(options.device)
    t0 = time.perf_counter()
    with nnunet_environment(layout.work):
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=options.mirroring,
                                    perform_everything_on_device=device.type == "cuda", device=device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(layout.model_folder), use_folds=tuple(folds))
        todo = folder.prepare(cases)
        log.info("nnU-Net: %d case(s), folds %s, mirroring %s, on %s", len(todo), folds,
                 "on" if options.mirroring else "off", device)
        for case in tqdm(todo, desc="nnU-Net prediction", unit="case"):
            t = time.perf_counter()
            ct, geometry = read_array(cohort.image_path(case))
            mask = predict_volume(predictor, ct, geometry)
            with folder.case(case) as (staging, part):
                write_mask(mask, geometry, mask_path(staging, case))
                part.update(slices=int(ct.shape[0]), lesion_voxels=int(mask.sum()),
                            seconds=round(time.perf_counter() - t, 3))
            del ct, mask
    folder.finish({
        "mode": "segment", "model": {"work": str(layout.work), "model_folder": str(layout.model_folder),
                                     "folds": folds, "framework": "nnU-Net v2"},
        "folds": folds, "mirroring": options.mirroring, "device": device.type,
        "dataset": str(cohort.root.absolute()), "cases_option": options.cases,
        "shard": None if options.shard is None else {"index": options.shard[0], "count": options.shard[1]},
        "cases_run": todo, "timing": {"seconds_total": round(time.perf_counter() - t0, 3)},
        "versions": {pkg: importlib.metadata.version(pkg) for pkg in ("nnunetv2", "torch")},
    })
    return [mask_path(folder.out, case) for case in cases]
