"""``followup``: two CTs of one patient compared lesion by lesion.

Steps (definitions in :mod:`analysis.monitoring.matching` and :mod:`analysis.monitoring.registration`):

1. read both CTs (any form ``predict --images`` takes: an image file or a DICOM series folder)
   and their lesion masks (given, or predicted by a model wing through ``predict``), each mask
   checked against its CT's geometry;
2. register the follow-up rigidly to the baseline and check the bone Dice (below
   :data:`~analysis.monitoring.registration.DICE_FLOOR`: refused, nothing written);
3. lesions of each scan on its own grid; the follow-up's lesion ids resampled (nearest
   neighbour) into the baseline grid and its centroids mapped into the baseline frame;
4. matching, groups and statuses; the outputs, written atomically into OUT.

OUT holds ``lesions.csv``, ``summary.csv``, ``status.nii.gz``, ``followup_registered.nii.gz``,
``preview.png`` and ``followup.json`` (see the README's "Follow-up" section); with ``sr`` and a
DICOM baseline also ``followup_seg.dcm`` and ``followup_sr.dcm``
(:mod:`analysis.monitoring.followup_dicom`).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk

from analysis.errors import InputError
from analysis.imaging.dicom import DicomSeries
from analysis.imaging.inputs import InputCase, discover_inputs, read_input
from analysis.imaging.io import (
    Geometry,
    array_to_image,
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    check_output_folder,
    read_array,
    require_finite,
    write_image,
)
from analysis.lesions import (
    DEFAULT_BONE_HU,
    DEFAULT_CHANGE,
    DEFAULT_MIN_CHANGE_ML,
    DEFAULT_MIN_LESION_ML,
    MERGE,
    NEW_LESIONS_FLAG,
    SPLIT,
    SPLIT_MERGE,
    STATUS_CODES,
    STATUSES,
    Group,
    bone_identity,
    describe_counts,
    lesion_table,
    new_lesions_flag,
    status_counts,
    status_rule,
)
from analysis.imaging.hounsfield import require_ct
from analysis.monitoring.matching import DEFAULT_MATCH_MM, ScanLesions, scan_lesions
from analysis.monitoring.preview import STATUS_COLOURS, write_followup_preview
from analysis.monitoring.registration import (
    DICE_FLOOR,
    Registration,
    bone_dice,
    identity,
    register_rigid,
    resample_to,
)
from analysis.monitoring.tracking import PlacedScan, field_of_view, followup_groups, track_lesions
from analysis.prediction.folder import mask_path, model_fields, read_record
from analysis.prediction.runner import sha256_of
from analysis.imaging.records import csv_text, read_csv, versions

log = logging.getLogger(__name__)

__all__ = ["FollowupSettings", "Comparison", "Placement", "place", "compare", "run_followup", "LESIONS_CSV",
           "SUMMARY_CSV", "LESION_COLUMNS", "SUMMARY_COLUMNS", "DEFINITIONS", "read_summary"]

#: The tracked lesions of a follow-up (one row per tracked lesion, :data:`LESION_COLUMNS`) and its
#: patient-level summary (one row, :data:`SUMMARY_COLUMNS`). Not predict's lesions.csv: a row here
#: links lesions of two scans (:data:`analysis.prediction.tables.LESION_COLUMNS` is one scan's).
LESIONS_CSV = "lesions.csv"
SUMMARY_CSV = "summary.csv"
LESION_COLUMNS = ("lesion", "status", "baseline_id", "followup_id", "baseline_ml", "followup_ml", "change_ml",
                  "change_pct", "x_mm", "y_mm", "z_mm", "distance_mm", "bone", "event")
SUMMARY_COLUMNS = ("baseline_lesions", "followup_lesions", *STATUSES, "baseline_ml", "followup_ml", "change_ml",
                   "change_pct", "new_lesions_flag")
OUTPUTS = (LESIONS_CSV, SUMMARY_CSV, "status.nii.gz", "followup_registered.nii.gz", "preview.png",
           "followup.json")



def read_summary(out: str | os.PathLike) -> dict[str, str]:
    """The row of a follow-up's :data:`SUMMARY_CSV` as text (``{column: text}``, :data:`SUMMARY_COLUMNS`).

    Raises:
        InputError: no table, or one whose header is not :data:`SUMMARY_COLUMNS` or without one row.
    """
    path = Path(out) / SUMMARY_CSV
    if not path.is_file():
        raise InputError(f"{path}: not found; expected a followup output folder")
    rows = read_csv(path)
    if len(rows) != 1 or tuple(rows[0]) != SUMMARY_COLUMNS:
        raise InputError(f"{path}: expected one row of the columns {','.join(SUMMARY_COLUMNS)}")
    return rows[0]

@dataclass(frozen=True)
class FollowupSettings:
    """The comparison's thresholds (the command's options).

    Attributes:
        match_mm: centroids of otherwise unmatched lesions within this many mm match.
        change: relative volume change for grown / shrunk.
        min_change_ml: smallest absolute volume change (ml) for grown / shrunk.
        min_lesion_ml: a lesion on one scan only is new or resolved from this volume (ml) up, else
            indeterminate and not counted toward the new-lesion flag
            (:data:`analysis.lesions.change.DEFAULT_MIN_LESION_ML`).
        register: register the follow-up (False: the scans are already aligned).
        bone_hu: CT >= this is bone (registration and its Dice check).
        dice_floor: smallest bone Dice after registration that is accepted.
    """

    match_mm: float = DEFAULT_MATCH_MM
    change: float = DEFAULT_CHANGE
    min_change_ml: float = DEFAULT_MIN_CHANGE_ML
    min_lesion_ml: float = DEFAULT_MIN_LESION_ML
    register: bool = True
    bone_hu: float = DEFAULT_BONE_HU
    dice_floor: float = DICE_FLOOR

    def check(self) -> None:
        """Raise :class:`InputError` (naming the option) for an out-of-range value."""
        if not self.match_mm >= 0:
            raise InputError(f"--match-mm {self.match_mm}: expected a distance >= 0 mm")
        if not 0 < self.change < 1:
            raise InputError(f"--change {self.change}: expected a fraction between 0 and 1 (0.2 = 20 %)")
        if not self.min_change_ml >= 0:
            raise InputError(f"--min-change-ml {self.min_change_ml}: expected a volume >= 0 ml")
        if not self.min_lesion_ml >= 0:
            raise InputError(f"--min-lesion-ml {self.min_lesion_ml}: expected a volume >= 0 ml")


def definitions(settings: FollowupSettings) -> dict[str, str]:
    """The definitions every output's record carries, with the thresholds filled in."""
    s = settings
    return {
        "lesion": "3D connected component (26-connectivity) of a scan's mask; ids as in that scan's lesions.csv",
        "volume": "voxels x voxel volume of the scan's own grid (never a resampled mask), ml",
        "registration": "rigid, 6 degrees of freedom, follow-up onto baseline in physical space (SimpleITK: Mattes "
                        "mutual information on bone, 3-level pyramid, initialised by the centres of the bone voxels); "
                        f"accepted when the Dice of the bone masks (CT >= {s.bone_hu:g} HU) after registration is "
                        f">= {s.dice_floor:g}",
        "matching": "in the baseline frame: lesions sharing a voxel match; lesions left without any match in both "
                    f"scans match when their centroids are within {s.match_mm:g} mm (nearest first, one to one); "
                    "linked lesions form one tracked lesion (a split: one baseline lesion, several follow-up "
                    "lesions; a merge: the reverse)",
        "status": status_rule(s.change, s.min_change_ml, s.min_lesion_ml),
        "status_codes": ", ".join(f"{code} {name}" for name, code in STATUS_CODES.items()) + " (status.nii.gz)",
        "new_lesions_flag": f"1 when at least {NEW_LESIONS_FLAG} new lesions (indeterminate ones do not count): the "
                            "lesion-count rule prostate-cancer "
                            "trials apply to bone scans (PCWG3, Scher et al., J Clin Oncol 2016), stated as such; "
                            "not a diagnosis, and PCWG3 also asks for confirmation on a later scan",
        "centroid": "x_mm, y_mm, z_mm: the tracked lesion's volume-weighted centroid in the baseline's patient "
                    "coordinates (LPS mm; the registered follow-up lesions' for a new lesion); distance_mm: between "
                    "the baseline and the registered follow-up centroids",
    }


DEFINITIONS = definitions(FollowupSettings())


@dataclass
class Scan:
    """One time point: its CT (SimpleITK image and array), mask, optional bones and record."""

    image: sitk.Image
    ct: np.ndarray
    geometry: Geometry
    mask: np.ndarray
    bones: np.ndarray | None
    record: dict[str, Any]


@dataclass
class Comparison:
    """Everything ``followup`` writes, computed (no file touched yet)."""

    registration: Registration
    bone_dice: float
    baseline: ScanLesions
    followup: ScanLesions
    groups: list[Group]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    registered_ct: np.ndarray
    panels: list[tuple[np.ndarray, np.ndarray]]
    status: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def lesion_numbers(self) -> np.ndarray:
        """The tracked lesion (``lesion`` of lesions.csv) of each baseline voxel, 0 elsewhere,
        ``(slices, rows, cols)``: a baseline lesion's voxels, then the registered follow-up's (as
        ``status``)."""
        (_, baseline), (_, followup) = self.panels
        return np.where(baseline > 0, baseline, followup)


def one_case(path: str | os.PathLike, *, what: str, series: str | None = None) -> InputCase:
    """The one CT at ``path`` in any form ``predict --images`` takes (headers only).

    Raises:
        InputError: not an image file or a folder holding exactly one usable CT series.
    """
    cases = discover_inputs(path, all_series=False, series_uid=series)
    if len(cases) != 1:
        raise InputError(f"{path}: holds {len(cases)} cases ({', '.join(c.case_id for c in cases)}); expected one "
                         f"{what} CT (an image file or one DICOM series folder)")
    return cases[0]


def check_same_patient(baseline: InputCase, followup: InputCase) -> None:
    """Refuse two DICOM series whose PatientIDs are both given and differ (image files carry none)."""
    a = baseline.series.patient_id if baseline.series is not None else ""
    b = followup.series.patient_id if followup.series is not None else ""
    if a and b and a != b:
        raise InputError(f"{followup.path}: PatientID {b!r} differs from the baseline's {a!r} "
                         f"({baseline.path}); expected two CTs of the same patient")


def _read_map(path: str | os.PathLike, geometry: Geometry, ct_path: str, what: str) -> np.ndarray:
    array, g = read_array(path)
    problem = geometry.mismatch(g)
    if problem:
        raise InputError(f"{path}: {what} {problem} of its CT {ct_path}; expected the CT's geometry")
    return array


def lesion_bones(lesions: ScanLesions, bones: np.ndarray | None) -> list[str] | None:
    if bones is None:
        return None
    table = lesion_table(lesions.labels, lesions.n, spacing_mm=(1.0, 1.0, 1.0))
    names, _ = bone_identity(lesions.labels, table, bones)
    return names


def _weighted(centroids: np.ndarray, volumes: np.ndarray, ids: tuple[int, ...]) -> np.ndarray:
    idx = np.asarray(ids) - 1
    w = volumes[idx]
    return (centroids[idx] * w[:, None]).sum(axis=0) / max(float(w.sum()), 1e-12)


def _rows(groups: list[Group], base: ScanLesions, fu: ScanLesions, fu_centroids: np.ndarray,
          base_bones: list[str] | None, fu_bones: list[str] | None) -> list[dict[str, Any]]:
    rows = []
    for k, g in enumerate(groups, start=1):
        cb = _weighted(base.centroid_mm, base.volume_ml, g.baseline) if g.baseline else None
        cf = _weighted(fu_centroids, fu.volume_ml, g.followup) if g.followup else None
        where = cb if cb is not None else cf
        if g.baseline and base_bones is not None:
            bone = base_bones[max(g.baseline, key=lambda i: base.volume_ml[i - 1]) - 1]
        elif g.followup and fu_bones is not None:
            bone = fu_bones[max(g.followup, key=lambda j: fu.volume_ml[j - 1]) - 1]
        else:
            bone = None
        change = g.followup_ml - g.baseline_ml
        rows.append({
            "lesion": k, "status": g.status, "baseline_id": ";".join(map(str, g.baseline)),
            "followup_id": ";".join(map(str, g.followup)), "baseline_ml": g.baseline_ml,
            "followup_ml": g.followup_ml, "change_ml": change,
            "change_pct": 100.0 * change / g.baseline_ml if g.baseline_ml > 0 else None,
            "x_mm": float(where[0]), "y_mm": float(where[1]), "z_mm": float(where[2]),
            "distance_mm": float(np.linalg.norm(cb - cf)) if cb is not None and cf is not None else None,
            "bone": bone, "event": g.event})
    return rows


def _summary(groups: list[Group], base: ScanLesions, fu: ScanLesions) -> dict[str, Any]:
    counts = status_counts([g.status for g in groups])
    bml, fml = float(base.volume_ml.sum()), float(fu.volume_ml.sum())
    return {"baseline_lesions": base.n, "followup_lesions": fu.n, **counts, "baseline_ml": bml, "followup_ml": fml,
            "change_ml": fml - bml, "change_pct": 100.0 * (fml - bml) / bml if bml > 0 else (0.0 if fml == 0 else None),
            "new_lesions_flag": new_lesions_flag(counts)}


@dataclass
class Placement:
    """A scan registered to a reference scan and its lesions placed in the reference's frame.

    Attributes:
        registration: reference mm -> scan mm (checked by the bone Dice).
        bone_dice: the Dice of the bone masks after registration, where the scan covers the reference.
        registered_ct: the scan's CT resampled onto the reference grid, ``(slices, rows, cols)`` HU.
        lesions: the scan's lesions on its own grid.
        moved: the scan's lesion ids resampled (nearest neighbour) onto the reference grid.
        centroids: the scan's lesion centroids mapped into the reference frame, ``(n, 3)`` LPS mm.
    """

    registration: Registration
    bone_dice: float
    registered_ct: np.ndarray
    lesions: ScanLesions
    moved: np.ndarray
    centroids: np.ndarray


def place(reference: Scan, scan: Scan, settings: FollowupSettings, *, where: str,
          against: str = "the baseline") -> Placement:
    """Register ``scan`` rigidly to ``reference`` (refused below the bone Dice floor) and place its lesions
    in the reference's frame: ``followup``'s step, and ``timeline``'s for every scan against the first.

    Raises:
        InputError: the bone Dice after registration is below the floor (not with ``settings.register``
            False), naming ``where`` and ``against``.
    """
    reg = register_rigid(reference.image, scan.image, bone_hu=settings.bone_hu) if settings.register else identity()
    registered_ct = sitk.GetArrayFromImage(resample_to(scan.image, reference.image, reg.transform))
    ones = sitk.Image(scan.image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(scan.image)
    covered = resample_to(ones, reference.image, reg.transform, labels=True)
    footprint = sitk.GetArrayViewFromImage(covered) > 0  # a view: `covered` must outlive it
    del ones
    dice = bone_dice(reference.ct, registered_ct, footprint, bone_hu=settings.bone_hu)
    del footprint, covered
    log.info("%s: bone Dice %.3f after registration to %s", where, dice, against)
    if settings.register and dice < settings.dice_floor:
        raise InputError(f"{where}: could not be aligned with {against} (bone Dice {dice:.2f} after rigid "
                         f"registration, below {settings.dice_floor:g}); expected a CT of the same patient and body "
                         f"region (--no-registration for scans already aligned)")
    lesions = scan_lesions(scan.mask, scan.geometry)
    image = array_to_image(lesions.labels.astype(np.uint32), scan.geometry)
    moved = sitk.GetArrayFromImage(resample_to(image, reference.image, reg.transform, labels=True))
    centroids = reg.to_baseline(lesions.centroid_mm) if lesions.n else np.zeros((0, 3))
    return Placement(reg, dice, registered_ct, lesions, moved, centroids)


def compare(baseline: Scan, followup: Scan, settings: FollowupSettings, *, where: str = "follow-up") -> Comparison:
    """Register, match and grade two scans (nothing is written): the two-scan case of ``timeline``'s
    tracks (:func:`analysis.monitoring.tracking.track_lesions`, its groups at t1).

    Raises:
        InputError: the bone Dice after registration is below the floor (not with
            ``settings.register`` False).
    """
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    p = place(baseline, followup, settings, where=where)
    reg, dice, registered_ct, moved, fu_centroids, fu = (p.registration, p.bone_dice, p.registered_ct, p.moved,
                                                         p.centroids, p.lesions)
    seconds["registration"] = reg.seconds
    base = scan_lesions(baseline.mask, baseline.geometry)
    sees = field_of_view(baseline.geometry, followup.geometry, reg.to_followup)
    tracking = track_lesions([PlacedScan(base.labels, base.centroid_mm, base.volume_ml),
                              PlacedScan(moved, fu_centroids, fu.volume_ml, sees)], match_mm=settings.match_mm,
                             change=settings.change, min_change_ml=settings.min_change_ml,
                             min_lesion_ml=settings.min_lesion_ml)
    groups = followup_groups(tracking, base.volume_ml)
    base_bones = lesion_bones(base, baseline.bones)
    fu_bones = lesion_bones(fu, followup.bones)
    rows = _rows(groups, base, fu, fu_centroids, base_bones, fu_bones)
    # per-voxel status and lesion number on the baseline grid: baseline lesions and registered follow-up lesions
    lut_b = np.zeros(base.n + 1, np.uint8)
    lut_f = np.zeros(fu.n + 1, np.uint8)
    num_b = np.zeros(base.n + 1, np.uint16)
    num_f = np.zeros(fu.n + 1, np.uint16)
    for k, g in enumerate(groups, start=1):
        code = STATUS_CODES[g.status]
        lut_b[list(g.baseline)] = code
        num_b[list(g.baseline)] = k
        lut_f[list(g.followup)] = code
        num_f[list(g.followup)] = k
    codes_b, codes_f = lut_b[base.labels], lut_f[moved]
    status = np.where(codes_b > 0, codes_b, codes_f).astype(np.uint8)
    seconds["resampling_and_matching"] = time.perf_counter() - t0 - reg.seconds
    return Comparison(registration=reg, bone_dice=dice, baseline=base, followup=fu, groups=groups, rows=rows,
                      summary=_summary(groups, base, fu), registered_ct=registered_ct,
                      panels=[(codes_b, num_b[base.labels]), (codes_f, num_f[moved])], status=status, seconds=seconds)


def load_scan(case: InputCase, mask: str, bones: str | None, *, what: str, ct_check: bool = True) -> Scan:
    path = str(case.path)
    image, record = read_input(case)
    if case.series is not None:
        record["patient_id"] = case.series.patient_id
    ct = sitk.GetArrayFromImage(image)
    require_finite(case.path, ct, where=case.describe())  # predict's check: a float NIfTI's NaN too
    require_ct(ct, case.describe(), check=ct_check)  # and its "is it CT?"
    geometry = Geometry.of(image)
    m = _read_map(mask, geometry, path, f"{what} mask")
    b = _read_map(bones, geometry, path, f"{what} bone map") if bones else None
    # the same input hash as predict's record (a series: its own files in slice order, not the folder)
    mask_file = InputCase(case_id="mask", kind="image", path=Path(mask))
    record = {**record, "sha256": sha256_of(case), "mask": str(mask), "mask_sha256": sha256_of(mask_file),
              "bones": bones, "geometry": geometry.to_json()}
    return Scan(image=image, ct=ct, geometry=geometry, mask=m, bones=b, record=record)


#: A model wing's prediction of one CT: ``predict(images=PATH, out=FOLDER)`` fills the PRED
#: folder FOLDER (masks ``<case>.nii.gz`` and ``predict.json``) through the wing's ``predict``.
Predictor = Callable[[str, Path], Any]


def run_followup(baseline: str, followup: str, out: str | os.PathLike, *, baseline_mask: str | None = None,
                 followup_mask: str | None = None, predictor: Predictor | None = None, model: str | None = None,
                 baseline_bones: str | None = None, followup_bones: str | None = None,
                 settings: FollowupSettings = FollowupSettings(), series: str | None = None,
                 overwrite: bool = False, sr: bool = False, ct_check: bool = True) -> Path:
    """Compare two CTs of one patient and write OUT (see the module docstring).

    Args:
        baseline, followup: the two CTs (image file or DICOM series folder).
        out: the folder to write (refused if it exists, unless ``overwrite``).
        baseline_mask, followup_mask: lesion masks with their CT's geometry (mask mode).
        predictor: instead of masks, a model wing's ``predict`` (:data:`Predictor`); each CT is
            predicted into a temporary PRED folder and its mask read from there.
        model: what the predictor runs (for the record).
        baseline_bones, followup_bones: bone maps (project codes) with their CT's geometry.
        settings: thresholds and registration.
        series: DICOM: the SeriesInstanceUID to use in a folder holding several.
        overwrite: replace an existing OUT.
        sr: also write the DICOM SEG and TID 1500 report on the baseline series
            (:mod:`analysis.monitoring.followup_dicom`); the baseline must be a DICOM series.
        ct_check: refuse a CT that does not look like CT in HU
            (:func:`analysis.imaging.hounsfield.require_ct`; a predictor checks its own input).

    Returns:
        OUT.

    Raises:
        InputError: bad inputs (one line naming the file), OUT existing, the scans not aligned,
            ``sr`` with a baseline that is not a DICOM series.
    """
    start = time.perf_counter()
    settings.check()
    out = Path(out)
    check_output_folder(out, overwrite=overwrite, allow_empty=False)
    if (predictor is None) == (baseline_mask is None or followup_mask is None):
        raise InputError("followup: give --model or --nnunet-work, or both --baseline-mask and --followup-mask")
    cases = (one_case(baseline, what="baseline", series=series), one_case(followup, what="follow-up", series=series))
    check_same_patient(*cases)
    if sr and cases[0].series is None:
        raise InputError(f"--sr: {baseline} is not a DICOM series; a DICOM SR and SEG reference the baseline's "
                         f"DICOM images (give the baseline as a DICOM series folder)")
    model_record = None
    with tempfile.TemporaryDirectory(prefix=".followup-predict-", dir=out.resolve().parent
                                     if out.resolve().parent.is_dir() else None) as tmp:
        if predictor is not None:
            (baseline_mask, followup_mask), model_record = _predict_masks(predictor, cases, Path(tmp))
        t_read = time.perf_counter()
        base = load_scan(cases[0], baseline_mask, baseline_bones, what="baseline", ct_check=ct_check)
        fu = load_scan(cases[1], followup_mask, followup_bones, what="follow-up", ct_check=ct_check)
        reading = time.perf_counter() - t_read
        if predictor is not None:
            base.record["mask"] = fu.record["mask"] = "predicted"
        comparison = compare(base, fu, settings, where=str(followup))
        comparison.seconds = {"prediction": t_read - start if predictor is not None else 0.0, "reading": reading,
                              **comparison.seconds}
    t0 = time.perf_counter()
    with atomic_directory(out, overwrite=True) as tmp_out:
        _write(tmp_out, comparison, base, fu, settings, model=model, model_record=model_record,
               seconds_so_far=time.perf_counter() - start, t0=t0, dicom=cases[0].series if sr else None)
    log.info("followup: wrote %s", out)
    return out


def _predict_masks(predictor: Predictor, cases: tuple[InputCase, InputCase],
                   tmp: Path) -> tuple[tuple[str, str], dict[str, Any]]:
    """Each CT predicted by the wing into its own temporary PRED folder: the two masks and the
    prediction records' model fields."""
    masks = []
    records = {}
    for what, case in zip(("baseline", "followup"), cases):
        folder = tmp / what
        predictor(str(case.path), folder)
        found = mask_path(folder, case.case_id)
        if not found.is_file():
            raise InputError(f"{case.path}: the model wrote no mask for case {case.case_id}")
        masks.append(str(found))
        records[what] = model_fields(read_record(folder))
    return (masks[0], masks[1]), records


def _write(tmp: Path, c: Comparison, base: Scan, fu: Scan, settings: FollowupSettings, *, model: str | None,
           model_record: dict[str, Any] | None, seconds_so_far: float, t0: float,
           dicom: DicomSeries | None = None) -> None:
    g = base.geometry
    atomic_write_text(tmp / LESIONS_CSV, csv_text(LESION_COLUMNS, c.rows))
    atomic_write_text(tmp / SUMMARY_CSV, csv_text(SUMMARY_COLUMNS, [c.summary]))
    write_image(array_to_image(c.status, g), tmp / "status.nii.gz")
    registered = np.clip(np.rint(c.registered_ct), -32768, 32767).astype(np.int16)
    write_image(array_to_image(registered, g), tmp / "followup_registered.nii.gz")
    s = c.summary
    title = f"follow-up: {s['baseline_lesions']} -> {s['followup_lesions']} lesions; {describe_counts(s)}"
    write_followup_preview(tmp / "preview.png", base.ct, registered, g, c.panels, title=title)
    outputs = list(OUTPUTS)
    dicom_record = None
    if dicom is not None:
        from analysis.monitoring.followup_dicom import write_followup_dicom

        fu_dicom = fu.record.get("dicom") or {}
        fu_id = fu_dicom.get("series_uid") or f"sha256:{fu.record['sha256'][:32]}"
        dicom_record = write_followup_dicom(tmp, dicom, c.lesion_numbers, rows=c.rows, summary=c.summary,
                                            followup_sha256=fu.record["sha256"], followup_id=fu_id)
        outputs += [r["path"] for r in (dicom_record["seg"], dicom_record["sr"]) if r["written"]]
    seconds = {**{k: round(v, 3) for k, v in c.seconds.items()}, "writing": round(time.perf_counter() - t0, 3)}
    seconds["total"] = round(seconds_so_far + seconds["writing"], 3)
    record = {
        "command": "followup",
        "inputs": {"baseline": base.record, "followup": fu.record},
        "registration": {**c.registration.to_json(), "bone_dice": round(c.bone_dice, 6),
                         "bone_hu": settings.bone_hu, "dice_floor": settings.dice_floor},
        "settings": asdict(settings),
        "definitions": definitions(settings),
        "status_colours": {k: list(v) for k, v in STATUS_COLOURS.items()},
        "model": None if model is None else {"model": model, "predict": model_record},
        "summary": c.summary,
        "groups": [{"lesion": r["lesion"], "event": r["event"], "baseline_id": r["baseline_id"],
                    "followup_id": r["followup_id"]} for r in c.rows],
        "splits": [r["lesion"] for r in c.rows if r["event"] in (SPLIT, SPLIT_MERGE)],
        "merges": [r["lesion"] for r in c.rows if r["event"] in (MERGE, SPLIT_MERGE)],
        "outputs": outputs,
        "dicom": dicom_record,
        "versions": versions(core=True),
        "seconds": seconds,
    }
    atomic_write_json(tmp / "followup.json", record)
