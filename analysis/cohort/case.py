"""Reading one cohort case: its CT and lesion label, checked against each other.

Every consumer of a training case reads it here: the Keras slice cache
(:mod:`bonemets_tf.cache`) and the nnU-Net conversion (:mod:`nnunet_bridge.convert`) through
:func:`read_case`, and ``validate`` (:mod:`analysis.cohort.validate`) through
:func:`label_problems`, so a label is accepted or refused by one rule with one message
whichever command reads it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from analysis.cohort.layout import Cohort
from analysis.errors import DataProblems, InputError
from analysis.imaging.io import Geometry, read_array
from analysis.imaging.orientation import Reorientation

__all__ = ["CohortCase", "read_case", "label_problems", "negatives_problems"]

#: At most this many offending label values are named in a message.
SHOWN_VALUES = 8


@dataclass(frozen=True)
class CohortCase:
    """One case's CT and lesion label, checked, both in one view.

    Attributes:
        case: the case id.
        image: the CT in HU, ``(slices, rows, cols)``, C-contiguous, in the file's dtype.
        label: the lesion mask, uint8 0/1, same layout and shape as ``image``.
        geometry: the geometry of both arrays as returned: the canonical view's
            (``reorientation.canonical_geometry``) when read with ``canonical=True``,
            otherwise the stored file's (``reorientation.native``).
        reorientation: the stored order's mapping to the canonical one
            (:mod:`analysis.imaging.orientation`), whichever view the arrays are in.
        canonical: whether the arrays are in the canonical view.
        negatives: the hard-negative map (``negativesTr``), uint8 0/1 in the same view, when
            read with ``negatives=True`` and the case has one; else None.
    """

    case: str
    image: np.ndarray
    label: np.ndarray
    geometry: Geometry
    reorientation: Reorientation
    canonical: bool
    negatives: np.ndarray | None = None


def label_problems(path: str | os.PathLike, label: np.ndarray, label_geometry: Geometry,
                   image_geometry: Geometry) -> list[str]:
    """Every problem of a lesion label against its image, one line each naming ``path``.

    Checks, in this order: the label's geometry matches its image's (tolerances of
    :meth:`analysis.imaging.io.Geometry.mismatch`); its values are only 0 and 1 (a
    multi-label or probability mask is never binarised silently; the first
    :data:`SHOWN_VALUES` other values, ascending, are named).

    Args:
        path: the label file (named in the messages).
        label: its voxels as read, ``(slices, rows, cols)``, any numeric dtype.
        label_geometry: the label file's geometry.
        image_geometry: the geometry of the case's CT file.

    Returns:
        The problems; empty when the label is usable.
    """
    problems = []
    mismatch = image_geometry.mismatch(label_geometry)
    if mismatch:
        problems.append(f"{path}: {mismatch} of its image")
    bad = (label != 0) & (label != 1)
    if bad.any():
        shown = ", ".join(f"{v:g}" for v in np.unique(label[bad])[:SHOWN_VALUES].tolist())
        problems.append(f"{path}: label values {{{shown}}} found; expected only 0 and 1 "
                        f"(a multi-label or probability mask? binarise it first)")
    return problems


def negatives_problems(path: str | os.PathLike, negatives: np.ndarray, negatives_geometry: Geometry,
                       image_geometry: Geometry, label: np.ndarray | None) -> list[str]:
    """Every problem of a hard-negative map (``negativesTr``) against its image and label.

    A hard-negative map marks background that a model called lesion (a reader's rejected
    lesions, :mod:`analysis.cohort.reviews`); training samples crops centred on it and the
    label there is 0. So the map must match its image's geometry, hold only 0 and 1, and
    never mark a lesion voxel: a voxel both lesion and hard negative would tell training two
    things at once, and is refused rather than resolved silently (``import-reviews`` never
    writes one: a reader's lesion wins over a rejected one where they overlap).

    Args:
        path: the map's file (named in the messages).
        negatives: its voxels as read, ``(slices, rows, cols)``.
        negatives_geometry: the map's geometry.
        image_geometry: the case's CT geometry.
        label: the case's lesion label in the same view (None: not checked against it, e.g.
            when the label itself is unreadable).

    Returns:
        The problems; empty when the map is usable.
    """
    problems = []
    mismatch = image_geometry.mismatch(negatives_geometry)
    if mismatch:
        return [f"{path}: {mismatch} of its image"]
    bad = (negatives != 0) & (negatives != 1)
    if bad.any():
        shown = ", ".join(f"{v:g}" for v in np.unique(negatives[bad])[:SHOWN_VALUES].tolist())
        problems.append(f"{path}: values {{{shown}}} found; expected a hard-negative map of only 0 and 1")
    if label is not None and label.shape == negatives.shape:
        both = int(np.count_nonzero((negatives == 1) & (label == 1)))
        if both:
            problems.append(f"{path}: {both} voxel(s) are also lesion in the label; expected hard negatives "
                            f"outside the lesions (remove them from the map or from the label)")
    return problems


def read_case(cohort: Cohort, case_id: str, *, canonical: bool = True, negatives: bool = False) -> CohortCase:
    """Read a case's CT and lesion label, check the label against the CT, and reorient both.

    Both files are read with :func:`analysis.imaging.io.read_array` (3D, scalar, finite
    voxels) and the label is checked by :func:`label_problems`.

    Args:
        cohort: the cohort (read only).
        case_id: the case; its files are ``cohort.image_path(case_id)`` and
            ``cohort.label_path(case_id)``.
        canonical: return the arrays in the canonical view (LPS,
            :class:`~analysis.imaging.orientation.Reorientation`), as every model trains and
            predicts on; False keeps the stored files' order.
        negatives: also read the case's hard-negative map when it has one
            (``negativesTr/<case>.nii.gz``), checked by :func:`negatives_problems`.

    Returns:
        The :class:`CohortCase`; ``label`` (and ``negatives``) uint8 0/1.

    Raises:
        InputError: a file missing or unreadable, 2D/4D, or holding NaN or infinite
            voxels; the CT's direction cannot be reoriented without resampling; one
            problem of :func:`label_problems` or :func:`negatives_problems`.
        DataProblems: several such problems (an
            :class:`~analysis.errors.InputError` listing each).
    """
    image_path, label_path = cohort.image_path(case_id), cohort.label_path(case_id)
    image, geometry = read_array(image_path)
    label, label_geometry = read_array(label_path)
    problems = label_problems(label_path, label, label_geometry, geometry)
    hard = None
    if negatives and not problems and cohort.has_negatives(case_id):
        hard, hard_geometry = read_array(cohort.negatives_path(case_id))
        problems = negatives_problems(cohort.negatives_path(case_id), hard, hard_geometry, geometry, label)
    if len(problems) > 1:
        raise DataProblems(problems)
    if problems:
        raise InputError(problems[0])
    try:
        reorientation = Reorientation.of(geometry)
    except ValueError as exc:
        raise InputError(f"{image_path}: {exc}") from None
    label = label.astype(np.uint8, copy=False)
    hard = None if hard is None else hard.astype(np.uint8, copy=False)
    if canonical:
        image = reorientation.forward(image)
        label = reorientation.forward(label)
        hard = None if hard is None else reorientation.forward(hard)
        geometry = reorientation.canonical_geometry
    return CohortCase(case=case_id, image=np.ascontiguousarray(image), label=np.ascontiguousarray(label),
                      geometry=geometry, reorientation=reorientation, canonical=canonical,
                      negatives=None if hard is None else np.ascontiguousarray(hard))
