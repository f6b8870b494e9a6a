"""The ``analyze`` command: masks and slice probabilities in, the paper's analyses out.

Inputs:

* a cohort ``DATASET`` (:mod:`analysis.cohort.layout`; ``bonesTr`` optional);
* ``PRED/<model>/<case>.nii.gz``: binary masks with their CT's geometry (a segmenter);
* ``PRED/<model>/slices.csv`` with columns ``case,slice,probability`` (a detector;
  ``slice`` is the axial index, axis 0 of the ``(slices, rows, cols)`` array).
  A folder may be both.
* optionally ``PRED/<model>/probabilities/<case>.nii.gz``: voxel probabilities in [0, 1]
  with the CT's geometry (float, or integers with a NIfTI ``scl_slope`` such as 1/255),
  for the FROC analysis; a model with any such file needs one for every analysed case.
  Subfolders of a model folder (``probabilities/``, ``dicom_seg/``) are never models or cases.

Every input is checked before anything is written: presence, geometry against the CT
(headers), ``slices.csv``, and the voxel values of every mask (one extra decode per mask,
one at a time). Output is then built inside :func:`analysis.imaging.io.atomic_directory`, so even
an unexpected failure leaves no ``OUT``. Cases are read one at a time, so memory does not
grow with the number of cases.

Definitions live with the metrics: :mod:`analysis.evaluation.metrics.overlap`,
:mod:`analysis.lesions`, :mod:`analysis.evaluation.metrics.clinical`,
:mod:`analysis.evaluation.metrics.detection`, :mod:`analysis.evaluation.metrics.lesionwise`,
:mod:`analysis.evaluation.metrics.froc`, :mod:`analysis.evaluation.bootstrap`, :mod:`analysis.evaluation.stats`,
:mod:`analysis.evaluation.radiomics`.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from analysis.cohort.layout import Cohort
from analysis.errors import InputError
from analysis.evaluation.bootstrap import Interval, case_weights, ratio_interval, resample_indices, statistic_interval
from analysis.evaluation.metrics import clinical as clin
from analysis.evaluation.metrics.detection import roc_auc, slice_detection
from analysis.evaluation.metrics.froc import (DEFAULT_FROC_FLOOR, FROC_RATES, FrocCase, froc_case, froc_curve,
                                              froc_summary)
from analysis.evaluation.metrics.lesionwise import (SIZE_BINS, LesionCounts, case_lesion_counts, lesionwise_metrics,
                                                    size_bin_counts)
from analysis.evaluation.metrics.overlap import case_overlap, slice_overlap
from analysis.evaluation.settings import MODEL_COLUMNS, differences, model_rows
from analysis.imaging.hounsfield import require_ct
from analysis.evaluation.stats import holm, paired_ttest
from analysis.imaging.io import (Geometry, atomic_directory, atomic_write_json, check_output_folder, read_array,
                                 read_header)
from analysis.lesions import (DEFAULT_BONE_HU, LOCATION_CATEGORIES, bone_identity, count_neighbours, diffuse_fractions,
                              lesion_instances, lesion_table, match_lesions, overlap_pairs)
from analysis.prediction.folder import (PROBABILITIES, RECORD, SLICES_CSV, check_ct, discover_models, mask_path,
                                       read_record, read_slices_csv)
from analysis.prediction.probabilities import read_probability
from analysis.imaging.records import csv_text, versions
from analysis.resources import ANALYZE_BYTES_PER_VOXEL, require_memory, voxels

log = logging.getLogger(__name__)

__all__ = ["AnalysisConfig", "run_analysis", "discover_models", "discover_probability_models", "read_slices_csv",
           "CSV_COLUMNS"]

#: Output files and their columns (other tools read these: do not rename).
CSV_COLUMNS: dict[str, tuple[str, ...]] = {
    "segmentation_cases.csv": ("model", "case", "dice", "precision", "recall", "gt_voxels", "pred_voxels"),
    "segmentation_slices.csv": ("model", "case", "slice", "dice", "precision", "recall"),
    "segmentation_summary.csv": ("model", "n_slices", "dice_mean", "dice_sd", "precision_mean", "recall_mean"),
    "ttests.csv": ("model_a", "model_b", "n", "mean_diff", "sd_diff", "t", "dof", "p_val", "p_holm"),
    "lesions.csv": ("source", "case", "lesion_id", "z_first", "z_last", "voxels", "volume_ml", "n_neighbours",
                    "diffuse", "bone", "weight_bearing", "matched_gt_id", "diffuse_fraction"),
    "clinical.csv": ("model", "task", "category", "tp", "fp", "fn", "tn", "sensitivity", "specificity"),
    "detection.csv": ("model", "threshold", "accuracy", "precision", "recall", "f1", "auc", "n_slices"),
    "radiomics_features.csv": ("model", "case", "gt_lesion_id", "feature", "gt_value", "pred_value"),
    "radiomics_icc.csv": ("model", "feature_class", "n_pairs", "n_features", "icc", "icc_low", "icc_high",
                          "n_constant", "n_skipped_pairs"),
    "lesionwise.csv": ("model", "n_cases", "n_gt", "n_pred", "tp", "fn", "fp", "sensitivity", "precision", "f1",
                       "fp_per_case", "rq", "sq_dice", "pq_dice", "lw_dice"),
    "lesion_sizes.csv": ("model", "size_bin", "n_gt", "detected", "sensitivity"),
    "froc.csv": ("model", "threshold", "fp_per_case", "sensitivity"),
    "froc_summary.csv": ("model", *(f"sens_at_{r:g}" for r in FROC_RATES), "cpm"),
    "bootstrap.csv": ("model", "metric", "estimate", "ci_low", "ci_high", "n_boot"),
    "model_flags.csv": ("model", "task", "learned", "flag", "reason", "compared"),
    "models.csv": MODEL_COLUMNS,
    "detection_thresholds.csv": ("model", "source", "threshold", "precision", "recall", "f1", "positive_calls",
                                 "n_slices"),
}

#: Clinical tasks in report order: (task, category).
CLINICAL_TASKS: tuple[tuple[str, str], ...] = (
    ("detection", "lesion"), ("detection", "slice"), ("diffuse", "diffuse"),
    ("weight_bearing", "weight_bearing"), ("clustering", "clustered"),
    *(("location", c) for c in LOCATION_CATEGORIES),
)


@dataclass(frozen=True)
class AnalysisConfig:
    """Settings of one analysis, written to ``config.json`` next to the results.

    Attributes:
        cases: ``test``, ``all`` or ``ID,ID,...`` (see :meth:`analysis.cohort.layout.Cohort.select`).
        radiomics: run the pyradiomics agreement analysis.
        jobs: processes for radiomics.
        connectivity: 3D connectivity of lesions (6, 18 or 26).
        cluster_slices: largest slice gap between neighbouring lesions.
        diffuse_fraction: a lesion is diffuse when its largest per-slice bone-region fraction is >= this.
        threshold: a detector's slice is positive when its probability is >= this.
        bone_hu: without ``bonesTr``, CT voxels >= this many HU are bone (diffuse/focal rule only).
        froc_floor: FROC candidates are components of voxel probability >= this, in (0, 1].
        bootstrap: patient-level bootstrap replicates for ``bootstrap.csv`` (0: none).
        seed: seed of the bootstrap's ``numpy.random.default_rng``.
        ct_check: refuse a cohort image that does not look like CT in HU
            (:func:`analysis.imaging.hounsfield.require_ct`; ``--no-ct-check`` turns it off).
    """

    cases: str = "test"
    radiomics: bool = True
    jobs: int = 1
    connectivity: int = 26
    cluster_slices: int = 10
    diffuse_fraction: float = 0.6
    threshold: float = 0.5
    bone_hu: float = DEFAULT_BONE_HU
    froc_floor: float = DEFAULT_FROC_FLOOR
    bootstrap: int = 1000
    seed: int = 0
    ct_check: bool = True

    def check(self) -> None:
        """Raise :class:`InputError` for out-of-range settings."""
        if self.connectivity not in (6, 18, 26):
            raise InputError(f"--connectivity: expected 6, 18 or 26, got {self.connectivity}")
        if self.jobs < 1:
            raise InputError(f"--jobs: expected >= 1, got {self.jobs}")
        if self.cluster_slices < 0:
            raise InputError(f"--cluster-slices: expected >= 0, got {self.cluster_slices}")
        if not 0 < self.diffuse_fraction <= 1:
            raise InputError(f"--diffuse-fraction: expected a value in (0, 1], got {self.diffuse_fraction}")
        if not 0 <= self.threshold <= 1:
            raise InputError(f"--threshold: expected a value in [0, 1], got {self.threshold}")
        if not math.isfinite(self.bone_hu):
            raise InputError(f"bone_hu: expected a finite HU value, got {self.bone_hu}")
        if not 0 < self.froc_floor <= 1:
            raise InputError(f"--froc-floor: expected a value in (0, 1], got {self.froc_floor}")
        if self.bootstrap < 0:
            raise InputError(f"--bootstrap: expected >= 0 replicates, got {self.bootstrap}")
        if self.seed < 0:
            raise InputError(f"--seed: expected an integer >= 0, got {self.seed}")


# --- input discovery and validation ---------------------------------------------------


def discover_probability_models(predictions: Path, models: Sequence[str]) -> list[str]:
    """Models whose folder holds voxel probability maps, ``PRED/<model>/probabilities/*.nii.gz``.

    Args:
        predictions: ``PRED``.
        models: the model folders found by :func:`discover_models`.

    Returns:
        Those models, sorted, with at least one non-hidden ``*.nii.gz`` in ``probabilities/``.
    """
    found = []
    for model in sorted(set(models)):
        folder = predictions / model / PROBABILITIES
        if folder.is_dir() and any(f.name.endswith(".nii.gz") and not f.name.startswith(".") for f in folder.iterdir()):
            found.append(model)
    return found


@dataclass
class _Inputs:
    cohort: Cohort
    cases: list[str]
    segmenters: list[str]
    detectors: list[str]
    geometry: dict[str, Geometry]
    probabilities: dict[str, dict[str, np.ndarray]]
    predictions: Path
    froc_models: list[str] = field(default_factory=list)

    def probability_path(self, model: str, case: str) -> Path:
        return self.predictions / model / PROBABILITIES / f"{case}.nii.gz"


def _validate(dataset: Path, predictions: Path, config: AnalysisConfig) -> _Inputs:
    cohort = Cohort(dataset)
    cohort.require_exists()
    cases = cohort.select(config.cases)
    segmenters, detectors = discover_models(predictions)
    froc_models = discover_probability_models(predictions, segmenters + detectors)
    geometry: dict[str, Geometry] = {}
    for case in cases:
        image = cohort.image_path(case)
        geo = check_ct(image)  # whatever the flags: a CT holding NaN is refused (ITK would read NaN as 0)
        if config.ct_check:  # decodes the image once more: an MR or a CT without its rescale is no cohort CT
            require_ct(read_array(image)[0], image)
        geometry[case] = geo
        for path in (cohort.label_path(case), cohort.bones_path(case) if cohort.has_bones(case) else None):
            if path is None:
                continue
            problem = geo.mismatch(read_header(path))
            if problem:
                raise InputError(f"{path}: {problem} of its image {image.name}")
        for model in segmenters:
            path = mask_path(predictions / model, case)
            if not path.is_file():
                raise InputError(f"{path}: missing prediction of model {model} for case {case}")
            problem = geo.mismatch(read_header(path))
            if problem:
                raise InputError(f"{path}: {problem} of its CT {image}")
        for model in froc_models:
            path = predictions / model / PROBABILITIES / f"{case}.nii.gz"
            if not path.is_file():
                raise InputError(f"{path}: missing probability map of model {model} for case {case}; "
                                 f"a model with {PROBABILITIES}/ needs one for every analysed case")
            problem = geo.mismatch(read_header(path))
            if problem:
                raise InputError(f"{path}: {problem} of its CT {image}")
    n_slices = {case: geometry[case].shape[0] for case in cases}
    probabilities = {m: read_slices_csv(predictions / m / SLICES_CSV, n_slices, cohort.cases()) for m in detectors}
    inputs = _Inputs(cohort, cases, segmenters, detectors, geometry, probabilities, predictions, froc_models)
    biggest = max(cases, key=lambda c: voxels(geometry[c].shape))
    require_memory(ANALYZE_BYTES_PER_VOXEL * voxels(geometry[biggest].shape),
                   f"{cohort.image_path(biggest)}: analysing {geometry[biggest].shape} voxels (slices, rows, cols)",
                   hint="run on a machine with more memory")
    _check_masks(inputs)
    return inputs


def _read_binary(path: Path) -> np.ndarray:
    """Read a mask ``(slices, rows, cols)`` as bool, refusing values other than 0 and 1."""
    array, _ = read_array(path)
    if array.dtype != bool:
        bad = (array != 0) & (array != 1)
        if bad.any():
            found = np.unique(array[bad])[:5]
            raise InputError(f"{path}: not a binary mask; expected values 0 and 1, found "
                             f"{', '.join(f'{v:g}' for v in found)} (a multi-label or probability mask? "
                             f"binarise it first)")
    return array != 0


def _radiological(figure: dict[str, Any]) -> dict[str, Any]:
    """The qualitative figure's slices in radiological display (anterior up, the patient's right
    on the viewer's left; :func:`analysis.prediction.preview.radiological_axial`) whatever the storage
    order, with the spacing of the displayed rows and cols. A volume not stored axially keeps
    its stored view."""
    from analysis.imaging.orientation import Reorientation
    from analysis.prediction.preview import radiological_axial

    geometry = figure.pop("geometry")
    try:
        show = lambda a: np.ascontiguousarray(radiological_axial(a, geometry))  # noqa: E731
        out = {**figure, "gt": show(figure["gt"]), "ct": show(figure["ct"]),
               "pred": {m: show(p) for m, p in figure["pred"].items()}}
    except ValueError:
        return figure
    out["spacing"] = Reorientation.of(geometry).canonical_geometry.spacing
    return out


def _read_slice(path: Path, z: int) -> np.ndarray:
    """Axial slice ``z`` of a validated image as ``(rows, cols)``, without decoding the rest into memory."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size = reader.GetSize()
    reader.SetExtractIndex([0, 0, int(z)])
    reader.SetExtractSize([size[0], size[1], 1])
    try:
        return sitk.GetArrayFromImage(reader.Execute())[0]
    except RuntimeError as exc:
        raise InputError(f"{path}: pixel data cannot be decoded ({str(exc).strip().splitlines()[-1][:200]})") from None


def _check_masks(inputs: _Inputs) -> None:
    """Decode every label, prediction and probability map once and check its values (before any output)."""
    for case in inputs.cases:
        _read_binary(inputs.cohort.label_path(case))
        for model in inputs.segmenters:
            _read_binary(inputs.predictions / model / f"{case}.nii.gz")
        for model in inputs.froc_models:
            read_probability(inputs.probability_path(model, case))


# --- per-case analysis ------------------------------------------------------------------


@dataclass
class _LesionSet:
    """One mask's lesions with their attributes (index ``id - 1``)."""

    labels: np.ndarray
    n: int
    table: Any
    neighbours: np.ndarray
    fraction: np.ndarray
    diffuse: np.ndarray
    bone: list[str]
    weight_bearing: np.ndarray


def _lesion_set(mask: np.ndarray, bone_px: np.ndarray, bones: np.ndarray | None, geo: Geometry,
                config: AnalysisConfig) -> _LesionSet:
    labels, n = lesion_instances(mask, config.connectivity)
    table = lesion_table(labels, n, spacing_mm=geo.spacing)
    fraction = diffuse_fractions(labels, n, bone_px)
    names, wb = bone_identity(labels, table, bones)
    return _LesionSet(labels, n, table, count_neighbours(table.z_first, table.z_last, config.cluster_slices),
                      fraction, fraction >= config.diffuse_fraction, names, wb)


def _lesion_rows(source: str, case: str, s: _LesionSet, matched: np.ndarray | None) -> list[tuple]:
    rows = []
    for i in range(s.n):
        rows.append((source, case, i + 1, int(s.table.z_first[i]), int(s.table.z_last[i]), int(s.table.voxels[i]),
                     float(s.table.volume_ml[i]), int(s.neighbours[i]), bool(s.diffuse[i]), s.bone[i],
                     bool(s.weight_bearing[i]), (int(matched[i]) or None) if matched is not None else None,
                     float(s.fraction[i])))
    return rows


def _clinical_counts(gt: _LesionSet, pred: _LesionSet, gt_match: np.ndarray, pred_match: np.ndarray,
                     gt_slices: np.ndarray, pred_slices: np.ndarray) -> dict[tuple[str, str], clin.Counts]:
    hit = gt_match > 0
    out = {
        ("detection", "lesion"): clin.Counts(tp=int(hit.sum()), fn=int((~hit).sum()),
                                             fp=int((pred_match == 0).sum()), tn=None),
        ("detection", "slice"): clin.binary_counts(gt_slices, pred_slices),
    }

    def answer(values: Sequence | np.ndarray, negative: object = False) -> np.ndarray:
        return clin.anchored_answers(np.asarray(values, dtype=object), gt_match, negative)

    out[("diffuse", "diffuse")] = clin.binary_counts(gt.diffuse, answer(pred.diffuse).astype(bool))
    out[("weight_bearing", "weight_bearing")] = clin.binary_counts(gt.weight_bearing, answer(pred.weight_bearing).astype(bool))
    out[("clustering", "clustered")] = clin.binary_counts(gt.neighbours >= 1, answer(pred.neighbours >= 1).astype(bool))
    pred_bone = answer(pred.bone, negative="")
    for cat in LOCATION_CATEGORIES:
        out[("location", cat)] = clin.binary_counts(np.array([b == cat for b in gt.bone], bool),
                                                    np.array([b == cat for b in pred_bone], bool))
    return out


@dataclass
class _Results:
    seg_cases: list[tuple] = field(default_factory=list)
    seg_slices: list[tuple] = field(default_factory=list)
    lesions: list[tuple] = field(default_factory=list)
    clinical: dict[str, dict[tuple[str, str], clin.Counts]] = field(default_factory=dict)
    slice_truth: dict[str, np.ndarray] = field(default_factory=dict)
    roi_tasks: list = field(default_factory=list)
    pairs: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)
    figure: dict[str, Any] | None = None
    bone_source: dict[str, str] = field(default_factory=dict)
    #: per model, per case: lesion-level sufficient statistics (small counts only)
    lesion_counts: dict[str, dict[str, LesionCounts]] = field(default_factory=dict)
    #: per model: ``(len(SIZE_BINS), 2)`` GT lesions and found GT lesions per size bin
    size_counts: dict[str, np.ndarray] = field(default_factory=dict)
    #: per model, in case order: FROC candidates' scores and what they touch
    froc: dict[str, list[FrocCase]] = field(default_factory=dict)


def _analyse_case(case: str, inputs: _Inputs, config: AnalysisConfig, res: _Results) -> None:
    cohort = inputs.cohort
    geo = inputs.geometry[case]
    gt = _read_binary(cohort.label_path(case))
    bones = None
    if cohort.has_bones(case):
        bones, _ = read_array(cohort.bones_path(case))
        bones = bones.astype(np.int16, copy=False)
    need_ct = config.radiomics or bones is None
    ct = read_array(cohort.image_path(case))[0] if need_ct else None
    if bones is not None:
        bone_px = bones > 0
        res.bone_source[case] = "bonesTr"
    else:
        bone_px = ct >= config.bone_hu
        res.bone_source[case] = f"CT >= {config.bone_hu:g} HU"
    gt_set = _lesion_set(gt, bone_px, bones, geo, config)
    res.lesions += _lesion_rows("gt", case, gt_set, None)
    gt_slices = gt.any(axis=(1, 2))
    res.slice_truth[case] = gt_slices
    area = gt.sum(axis=(1, 2))
    best_z = int(np.argmax(area))
    take_figure = area[best_z] > 0 and (res.figure is None or area[best_z] > res.figure["area"])
    if take_figure:
        res.figure = {"case": case, "slice": best_z, "area": int(area[best_z]), "gt": gt[best_z].copy(),
                      "ct": None if ct is None else ct[best_z].copy(), "pred": {}, "spacing": geo.spacing,
                      "geometry": geo}
    gt_for_radiomics: set[int] = set()
    for model in inputs.segmenters:
        pred = _read_binary(inputs.predictions / model / f"{case}.nii.gz")
        res.seg_cases.append((model, case, *case_overlap(pred, gt).values()))
        zs, d, p, r = slice_overlap(pred, gt)
        res.seg_slices += [(model, case, int(z), float(a), float(b), float(c)) for z, a, b, c in zip(zs, d, p, r)]
        pred_set = _lesion_set(pred, bone_px, bones, geo, config)
        gt_match, _, pred_match = match_lesions(gt_set.labels, gt_set.n, pred_set.labels, pred_set.n)
        res.lesions += _lesion_rows(model, case, pred_set, pred_match)
        _lesion_level(model, case, gt_set, pred_set, res)
        counts = _clinical_counts(gt_set, pred_set, gt_match, pred_match, gt_slices, pred.any(axis=(1, 2)))
        total = res.clinical.setdefault(model, {})
        for key, c in counts.items():
            if key in total:
                total[key] += c
            else:
                total[key] = c
        if take_figure:
            res.figure["pred"][model] = pred[best_z].copy()
        if config.radiomics:
            from analysis.evaluation.radiomics import RoiTask, crop_roi

            spacing = tuple(float(s) for s in geo.spacing)
            for gi in np.flatnonzero(gt_match):
                pid = int(gt_match[gi])
                res.pairs.setdefault(model, []).append((case, int(gi) + 1, pid))
                gt_for_radiomics.add(int(gi) + 1)
                c_ct, c_mask = crop_roi(ct, pred_set.labels, pred_set.table.boxes[pid - 1], pid)
                res.roi_tasks.append(RoiTask((model, case, pid), c_ct, c_mask, spacing))
        del pred, pred_set
    for model in inputs.froc_models:
        probs = read_probability(inputs.probability_path(model, case))
        res.froc.setdefault(model, []).append(froc_case(probs, gt_set.labels, gt_set.n, floor=config.froc_floor,
                                                        connectivity=config.connectivity))
        del probs
    if config.radiomics:
        from analysis.evaluation.radiomics import RoiTask, crop_roi

        spacing = tuple(float(s) for s in geo.spacing)
        for gid in sorted(gt_for_radiomics):
            c_ct, c_mask = crop_roi(ct, gt_set.labels, gt_set.table.boxes[gid - 1], gid)
            res.roi_tasks.append(RoiTask(("gt", case, gid), c_ct, c_mask, spacing))


def _lesion_level(model: str, case: str, gt: _LesionSet, pred: _LesionSet, res: _Results) -> None:
    """Add one (GT, prediction) pair's lesion-level counts to ``res`` (labels reused, nothing kept but counts)."""
    counts, found = case_lesion_counts(gt.labels, gt.n, pred.labels, pred.n, gt_voxels=gt.table.voxels,
                                       pred_voxels=pred.table.voxels, gt_boxes=gt.table.boxes,
                                       pairs=overlap_pairs(gt.labels, pred.labels))
    res.lesion_counts.setdefault(model, {})[case] = counts
    bins = size_bin_counts(gt.table.volume_ml, found)
    res.size_counts[model] = res.size_counts[model] + bins if model in res.size_counts else bins


# --- summaries ----------------------------------------------------------------------------


def _summary_rows(seg_slices: list[tuple], segmenters: list[str]) -> tuple[list[tuple], dict[str, np.ndarray]]:
    rows, dice = [], {}
    for model in segmenters:
        vals = np.array([r[3:6] for r in seg_slices if r[0] == model], np.float64).reshape(-1, 3)
        dice[model] = vals[:, 0]
        n = len(vals)
        rows.append((model, n, float(vals[:, 0].mean()) if n else math.nan,
                     float(vals[:, 0].std(ddof=1)) if n > 1 else math.nan,
                     float(vals[:, 1].mean()) if n else math.nan, float(vals[:, 2].mean()) if n else math.nan))
    return rows, dice


def training_records(predictions: Path, models: Sequence[str]) -> dict[str, dict[str, Any] | None]:
    """The ``"training"`` record of each model's ``PRED/<model>/predict.json`` (None: absent).

    The predict commands copy it from the model's own records (``bonemets_tf.run.training_status``
    for Keras RUNs: ``learned``, ``reason``, ``best_val``, ``empty_level``, ``guard_events``;
    ``nnunet_bridge.train.training_status`` for nnU-Net: ``learned``, ``reason``,
    ``iterations``, ``validation_dice``, ``plans``, ``width``, ``batch_size``, ``samples``).

    Raises:
        InputError: a ``predict.json`` that is not JSON, or whose ``"training"`` is not an object.
    """
    out: dict[str, dict[str, Any] | None] = {}
    for model in models:
        path = predictions / model / RECORD
        record = read_record(predictions / model, missing_ok=True)
        training = record.get("training") if isinstance(record, dict) else None
        if training is not None and not isinstance(training, dict):
            raise InputError(f"{path}: 'training' must be an object (the model's training status)")
        out[model] = training
    return out


def calibrated_detector_thresholds(predictions: Path, detectors: Sequence[str]) -> dict[str, float]:
    """Each detector's validation-calibrated threshold: ``calibration.json`` (``task`` ``"detect"``)
    of the RUN that ``PRED/<model>/predict.json`` names under ``model.run``; detectors without
    one (older RUNs, SavedModels, a moved RUN) are left out."""
    import json

    out: dict[str, float] = {}
    for model in detectors:
        try:
            run = read_record(predictions / model)["model"]["run"]
            record = json.loads((Path(run) / "calibration.json").read_text(encoding="utf-8"))
        except (InputError, OSError, ValueError, KeyError, TypeError):
            continue
        t = record.get("threshold") if isinstance(record, dict) and record.get("task") == "detect" else None
        if isinstance(t, (int, float)) and not isinstance(t, bool) and 0.0 <= t <= 1.0:
            out[model] = float(t)
    return out


def _threshold_rows(inputs: _Inputs, res: _Results, threshold: float) -> list[tuple]:
    """Precision, recall, F1 of every detector at the analysis threshold and at its calibrated one."""
    calibrated = calibrated_detector_thresholds(inputs.predictions, inputs.detectors)
    rows = []
    for model in inputs.detectors:
        truth = np.concatenate([res.slice_truth[c] for c in inputs.cases])
        probs = np.concatenate([inputs.probabilities[model][c] for c in inputs.cases])
        for source, t in (("fixed", threshold), ("calibrated", calibrated.get(model))):
            if t is None:
                continue
            m = slice_detection(truth, probs, t)
            rows.append((model, source, t, m["precision"], m["recall"], m["f1"], int((probs >= t).sum()), m["n_slices"]))
    return rows


def model_flag(training: dict[str, Any] | None) -> str:
    """The report's flag for a model's training record: "not trained (N iterations[; validation Dice
    D])" for an nnU-Net model that did not learn (an unfinished fold, or validation Dice at the
    empty level: :func:`nnunet_bridge.train.training_status`), "did not learn" for a Keras model
    whose validation never rose above its empty-prediction level, "" otherwise (absent record:
    unknown, no flag)."""
    if not training or training.get("learned") is not False:
        return ""
    if "iterations" in training:
        dice = training.get("validation_dice")
        detail = f"; validation Dice {float(dice):.3f}" if isinstance(dice, (int, float)) else ""
        return f"not trained ({int(training.get('iterations') or 0)} iterations{detail})"
    return "did not learn"


def excluded_from_comparisons(training: dict[str, dict[str, Any] | None]) -> list[str]:
    """Models left out of the t-tests and the radiomics agreement: not-trained nnU-Net models."""
    return sorted(m for m, t in training.items() if model_flag(t).startswith("not trained"))


def _flag_rows(inputs: _Inputs, res: _Results, config: AnalysisConfig,
               training: dict[str, dict[str, Any] | None]) -> list[tuple]:
    """One row per model: training flag, or a detector's calls all one class at the threshold."""
    excluded = set(excluded_from_comparisons(training))
    rows = []
    for model in inputs.segmenters + inputs.detectors:
        t = training.get(model)
        flag, reason = model_flag(t), (t or {}).get("reason", "") if t else "no training record in predict.json"
        if model in inputs.detectors:
            probs = np.concatenate([inputs.probabilities[model][c] for c in inputs.cases])
            calls = probs >= config.threshold
            if calls.size and (calls.all() or not calls.any()):
                one = f"all {calls.size} slice calls {'positive' if calls.all() else 'negative'} at {config.threshold:g}"
                flag = f"{flag}; {one}" if flag else one
        learned = None if not t else t.get("learned")
        rows.append((model, "segment" if model in inputs.segmenters else "detect", learned, flag, reason,
                     model not in excluded))
    return rows


def _ttest_rows(dice: dict[str, np.ndarray]) -> list[tuple]:
    tests = [(a, b, paired_ttest(dice[a], dice[b])) for a, b in itertools.combinations(sorted(dice), 2)]
    adjusted = holm([t["p_val"] for _, _, t in tests])
    return [(a, b, t["n"], t["mean_diff"], t["sd_diff"], t["t"], t["dof"], t["p_val"], float(ph))
            for (a, b, t), ph in zip(tests, adjusted)]


def _clinical_rows(clinical: dict[str, dict[tuple[str, str], clin.Counts]]) -> list[tuple]:
    rows = []
    for model in sorted(clinical):
        for key in CLINICAL_TASKS:
            c = clinical[model][key]
            rows.append((model, key[0], key[1], c.tp, c.fp, c.fn, c.tn, c.sensitivity, c.specificity))
    return rows


def _detection_rows(inputs: _Inputs, res: _Results, threshold: float) -> list[tuple]:
    rows = []
    for model in inputs.detectors:
        truth = np.concatenate([res.slice_truth[c] for c in inputs.cases])
        probs = np.concatenate([inputs.probabilities[model][c] for c in inputs.cases])
        m = slice_detection(truth, probs, threshold)
        rows.append((model, threshold, m["accuracy"], m["precision"], m["recall"], m["f1"], m["auc"], m["n_slices"]))
    return rows


def _lesionwise_rows(inputs: _Inputs, res: _Results) -> list[tuple]:
    rows = []
    for model in inputs.segmenters:
        c = sum((res.lesion_counts[model][case] for case in inputs.cases), LesionCounts())
        m = lesionwise_metrics(c)
        rows.append((model, c.n_cases, c.n_gt, c.n_pred, c.tp, c.fn, c.fp, m["sensitivity"], m["precision"], m["f1"],
                     m["fp_per_case"], m["rq"], m["sq_dice"], m["pq_dice"], m["lw_dice"]))
    return rows


def _size_rows(inputs: _Inputs, res: _Results) -> list[tuple]:
    rows = []
    for model in inputs.segmenters:
        counts = res.size_counts.get(model, np.zeros((len(SIZE_BINS), 2), np.int64))
        for (name, _, _), (n, found) in zip(SIZE_BINS, counts):
            rows.append((model, name, int(n), int(found), found / n if n else math.nan))
    return rows


def _froc_rows(inputs: _Inputs, res: _Results) -> tuple[list[tuple], list[tuple]]:
    curve_rows, summary_rows = [], []
    for model in inputs.froc_models:
        curve = froc_curve(res.froc[model])
        curve_rows += [(model, float(t), float(f), float(s))
                       for t, f, s in zip(curve.thresholds, curve.fp_per_case, curve.sensitivity)]
        sens, cpm = froc_summary(curve)
        summary_rows.append((model, *sens, cpm))
    return curve_rows, summary_rows


#: Bootstrapped metrics in ``bootstrap.csv`` order.
BOOTSTRAP_SEGMENTER_METRICS = ("slice_dice", "case_dice", "lesion_sensitivity", "lw_dice")


def _bootstrap_rows(inputs: _Inputs, res: _Results, config: AnalysisConfig) -> list[tuple]:
    """Patient-level percentile intervals (:mod:`analysis.evaluation.bootstrap`) from per-case statistics."""
    if config.bootstrap == 0:
        return []
    cases = inputs.cases
    index = {c: i for i, c in enumerate(cases)}
    draws = resample_indices(len(cases), config.bootstrap, config.seed)
    weights = case_weights(draws, len(cases))
    rows = []
    for model in inputs.segmenters:
        slice_sum, slice_n = np.zeros(len(cases)), np.zeros(len(cases))
        for r in res.seg_slices:
            if r[0] == model:
                slice_sum[index[r[1]]] += r[3]
                slice_n[index[r[1]]] += 1
        case_dice = np.zeros(len(cases))
        for r in res.seg_cases:
            if r[0] == model:
                case_dice[index[r[1]]] = r[2]
        scored = np.isfinite(case_dice)
        counts = [res.lesion_counts[model][c] for c in cases]
        found = np.array([c.tp for c in counts], np.float64)
        n_gt = np.array([c.n_gt for c in counts], np.float64)
        intervals: dict[str, Interval] = {
            "slice_dice": ratio_interval(slice_sum, slice_n, weights),
            "case_dice": ratio_interval(np.where(scored, case_dice, 0.0), scored, weights),
            "lesion_sensitivity": ratio_interval(found, n_gt, weights),
            "lw_dice": ratio_interval(np.array([c.lw_dice_sum for c in counts]),
                                      n_gt + np.array([c.lw_fp for c in counts]), weights, empty=1.0),
        }
        rows += [(model, k, intervals[k].estimate, intervals[k].low, intervals[k].high, intervals[k].n_boot)
                 for k in BOOTSTRAP_SEGMENTER_METRICS]
    for model in inputs.detectors:
        truth = [res.slice_truth[c] for c in cases]
        probs = [inputs.probabilities[model][c] for c in cases]

        def auc(idx: np.ndarray) -> float:
            return roc_auc(np.concatenate([truth[i] for i in idx]), np.concatenate([probs[i] for i in idx]))

        iv = statistic_interval(auc, draws)
        rows.append((model, "slice_auc", iv.estimate, iv.low, iv.high, iv.n_boot))
    return rows


def _radiomics_rows(res: _Results, segmenters: Sequence[str], jobs: int) -> tuple[list[tuple], list[tuple]]:
    from analysis.evaluation.radiomics import extract_all, icc_by_class

    wanted = {"gt", *segmenters}  # ROIs of models left out of the agreement are not extracted
    features = extract_all([t for t in res.roi_tasks if t.key[0] in wanted], jobs=jobs)
    res.roi_tasks = []
    feature_rows, icc_rows = [], []
    for model in segmenters:
        pairs, skipped = [], 0
        for case, gid, pid in res.pairs.get(model, []):
            g, p = features.get(("gt", case, gid)), features.get((model, case, pid))
            if g is None or p is None:
                skipped += 1
                continue
            pairs.append((g, p))
            feature_rows += [(model, case, gid, name, g[name], p[name]) for name in sorted(set(g) & set(p))]
        if skipped:
            log.info("radiomics: %s: %d pair(s) too small for pyradiomics, skipped", model, skipped)
        _, per_class = icc_by_class(pairs)
        icc_rows += [(model, c["feature_class"], len(pairs), c["n_features"], c["icc"], c["icc_low"], c["icc_high"],
                      c["n_constant"], skipped) for c in per_class]
    feature_rows.sort(key=lambda r: r[:4])
    return feature_rows, icc_rows


# --- writing ------------------------------------------------------------------------------


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write rows as CSV in the project's one format (:func:`analysis.imaging.records.csv_text`)."""
    path.write_text(csv_text(columns, rows), encoding="utf-8")
    return path


def _is_synthetic(cohort: Cohort) -> bool:
    """Whether the cohort says it is a synthetic phantom (dataset.json mentions phantom/synthetic)."""
    try:
        text = cohort.dataset_json_path.read_text(encoding="utf-8").lower()
    except OSError:
        return False
    return "phantom" in text or "synthetic" in text


def run_analysis(dataset: str | os.PathLike, predictions: str | os.PathLike, out: str | os.PathLike, *,
                 cases: str = "test", radiomics: bool = True, jobs: int = 1, connectivity: int = 26,
                 cluster_slices: int = 10, diffuse_fraction: float = 0.6, threshold: float = 0.5,
                 bone_hu: float = DEFAULT_BONE_HU, froc_floor: float = DEFAULT_FROC_FLOOR, bootstrap: int = 1000,
                 seed: int = 0, overwrite: bool = False, synthetic: bool | None = None, ct_check: bool = True) -> Path:
    """Run every analysis of the paper on one set of predictions and write ``OUT``.

    Args:
        dataset: cohort folder.
        predictions: ``PRED`` with one folder per model.
        out: output folder (created atomically).
        cases, radiomics, jobs, connectivity, cluster_slices, diffuse_fraction, threshold,
            bone_hu, froc_floor, bootstrap, seed, ct_check: see :class:`AnalysisConfig`.
        overwrite: replace an existing non-empty ``out``.
        synthetic: the cohort is a phantom, so the report and every figure say it is not
            patient data; None decides from ``dataset.json`` (a ``name`` or ``description``
            mentioning "phantom" or "synthetic").

    Returns:
        The output folder, holding the CSVs of :data:`CSV_COLUMNS`, ``report.md``,
        ``figures/*.png`` and ``config.json``.

    Raises:
        InputError: any bad input (one line naming the file); nothing is written then.
    """
    config = AnalysisConfig(cases=cases, radiomics=radiomics, jobs=jobs, connectivity=connectivity,
                            cluster_slices=cluster_slices, diffuse_fraction=diffuse_fraction,
                            threshold=threshold, bone_hu=bone_hu, froc_floor=froc_floor, bootstrap=bootstrap,
                            seed=seed, ct_check=ct_check)
    config.check()
    dataset, predictions, out = Path(dataset), Path(predictions), Path(out)
    check_output_folder(out, overwrite=overwrite)
    inputs = _validate(dataset, predictions, config)
    log.info("analyze: %d case(s), segmenters %s, detectors %s", len(inputs.cases),
             ", ".join(inputs.segmenters) or "none", ", ".join(inputs.detectors) or "none")
    res = _Results()
    is_synthetic = _is_synthetic(inputs.cohort) if synthetic is None else bool(synthetic)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for i, case in enumerate(inputs.cases, 1):
            log.info("analyze: case %s (%d/%d)", case, i, len(inputs.cases))
            _analyse_case(case, inputs, config, res)
        tables = _write_tables(tmp, inputs, config, res)
        if res.figure is not None and res.figure["ct"] is None:
            res.figure["ct"] = _read_slice(inputs.cohort.image_path(res.figure["case"]), res.figure["slice"])
        if res.figure is not None:
            res.figure = _radiological(res.figure)
        from analysis.evaluation.report import write_report

        write_report(tmp, tables, figure=res.figure, synthetic=is_synthetic,
                     settings=dataclasses.asdict(config), bone_source=res.bone_source)
        atomic_write_json(tmp / "config.json", {
            "settings": dataclasses.asdict(config),
            "radiomics_settings": _radiomics_settings() if config.radiomics else None,
            "dataset": str(dataset.resolve()), "predictions": str(predictions.resolve()),
            "cases": inputs.cases, "split_seed": (inputs.cohort.splits() or {}).get("seed"),
            "segmenters": inputs.segmenters, "detectors": inputs.detectors, "froc_models": inputs.froc_models,
            "not_compared": [r[0] for r in tables["model_flags.csv"] if not r[5]],
            "bone_source": res.bone_source, "synthetic": is_synthetic,
            "versions": versions(core=True),
        })
    log.info("analyze: wrote %s", out)
    return out


def _radiomics_settings() -> dict[str, Any]:
    from analysis.evaluation.radiomics import EXTRACTOR_SETTINGS, FEATURE_CLASSES

    return {**EXTRACTOR_SETTINGS, "image_types": ["Original"], "feature_classes": list(FEATURE_CLASSES)}


def _write_tables(tmp: Path, inputs: _Inputs, config: AnalysisConfig, res: _Results) -> dict[str, list[tuple]]:
    summary, dice = _summary_rows(res.seg_slices, inputs.segmenters)
    training = training_records(inputs.predictions, inputs.segmenters + inputs.detectors)
    excluded = excluded_from_comparisons(training)
    if excluded:
        log.info("analyze: %s left out of the t-tests and radiomics agreement (not trained)", ", ".join(excluded))
    compared = [m for m in inputs.segmenters if m not in excluded]
    dice = {m: v for m, v in dice.items() if m in compared}
    tables: dict[str, list[tuple]] = {
        "segmentation_cases.csv": sorted(res.seg_cases, key=lambda r: r[:2]),
        "segmentation_slices.csv": sorted(res.seg_slices, key=lambda r: r[:3]),
        "segmentation_summary.csv": summary,
        "ttests.csv": _ttest_rows(dice),
        "lesions.csv": sorted(res.lesions, key=lambda r: (r[0] != "gt", r[0], r[1], r[2])),
        "clinical.csv": _clinical_rows(res.clinical),
        "detection.csv": _detection_rows(inputs, res, config.threshold),
        "lesionwise.csv": _lesionwise_rows(inputs, res),
        "lesion_sizes.csv": _size_rows(inputs, res),
        "bootstrap.csv": _bootstrap_rows(inputs, res, config),
        "model_flags.csv": _flag_rows(inputs, res, config, training),
        "models.csv": model_rows(inputs.predictions, inputs.segmenters + inputs.detectors,
                                 {**dict.fromkeys(inputs.segmenters, "segment"), **dict.fromkeys(inputs.detectors, "detect")}),
        "detection_thresholds.csv": _threshold_rows(inputs, res, config.threshold),
    }
    for line in differences(tables["models.csv"], compared):
        log.warning("analyze: compared segmenters were not run alike: %s", line)
    tables["froc.csv"], tables["froc_summary.csv"] = _froc_rows(inputs, res)
    if config.radiomics:
        tables["radiomics_features.csv"], tables["radiomics_icc.csv"] = _radiomics_rows(res, compared, config.jobs)
    else:
        tables["radiomics_features.csv"], tables["radiomics_icc.csv"] = [], []
    for name, rows in tables.items():
        write_csv(tmp / name, CSV_COLUMNS[name], rows)
    return tables
