"""Strict checks of a cohort: everything later steps rely on.

Each problem is one line naming the file and saying what was expected and what was
found. Checks run case by case, so memory does not grow with the cohort.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from analysis.cohort.case import label_problems, negatives_problems
from analysis.cohort.layout import (FILE_ENDING, IMAGE_SUFFIX, MAX_BONE_CODE, Cohort, dataset_json_problems,
                                    splits_problems)
from analysis.errors import InputError
from analysis.imaging.hounsfield import require_ct
from analysis.imaging.io import read_array, read_json



@dataclass
class CaseSummary:
    """One row of the validation summary."""

    case: str
    slices: int
    rows: int
    cols: int
    spacing: tuple[float, float, float]
    lesion_voxels: int
    has_bones: bool
    negative_voxels: int | None = None


@dataclass
class ValidationReport:
    """Result of :func:`validate_dataset`."""

    root: str
    cases: list[CaseSummary] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        """A plain-text summary table (one row per case, then totals)."""
        head = (f"{'case':<20} {'slices':>6} {'rows':>5} {'cols':>5} {'spacing x,y,z (mm)':>22} "
                f"{'lesion voxels':>13} {'bones':>5} {'hard negatives':>14}")
        lines = [head, "-" * len(head)]
        for c in self.cases:
            sp = ",".join(f"{s:.3g}" for s in c.spacing)
            negatives = "-" if c.negative_voxels is None else str(c.negative_voxels)
            lines.append(f"{c.case:<20} {c.slices:>6} {c.rows:>5} {c.cols:>5} {sp:>22} {c.lesion_voxels:>13} "
                         f"{'yes' if c.has_bones else 'no':>5} {negatives:>14}")
        n_les = sum(1 for c in self.cases if c.lesion_voxels > 0)
        lines.append("-" * len(head))
        lines.append(f"{len(self.cases)} cases, {sum(c.slices for c in self.cases)} slices, "
                     f"{sum(c.lesion_voxels for c in self.cases)} lesion voxels, {n_les} cases with lesions")
        return "\n".join(lines)


def validate_dataset(dataset: str | os.PathLike, *, ct_check: bool = True) -> ValidationReport:
    """Check a cohort folder in the project's layout.

    Checks: dataset.json fields; every image has a label and vice versa; images are 3D
    and scalar with finite HU and look like CT in HU (:func:`analysis.imaging.hounsfield.require_ct`,
    unless ``ct_check`` is False: ``--no-ct-check``); labels share their image's geometry and hold only 0/1
    (:func:`analysis.cohort.case.label_problems`, the rule every reader of a case applies;
    here each case's problems are all listed and checking goes on); bone maps
    (optional) share the geometry and hold codes 0..7; hard-negative maps (optional,
    ``negativesTr``) share the geometry, hold only 0/1 and mark no lesion voxel
    (:func:`analysis.cohort.case.negatives_problems`); splits.json (optional) names only
    known cases, with disjoint folds free of test cases.

    Args:
        dataset: the cohort folder.
        ct_check: refuse images that do not look like CT in HU (an MR, a CT without its rescale).

    Returns:
        A :class:`ValidationReport`; ``problems`` is empty when the cohort is usable.

    Raises:
        InputError: the folder does not exist.
    """
    cohort = Cohort(dataset)
    if not cohort.root.is_dir():
        raise InputError(f"{cohort.root}: dataset folder not found")
    report = ValidationReport(root=str(cohort.root))
    p = report.problems

    if cohort.dataset_json_path.exists():
        try:
            data = read_json(cohort.dataset_json_path, what="dataset.json")
            p.extend(f"{cohort.dataset_json_path}: {msg}" for msg in dataset_json_problems(data))
        except InputError as exc:
            p.append(str(exc))
            data = None
    else:
        p.append(f"{cohort.dataset_json_path}: missing; expected the cohort's dataset.json")
        data = None

    if not cohort.images_dir.is_dir():
        p.append(f"{cohort.images_dir}: missing; expected CT images as imagesTr/<case>{IMAGE_SUFFIX}")
    if not cohort.labels_dir.is_dir():
        p.append(f"{cohort.labels_dir}: missing; expected lesion masks as labelsTr/<case>{FILE_ENDING}")
    _check_stray_files(cohort, p)

    images, labels = set(cohort.image_cases()), set(cohort.label_cases())
    for case in sorted(images - labels):
        p.append(f"{cohort.image_path(case)}: image without a label; expected {cohort.label_path(case)}")
    for case in sorted(labels - images):
        p.append(f"{cohort.label_path(case)}: label without an image; expected {cohort.image_path(case)}")
    for folder, what in ((cohort.bones_dir, "bone map"), (cohort.negatives_dir, "hard-negative map")):
        if folder.is_dir():
            for f in sorted(folder.iterdir()):
                if f.name.endswith(FILE_ENDING) and f.name[: -len(FILE_ENDING)] not in images:
                    p.append(f"{f}: {what} without an image")

    cases = sorted(images & labels)
    if not cases and cohort.images_dir.is_dir():
        p.append(f"{cohort.root}: no case has both an image and a label")
    for case in cases:
        summary = _check_case(cohort, case, p, ct_check)
        if summary is not None:
            report.cases.append(summary)

    # count every case id seen, so that an unpaired image or label is reported once (above), not twice
    n_ids = len(images | labels)
    if isinstance(data, dict) and isinstance(data.get("numTraining"), int) and data["numTraining"] != n_ids and cases:
        p.append(f"{cohort.dataset_json_path}: numTraining is {data['numTraining']} but {n_ids} cases are present")

    if cohort.splits_path.exists():
        try:
            splits = read_json(cohort.splits_path, what="splits.json")
            p.extend(f"{cohort.splits_path}: {msg}" for msg in splits_problems(splits, cases))
        except InputError as exc:
            p.append(str(exc))
    return report


def _check_stray_files(cohort: Cohort, problems: list[str]) -> None:
    if cohort.images_dir.is_dir():
        for f in sorted(cohort.images_dir.iterdir()):
            if f.name.startswith("."):
                continue
            if not f.name.endswith(IMAGE_SUFFIX):
                problems.append(f"{f}: unexpected file name; expected <case>{IMAGE_SUFFIX}")
    if cohort.labels_dir.is_dir():
        for f in sorted(cohort.labels_dir.iterdir()):
            if f.name.startswith("."):
                continue
            if not f.name.endswith(FILE_ENDING) or f.name.endswith(IMAGE_SUFFIX):
                problems.append(f"{f}: unexpected file name; expected <case>{FILE_ENDING}")


def _check_case(cohort: Cohort, case: str, problems: list[str], ct_check: bool) -> CaseSummary | None:
    img_path, lab_path = cohort.image_path(case), cohort.label_path(case)
    try:
        ct, geom = read_array(img_path)
    except InputError as exc:
        problems.append(str(exc))
        return None
    try:
        require_ct(ct, img_path, check=ct_check)
    except InputError as exc:
        problems.append(str(exc))
    del ct

    lesion_voxels = 0
    try:
        label, lgeom = read_array(lab_path)
    except InputError as exc:
        problems.append(str(exc))
        label = None
    if label is not None:
        problems.extend(label_problems(lab_path, label, lgeom, geom))
        lesion_voxels = int(np.count_nonzero(label == 1))
    negative_voxels = _check_negatives(cohort, case, geom, label, problems)
    del label

    has_bones = cohort.has_bones(case)
    if has_bones:
        bp = cohort.bones_path(case)
        try:
            bones, bgeom = read_array(bp)
            mismatch = geom.mismatch(bgeom)
            if mismatch:
                problems.append(f"{bp}: {mismatch} of its image")
            bad = np.unique(bones[(bones < 0) | (bones > MAX_BONE_CODE) | (bones != np.round(bones))])
            if bad.size:
                problems.append(f"{bp}: bone codes {bad[:8].tolist()} out of range; "
                                f"expected integers 0..{MAX_BONE_CODE}")
        except InputError as exc:
            problems.append(str(exc))
    return CaseSummary(case=case, slices=geom.size[2], rows=geom.size[1], cols=geom.size[0],
                       spacing=geom.spacing, lesion_voxels=lesion_voxels, has_bones=has_bones,
                       negative_voxels=negative_voxels)


def _check_negatives(cohort: Cohort, case: str, geom, label: np.ndarray | None, problems: list[str]) -> int | None:
    """The case's hard-negative voxels (None without a map), its problems appended to ``problems``."""
    if not cohort.has_negatives(case):
        return None
    path = cohort.negatives_path(case)
    try:
        negatives, ngeom = read_array(path)
    except InputError as exc:
        problems.append(str(exc))
        return None
    problems.extend(negatives_problems(path, negatives, ngeom, geom, label))
    return int(np.count_nonzero(negatives == 1))
