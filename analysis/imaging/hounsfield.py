"""The Hounsfield scale: what CT values mean, and whether a volume looks like CT at all.

Image files carry no modality: an MR, a PET or a CT stored without its DICOM rescale reads
as numbers like any CT. Everything downstream (the HU window inside every Keras model,
nnU-Net's CT normalisation, bone thresholds, the body mask) assumes Hounsfield units, so a
volume that is not CT in HU gives confident nonsense (an MR: 385 "lesions", 495 ml, exit 0).
:func:`ct_problem` says what is wrong with such a volume, in one line.

The scale (Hounsfield 1973; the ranges of the HU scale figures of CT textbooks, e.g. Kalender,
*Computed Tomography*, 3rd ed., 2011): water 0 HU and air -1000 HU by definition; aerated lung
parenchyma about -900 to -500 HU; fat -100 to -50; soft tissue +20 to +80; bone +150 (aged
trabecular) to +1000 (cortical) and above; a 12-bit CT stores -1024 to +3071 HU, extended
scales reach further for metal.
"""
from __future__ import annotations

import math
import os

import numpy as np

from analysis.errors import InputError

__all__ = ["AIR_HU", "AIR_OR_LUNG_HU", "CT_MAX_HU", "MIN_AIR_FRACTION", "MIN_BODY_FRACTION", "MAX_ABOVE_FRACTION",
           "ct_problem", "SAMPLE_VOXELS",
           "CT_CHECK_OPTION", "require_ct"]

#: Air, by the scale's definition.
AIR_HU = -1000.0
#: Air or aerated lung lies below this: the top of lung parenchyma's about -900..-500 HU. A
#: lesion whose median is below it is in air or lung, where no bone metastasis can be (the
#: QC report's ``in air`` flag and ``predict``'s removal of such components both use it), and
#: the body is what lies above it (:mod:`analysis.imaging.body`).
AIR_OR_LUNG_HU = -500.0
#: The top of a 12-bit CT's range (4095 - 1024).
CT_MAX_HU = 3071.0
#: Air "near -1000 HU": within this many HU of :data:`AIR_HU` (noise of low-dose scans, air
#: at -1024 where scanners clip).
AIR_TOLERANCE_HU = 200.0
#: A CT's field of view holds air (around the patient, in the lungs, airways, bowel): at least
#: this share of its voxels. Tightly cropped CT (a box around one vertebra) may hold less:
#: ``--no-ct-check``.
MIN_AIR_FRACTION = 0.01
#: A body denser than air: at least this share of voxels above :data:`AIR_OR_LUNG_HU`.
MIN_BODY_FRACTION = 0.01
#: At most this share of voxels above :data:`CT_MAX_HU` (metal is a few per mille at most).
MAX_ABOVE_FRACTION = 0.05
#: The statistics are taken on a regular grid of about this many voxels (every k-th along each axis).
SAMPLE_VOXELS = 2_000_000


def _sample(volume: np.ndarray) -> np.ndarray:
    """A regular sub-grid of ``volume`` (every k-th voxel along each axis) of at most about
    :data:`SAMPLE_VOXELS` voxels, as float32."""
    volume = np.asarray(volume)
    step = max(1, math.ceil((volume.size / SAMPLE_VOXELS) ** (1.0 / volume.ndim))) if volume.size else 1
    return np.asarray(volume[(slice(None, None, step),) * volume.ndim], np.float32)


def _hu(value: float) -> str:
    return f"{value:.0f}" if math.isfinite(value) and value == round(value) else f"{value:.4g}"


def ct_problem(volume: np.ndarray) -> str | None:
    """What shows that ``volume`` is not CT in Hounsfield units, or None when it looks like CT.

    Three rules, on a regular sample of the voxels (:data:`SAMPLE_VOXELS`) and the volume's
    exact range:

    1. air near -1000 HU in the field of view: at least :data:`MIN_AIR_FRACTION` of the voxels
       within :data:`AIR_TOLERANCE_HU` of :data:`AIR_HU` (an MR, a PET, a CT stored without its
       rescale intercept have none);
    2. a body denser than air: at least :data:`MIN_BODY_FRACTION` above :data:`AIR_OR_LUNG_HU`;
    3. values within CT's range: at most :data:`MAX_ABOVE_FRACTION` above :data:`CT_MAX_HU`.

    Values below -1200 HU (scanners pad outside the reconstructed circle with -2000 or -3024)
    are allowed. Non-finite voxels are another check's (the caller's finite-value check).

    Args:
        volume: the image's voxels, any layout.

    Returns:
        One phrase naming what was seen, e.g. ``"values 0..3057 with nothing below 0: not CT in
        Hounsfield units (air is -1000 HU)"``; None for a CT.

    Examples:
        >>> ct = np.full((4, 32, 32), -1000.0)
        >>> ct[:, 8:24, 8:24] = 40.0
        >>> ct_problem(ct) is None
        True
        >>> ct_problem(ct + 1000.0)
        'values 0..1040 with nothing below 0: not CT in Hounsfield units (air is -1000 HU)'
    """
    volume = np.asarray(volume)
    if volume.size == 0:
        return "no voxels: not a CT"
    lo, hi = float(np.min(volume)), float(np.max(volume))
    seen = f"values {_hu(lo)}..{_hu(hi)}"
    sample = _sample(volume)
    n = sample.size
    air = np.count_nonzero(np.abs(sample - AIR_HU) <= AIR_TOLERANCE_HU) / n
    body = np.count_nonzero(sample > AIR_OR_LUNG_HU) / n
    above = np.count_nonzero(sample > CT_MAX_HU) / n
    not_hu = "not CT in Hounsfield units (air is -1000 HU)"
    if air < MIN_AIR_FRACTION:
        if lo >= 0:
            return f"{seen} with nothing below 0: {not_hu}"
        if lo > AIR_HU + AIR_TOLERANCE_HU:
            return f"{seen} with nothing near -1000: {not_hu}"
        return (f"{seen} with {100 * air:.2g} % of voxels near -1000 (air; a CT's field of view holds at least "
                f"{100 * MIN_AIR_FRACTION:g} %): {not_hu}, or cropped tightly")
    if body < MIN_BODY_FRACTION:
        return (f"{seen} with {100 * body:.2g} % of voxels above {_hu(AIR_OR_LUNG_HU)} HU: nothing denser than air "
                f"or lung in the field of view (a body is at least {100 * MIN_BODY_FRACTION:g} %)")
    if above > MAX_ABOVE_FRACTION:
        return (f"{seen} with {100 * above:.2g} % of voxels above {_hu(CT_MAX_HU)} HU (the top of CT's 12-bit "
                f"range; at most {100 * MAX_ABOVE_FRACTION:g} % expected): {not_hu}")
    return None


#: The option that turns the check off, named in every refusal (declared once in ``cli.py``).
CT_CHECK_OPTION = "--no-ct-check"


def require_ct(values: np.ndarray, where: str | os.PathLike, *, check: bool = True) -> None:
    """Refuse a volume that does not look like CT in HU (:func:`ct_problem`), with one line naming
    ``where`` (the file, or a DICOM case with its series) and what was seen.

    Args:
        values: the decoded voxels.
        where: what the message names.
        check: False (:data:`CT_CHECK_OPTION`) accepts anything, for genuine CT without air
            (a tightly cropped volume).

    Raises:
        InputError: e.g. ``mr.nii.gz: values 0..3057 with nothing below 0: not CT in Hounsfield
            units (air is -1000 HU); --no-ct-check accepts it (a CT cropped tightly)``.
    """
    if not check:
        return
    problem = ct_problem(values)
    if problem is not None:
        raise InputError(f"{where}: {problem}; {CT_CHECK_OPTION} accepts it (a CT cropped tightly)")
