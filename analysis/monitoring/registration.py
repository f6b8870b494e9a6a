"""Rigid (6 degrees of freedom) registration of a follow-up CT to its baseline, and its check.

Both images are used in physical space (ITK's LPS mm), so their storage orientations, spacings
and fields of view may differ. The method (SimpleITK's ``ImageRegistrationMethod``):

* transform: ``Euler3DTransform`` (3 rotations, 3 translations) mapping a *baseline* point to
  the *follow-up* point of the same anatomy (ITK's fixed-to-moving convention: the baseline is
  the fixed image), centred at the baseline's bone centre;
* initialisation: the translation that brings the centre of the follow-up's bone voxels (CT
  >= ``bone_hu``) onto the baseline's;
* metric: Mattes mutual information (32 bins) on bone: sampled (random, seeded) inside the
  baseline's bone voxels dilated by :data:`MASK_DILATION_MM`, so soft tissue that moves
  between scans does not pull the bones apart;
* optimiser: regular-step gradient descent with scales from physical shift, over a
  three-level pyramid (shrink 4, 2, 1; smoothing 2, 1, 0 voxels);
* working grid: images with voxels finer than :data:`WORKING_MM` are block-averaged to about
  that size first (``BinShrink`` by whole factors), and image gradients are computed at the
  sampled points only, which keeps paper-sized CT fast and small in memory; the phantom pairs
  (tests/test_followup.py) show this costs no accuracy at the millimetre scale.

The result is checked, not trusted: :func:`bone_dice` is the Dice of the two bone masks
(CT >= ``bone_hu``) after registration, inside the part of the baseline the follow-up covers.
Below :data:`DICE_FLOOR` the scans are called not aligned (another patient, another body
region, a failed optimisation).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from analysis.lesions import DEFAULT_BONE_HU, dice

log = logging.getLogger(__name__)

__all__ = ["Registration", "register_rigid", "identity", "bone_dice", "resample_to", "DICE_FLOOR",
           "WORKING_MM", "MASK_DILATION_MM", "transform_record", "rotation_angle_deg"]

#: Below this bone Dice after registration the two scans are refused as not aligned. Same-patient
#: phantom pairs reach 0.85-0.95; two different phantom patients stay below 0.6 (tests/test_followup.py).
DICE_FLOOR = 0.7
#: Registration works on voxels of about this size (mm) at its finest level.
WORKING_MM = 2.0
#: The metric's mask: the baseline's bone voxels dilated by this many mm.
MASK_DILATION_MM = 6.0
#: Random metric samples per pyramid level inside the mask (at the finest level).
SAMPLES = 150_000
HISTOGRAM_BINS = 32
AIR_HU = -1024.0


@dataclass(frozen=True)
class Registration:
    """A rigid transform from baseline to follow-up physical points and how it was found.

    Attributes:
        transform: maps a baseline point (LPS mm) to the follow-up point of the same anatomy.
        metric: the final Mattes mutual information value (negative: lower is better); None
            without registration.
        iterations: optimiser iterations at the last level (0 without registration).
        stop: the optimiser's stop condition (or ``"not registered"``).
        seconds: wall-clock time of the registration.
        registered: False for ``--no-registration`` (the identity).
    """

    transform: sitk.Euler3DTransform
    metric: float | None
    iterations: int
    stop: str
    seconds: float
    registered: bool = True

    def to_followup(self, points_mm: np.ndarray) -> np.ndarray:
        """Baseline points ``(n, 3)`` LPS mm -> follow-up points."""
        m, t = _affine(self.transform)
        return np.asarray(points_mm, np.float64).reshape(-1, 3) @ m.T + t

    def to_baseline(self, points_mm: np.ndarray) -> np.ndarray:
        """Follow-up points ``(n, 3)`` LPS mm -> baseline points (the inverse transform)."""
        m, t = _affine(self.transform)
        return (np.asarray(points_mm, np.float64).reshape(-1, 3) - t) @ m  # m orthonormal: inverse = m.T

    def to_json(self) -> dict[str, Any]:
        return {**transform_record(self.transform), "metric": "Mattes mutual information on bone" if self.registered
                else None, "metric_value": self.metric, "iterations": self.iterations, "stop": self.stop,
                "registered": self.registered, "seconds": round(self.seconds, 3)}


def _affine(transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    """``(M, t)`` with ``transform(p) = M p + t`` (p a column of LPS mm)."""
    m = np.asarray(transform.GetMatrix(), np.float64).reshape(3, 3)
    c = np.asarray(transform.GetCenter(), np.float64)
    tr = np.asarray(transform.GetTranslation(), np.float64)
    return m, tr + c - m @ c


def rotation_angle_deg(matrix: np.ndarray) -> float:
    """The rotation angle (degrees) of a 3x3 rotation matrix: ``arccos((trace - 1) / 2)``.

    >>> round(rotation_angle_deg(np.eye(3)), 6)
    0.0
    """
    cos = (float(np.trace(np.asarray(matrix, np.float64))) - 1.0) / 2.0
    return math.degrees(math.acos(min(1.0, max(-1.0, cos))))


def transform_record(transform: sitk.Euler3DTransform) -> dict[str, Any]:
    """A transform as JSON: rotation (Euler angles about x, y, z in degrees, ITK's ZXY
    composition; the matrix; the total angle) and translation in mm, with the affine form
    ``followup = matrix @ baseline + offset_mm``."""
    m, t = _affine(transform)
    return {"maps": "baseline LPS mm -> follow-up LPS mm",
            "rotation_deg": [round(math.degrees(a), 6) for a in (transform.GetAngleX(), transform.GetAngleY(),
                                                                 transform.GetAngleZ())],
            "rotation_angle_deg": round(rotation_angle_deg(m), 6),
            "translation_mm": [round(float(v), 6) for v in transform.GetTranslation()],
            "center_mm": [round(float(v), 6) for v in transform.GetCenter()],
            "matrix": [round(float(v), 9) for v in m.ravel()],
            "offset_mm": [round(float(v), 6) for v in t]}


def identity() -> Registration:
    """The identity, for scans already aligned (``--no-registration``)."""
    return Registration(sitk.Euler3DTransform(), None, 0, "not registered", 0.0, registered=False)


def _working(image: sitk.Image) -> sitk.Image:
    """Float32 copy block-averaged to voxels of about :data:`WORKING_MM` (never finer than stored)."""
    factors = [max(1, int(WORKING_MM / s + 0.25)) for s in image.GetSpacing()]
    img = sitk.Cast(image, sitk.sitkFloat32)
    return sitk.BinShrink(img, factors) if max(factors) > 1 else img


def _bone_centre(image: sitk.Image, bone_hu: float) -> np.ndarray | None:
    """Physical centre (LPS mm) of the voxels >= ``bone_hu``; None without any."""
    arr = sitk.GetArrayViewFromImage(image)
    idx = np.nonzero(arr >= bone_hu)
    if idx[0].size == 0:
        return None
    mean_zyx = np.array([i.mean() for i in idx])
    d = np.asarray(image.GetDirection(), np.float64).reshape(3, 3)
    return np.asarray(image.GetOrigin()) + d @ (mean_zyx[::-1] * np.asarray(image.GetSpacing()))


def register_rigid(baseline: sitk.Image, followup: sitk.Image, *, bone_hu: float = DEFAULT_BONE_HU,
                   seed: int = 0) -> Registration:
    """Register ``followup`` rigidly to ``baseline`` (see the module docstring).

    Args:
        baseline: CT in HU (the fixed image), any orientation and spacing.
        followup: CT in HU of the same patient (the moving image).
        bone_hu: CT >= this is bone (initialisation and metric mask).
        seed: seed of the metric's random sampling (same inputs, same result).

    Returns:
        The :class:`Registration`; without bone in either image the initial identity, with
        ``stop`` saying so (the Dice check then refuses the pair).
    """
    start = time.perf_counter()
    fixed, moving = _working(baseline), _working(followup)
    c_fixed, c_moving = _bone_centre(fixed, bone_hu), _bone_centre(moving, bone_hu)
    transform = sitk.Euler3DTransform()
    if c_fixed is None or c_moving is None:
        return Registration(transform, None, 0, f"no voxel >= {bone_hu:g} HU in one of the scans",
                            time.perf_counter() - start)
    transform.SetCenter(tuple(float(v) for v in c_fixed))
    transform.SetTranslation(tuple(float(v) for v in c_moving - c_fixed))
    bone = sitk.Cast(fixed >= bone_hu, sitk.sitkUInt8)
    radius = [max(1, int(round(MASK_DILATION_MM / s))) for s in fixed.GetSpacing()]
    mask = sitk.BinaryDilate(bone, radius)
    in_mask = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    reg.SetMetricFixedMask(mask)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    # ITK draws the random samples over the whole fixed grid and keeps those in the mask
    # (percentage x all voxels), so this percentage leaves about SAMPLES of them at the finest level
    reg.SetMetricSamplingPercentage(min(1.0, SAMPLES / max(in_mask, 1)), seed)
    reg.SetInterpolator(sitk.sitkLinear)
    # gradients at the sampled points only: whole gradient images would hold 3 doubles per voxel
    reg.MetricUseFixedImageGradientFilterOff()
    reg.MetricUseMovingImageGradientFilterOff()
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=200,
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(fixed, moving)
    seconds = time.perf_counter() - start
    log.info("registration: %s after %d iterations, metric %.4f, %.1f s", reg.GetOptimizerStopConditionDescription(),
             reg.GetOptimizerIteration(), reg.GetMetricValue(), seconds)
    return Registration(transform, float(reg.GetMetricValue()), int(reg.GetOptimizerIteration()),
                        reg.GetOptimizerStopConditionDescription(), seconds)


def resample_to(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform, *, labels: bool = False,
                default: float = AIR_HU) -> sitk.Image:
    """``image`` (follow-up) resampled onto ``reference``'s grid (baseline) through ``transform``
    (baseline point -> follow-up point): linear for CT, nearest neighbour for ``labels``."""
    interpolator = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    return sitk.Resample(image, reference, transform, interpolator, 0 if labels else default, image.GetPixelID())


def bone_dice(baseline: np.ndarray, registered: np.ndarray, footprint: np.ndarray, *,
              bone_hu: float = DEFAULT_BONE_HU) -> float:
    """Dice of the bone masks (CT >= ``bone_hu``) of the baseline and the registered follow-up,
    counted where the follow-up covers the baseline.

    Args:
        baseline: ``(slices, rows, cols)`` HU.
        registered: the follow-up resampled onto the baseline grid, same layout.
        footprint: bool, same layout: baseline voxels inside the follow-up's field of view.
        bone_hu: bone threshold in HU.

    Returns:
        :func:`analysis.lesions.overlap.dice` of the two bone masks, in [0, 1]; 0.0 (not the metric's
        NaN) when neither has bone there: no bone to align is a registration to refuse.

    Examples:
        >>> a = np.array([[[0, 200, 200, 0]]]); b = np.array([[[0, 0, 200, 200]]])
        >>> bone_dice(a, b, np.ones(a.shape, bool))
        0.5
    """
    value = dice((np.asarray(registered) >= bone_hu) & footprint, (np.asarray(baseline) >= bone_hu) & footprint)
    return 0.0 if math.isnan(value) else value  # no bone in either: not aligned (see Returns)
