"""A follow-up phantom: a second CT of each phantom patient, moved and with known lesion changes.

For each case of a phantom cohort (:mod:`analysis.cohort.phantom`) the follow-up is the same
patient planned again with its lesions changed (the rest of the plan, noise included, is
identical):

* one isolated focal lesion **resolved** (removed), one isolated focal lesion **grown** (scaled
  by :data:`GROW` about its centre), one focal lesion **shrunk** (scaled by :data:`SHRINK`),
  one or two **new** lesions in bone at least :data:`ISOLATION_MM` from every other lesion, the
  rest unchanged; a lesion-free patient stays lesion-free (a pair with nothing to report);
* rendered on the baseline's grid, then moved by a known rigid transform (up to
  :data:`MAX_ROTATION_DEG` about each axis, :data:`MAX_SHIFT_MM` along each) and resampled
  (CT linear, labels nearest neighbour) onto a grid of another spacing, storage orientation and
  a shorter field of view (:data:`VARIANTS`, in turn by case).

The truth is measured, not assumed: lesions are 26-connected components of each scan's own
mask, and a baseline and a follow-up lesion are the same lesion when they share a voxel in the
exact (known) frame; each group of linked lesions gets its status from its volumes on each
scan's own grid by :func:`analysis.lesions.group_lesions` (so a lesion that a bone edge kept
from growing is truthfully "stable"). A lesion the phantom made new or resolved is so in the truth
whatever its size (``min_lesion_ml=0``): many are smaller than ``followup``'s default floor for
calling one (0.1 ml), below which it reports them ``indeterminate``. A baseline lesion without a
follow-up lesion whose place the exact motion puts outside the follow-up's shorter field of view
(less than :data:`analysis.lesions.SEEN_FRACTION` of its voxels inside the box of the follow-up's
voxel centres) is ``indeterminate``, not resolved: the follow-up cannot tell.

Layout added to the cohort folder::

    followup/imagesTr/<case>_0000.nii.gz, followup/labelsTr/<case>.nii.gz,
    followup/bonesTr/<case>.nii.gz, followup/dataset.json    the follow-up CTs (a cohort layout)
    followup_truth.csv       case,lesion,status,baseline_id,followup_id,baseline_ml,followup_ml
    followup_transforms.csv  case,orientation,spacing_*,rotation_*_deg,translation_*_mm,center_*_mm,
                             m00..m22,offset_*_mm   (baseline LPS mm -> follow-up LPS mm)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from analysis.cohort import phantom as ph
from analysis.cohort.layout import Cohort, write_dataset_json
from analysis.imaging.io import Geometry, array_to_image, atomic_write_text, write_array
from analysis.lesions import INDETERMINATE, SEEN_FRACTION, group_lesions, lesion_instances
from analysis.imaging.records import csv_text

__all__ = ["Followups", "FollowupCase", "generate_followup", "VARIANTS", "TRUTH_CSV", "TRANSFORMS_CSV",
           "TRUTH_COLUMNS", "TRANSFORM_COLUMNS", "ORIENTATIONS", "followup_grid", "random_motion", "resample_onto",
           "scaled_lesion", "physical_box", "nominal_mm", "transform_row", "motion_row"]

TRUTH_CSV = "followup_truth.csv"
TRANSFORMS_CSV = "followup_transforms.csv"
FOLLOWUP_DIR = "followup"
TRUTH_COLUMNS = ("case", "lesion", "status", "baseline_id", "followup_id", "baseline_ml", "followup_ml")
TRANSFORM_COLUMNS = ("case", "orientation", "spacing_x", "spacing_y", "spacing_z", "rotation_x_deg",
                     "rotation_y_deg", "rotation_z_deg", "translation_x_mm", "translation_y_mm", "translation_z_mm",
                     "center_x_mm", "center_y_mm", "center_z_mm", *(f"m{i}{j}" for i in range(3) for j in range(3)),
                     "offset_x_mm", "offset_y_mm", "offset_z_mm")

GROW, SHRINK = 1.5, 0.6
#: Resolved, grown and new lesions keep at least this distance (centre to centre, mm) from every
#: other lesion, so which lesion changed is unambiguous.
ISOLATION_MM = 20.0
MAX_ROTATION_DEG = 5.0
MAX_SHIFT_MM = 12.0
#: The follow-up's field of view ends this many mm inside the baseline's at both ends along z.
Z_MARGIN_MM = 9.0
#: Storage orientations (DICOM convention: where each index axis runs) and their directions.
ORIENTATIONS = {"LPS": (1, 1, 1), "RAS": (-1, -1, 1), "LPI": (1, 1, -1), "RAI": (-1, -1, -1)}
#: Follow-up storage by case index (in turn): orientation and spacing as factors of the baseline's.
VARIANTS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("RAS", (0.8, 0.8, 2 / 3)),
    ("LPS", (1.25, 1.25, 1.0)),
    ("LPI", (1.0, 1.0, 5 / 3)),
    ("RAI", (0.9, 0.9, 5 / 6)),
    ("LPS", (1.0, 1.0, 1.0)),
)


@dataclass(frozen=True)
class FollowupCase:
    """A follow-up scan of a phantom patient and its truth.

    Attributes:
        ct, label, bones: the follow-up's int16 HU, uint8 0/1 lesion mask and uint8 bone codes,
            ``(slices, rows, cols)`` in its own storage order.
        geometry: the follow-up's geometry.
        transform: the rigid motion, baseline LPS mm -> follow-up LPS mm.
        orientation: the follow-up's storage orientation (:data:`ORIENTATIONS`).
        truth: one dict per tracked lesion, keys :data:`TRUTH_COLUMNS` but ``case``.
    """

    ct: np.ndarray
    label: np.ndarray
    bones: np.ndarray
    geometry: Geometry
    transform: sitk.Euler3DTransform
    orientation: str
    truth: list[dict[str, Any]]


def nominal_mm(plan: Any, point: tuple[float, float, float]) -> np.ndarray:
    """A plan point (nominal mm) in physical mm along each axis (for distances between lesions)."""
    f = plan.frame
    return np.array([point[0] * f.mm_xy, point[1] * f.mm_xy, point[2] * f.mm_z])


def scaled_lesion(lesion: Any, s: float) -> Any:
    """The lesion scaled by ``s`` about its main lobe's centre (lobes and radii alike)."""
    c0 = np.asarray(lesion.prims[0].c)
    prims = []
    for p in lesion.prims:
        centre = tuple(float(v) for v in c0 + s * (np.asarray(p.c) - c0))
        prims.append(ph._Ellipsoid(centre, tuple(float(r * s) for r in p.r), angle=p.angle, bend=p.bend,
                                   shear=p.shear, taper=p.taper, power=p.power, wobble=p.wobble))
    return ph._Lesion(prims, lesion.hu, lesion.diffuse)


def _change_lesions(rng: np.random.Generator):
    """The plan edit of :func:`analysis.cohort.phantom.generate_case` that makes the follow-up."""

    def edit(plan: Any) -> None:
        if not plan.lesions:
            return
        centres = [nominal_mm(plan, les.prims[0].c) for les in plan.lesions]

        def isolated(point: np.ndarray, skip: int | None = None) -> bool:
            return all(np.linalg.norm(point - c) >= ISOLATION_MM for k, c in enumerate(centres) if k != skip)

        focal = [i for i in rng.permutation(len(plan.lesions)).tolist() if not plan.lesions[i].diffuse]
        lonely = sorted((i for i in focal if isolated(centres[i], skip=i)), key=lambda i: -plan.lesions[i].prims[0].r[0])
        grown = lonely[0] if lonely else None
        resolved = lonely[-1] if len(lonely) > 1 else None
        rest = sorted((i for i in focal if i not in (resolved, grown)), key=lambda i: -plan.lesions[i].prims[0].r[0])
        shrunk = rest[0] if rest else None
        lesions = []
        for i, les in enumerate(plan.lesions):
            if i == resolved:
                continue
            lesions.append(scaled_lesion(les, GROW) if i == grown else scaled_lesion(les, SHRINK) if i == shrunk else les)
        sites = [s for s in plan.sites if ph._in_scan(plan, s[2])]
        wanted = int(rng.integers(1, 3))
        for _ in range(200):
            if wanted == 0 or not sites:
                break
            _, _, bone = sites[int(rng.integers(len(sites)))]
            centre, fit = ph._site_point(bone, rng)
            if not isolated(nominal_mm(plan, centre)):
                continue
            radius = min(float(rng.uniform(3.0, 8.0)) / plan.frame.mm_xy, 1.5 * fit)
            rz = radius * plan.frame.mm_xy / plan.frame.mm_z
            hu = float(np.clip(rng.normal(690, 130), 480, 1000))
            lesions.append(ph._Lesion(ph._blob(plan, rng, centre, radius, rz), hu, diffuse=False))
            centres.append(nominal_mm(plan, centre))
            wanted -= 1
        plan.lesions[:] = lesions

    return edit


def random_motion(rng: np.random.Generator, centre: np.ndarray) -> sitk.Euler3DTransform:
    """A rigid motion about ``centre`` (LPS mm): up to :data:`MAX_ROTATION_DEG` about each axis and
    :data:`MAX_SHIFT_MM` along each, drawn from ``rng``."""
    t = sitk.Euler3DTransform()
    t.SetCenter(tuple(float(c) for c in centre))
    t.SetRotation(*(math.radians(float(a)) for a in rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3)))
    t.SetTranslation(tuple(float(v) for v in rng.uniform(-MAX_SHIFT_MM, MAX_SHIFT_MM, 3)))
    return t


def physical_box(geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Physical (LPS mm) low and high corners of the voxel centres of an axis-aligned geometry."""
    d = np.asarray(geometry.direction).reshape(3, 3)
    far = np.asarray(geometry.origin) + d @ ((np.asarray(geometry.size) - 1) * np.asarray(geometry.spacing))
    return np.minimum(geometry.origin, far), np.maximum(geometry.origin, far)


def followup_grid(baseline: Geometry, orientation: str, factors: tuple[float, float, float]) -> Geometry:
    """The follow-up's grid: the baseline's physical box, :data:`Z_MARGIN_MM` shorter at both ends,
    sampled with ``factors`` x the baseline's spacing and stored in ``orientation``."""
    lo, hi = physical_box(baseline)
    lo[2] += Z_MARGIN_MM
    hi[2] -= Z_MARGIN_MM
    spacing = tuple(float(s * f) for s, f in zip(baseline.spacing, factors))
    size = tuple(int((h - l) // s) + 1 for l, h, s in zip(lo, hi, spacing))
    signs = ORIENTATIONS[orientation]
    origin = tuple(float(l if sg > 0 else l + (n - 1) * s) for l, n, s, sg in zip(lo, size, spacing, signs))
    direction = tuple(float(v) for v in np.diag(signs).ravel())
    return Geometry(size=size, spacing=spacing, origin=origin, direction=direction)


def resample_onto(array: np.ndarray, source: Geometry, target: Geometry, to_source: sitk.Transform, *,
                  labels: bool) -> np.ndarray:
    """``array`` on ``source`` resampled onto ``target`` through ``to_source`` (a target point -> the
    source point): nearest neighbour for ``labels`` (0 outside), else linear (air outside), float32."""
    image = array_to_image(array, source)
    reference = sitk.Image(target.size, image.GetPixelID())
    target.apply_to(reference)
    out = sitk.Resample(image, reference, to_source, sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
                        0 if labels else float(ph.HU_MIN), image.GetPixelID() if labels else sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _in_view(base_labels: np.ndarray, g0: Geometry, grid: Geometry, motion: sitk.Euler3DTransform) -> np.ndarray:
    """Per baseline lesion id (index 0 unused): whether the exact ``motion`` (baseline mm -> follow-up
    mm) puts at least :data:`~analysis.lesions.SEEN_FRACTION` of its voxels inside ``grid``'s voxel
    centres' box, half a voxel beyond the outer centres."""
    n = int(base_labels.max())
    z, y, x = np.nonzero(base_labels)
    ids = base_labels[z, y, x]
    d0, d1 = np.asarray(g0.direction, float).reshape(3, 3), np.asarray(grid.direction, float).reshape(3, 3)
    points = np.asarray(g0.origin) + (np.stack([x, y, z], 1) * np.asarray(g0.spacing)) @ d0.T
    m = np.asarray(motion.GetMatrix(), float).reshape(3, 3)
    c, t = np.asarray(motion.GetCenter()), np.asarray(motion.GetTranslation())
    moved = (points - c) @ m.T + c + t
    index = ((moved - np.asarray(grid.origin)) @ d1) / np.asarray(grid.spacing)
    inside = np.all((index >= -0.5) & (index <= np.asarray(grid.size) - 0.5), axis=1)
    total = np.bincount(ids, minlength=n + 1)
    seen = np.bincount(ids, weights=inside.astype(float), minlength=n + 1)
    return seen >= SEEN_FRACTION * np.maximum(total, 1)


def _truth(base_labels: np.ndarray, moved0: np.ndarray, own: np.ndarray, under: np.ndarray,
           base_ml: np.ndarray, own_ml: np.ndarray, in_view: np.ndarray) -> list[dict[str, Any]]:
    """The tracked lesions: a baseline lesion and a follow-up lesion are one when the follow-up's
    lesion was resampled from a lesion of the exact frame (``under``, on the follow-up's grid)
    that shares a voxel with the baseline lesion (``moved0``, on the baseline grid); a baseline
    lesion left alone outside the follow-up's view (``in_view``) is indeterminate."""
    both = (base_labels > 0) & (moved0 > 0)
    frame_to_base: dict[int, set[int]] = {}
    for a, b in set(zip(base_labels[both].tolist(), moved0[both].tolist())):
        frame_to_base.setdefault(int(b), set()).add(int(a))
    inside = own > 0
    pairs = {(a, int(j)) for j, k in set(zip(own[inside].tolist(), under[inside].tolist()))
             for a in frame_to_base.get(int(k), ())}
    groups = group_lesions(pairs, base_ml, own_ml, min_lesion_ml=0.0)  # the phantom's own changes, any size
    unseen = [not g.followup and not any(in_view[i] for i in g.baseline) for g in groups]
    return [{"lesion": k, "status": INDETERMINATE if out else g.status, "baseline_id": ";".join(map(str, g.baseline)),
             "followup_id": ";".join(map(str, g.followup)), "baseline_ml": g.baseline_ml, "followup_ml": g.followup_ml}
            for k, (g, out) in enumerate(zip(groups, unseen), start=1)]


def generate_followup(seed: int, baseline: ph.PhantomCase, *, index: int = 0, include_head: bool | None = None,
                      lesion_free: bool | None = None) -> FollowupCase:
    """The follow-up of the phantom patient ``seed`` whose baseline is ``baseline``.

    Args:
        seed: the patient's seed (:func:`analysis.cohort.phantom.case_seed`).
        baseline: ``generate_case(seed, ...)`` with the same ``include_head``/``lesion_free``.
        index: picks the storage variant (:data:`VARIANTS`, in turn).
        include_head, lesion_free: as given to :func:`~analysis.cohort.phantom.generate_case`.

    Returns:
        The :class:`FollowupCase`.
    """
    rng = np.random.default_rng([int(seed), 0xF0110])
    g0 = baseline.geometry
    shape = g0.shape
    frame = ph.generate_case(seed, shape, g0.spacing, include_head=include_head, lesion_free=lesion_free,
                             edit=_change_lesions(rng))
    lo, hi = physical_box(g0)
    motion = random_motion(rng, (lo + hi) / 2)
    orientation, factors = VARIANTS[index % len(VARIANTS)]
    grid = followup_grid(g0, orientation, factors)
    back = motion.GetInverse()                     # follow-up point -> baseline point
    ct = np.clip(np.rint(resample_onto(frame.ct, g0, grid, back, labels=False)), ph.HU_MIN, ph.HU_MAX).astype(np.int16)
    moved0, _ = lesion_instances(frame.label, 26)
    under = resample_onto(moved0.astype(np.uint32), g0, grid, back, labels=True)
    bones = resample_onto(frame.bones, g0, grid, back, labels=True).astype(np.uint8)
    label = (under > 0).astype(np.uint8)
    base_labels, n_base = lesion_instances(baseline.label, 26)
    own, n_own = lesion_instances(label, 26)
    base_ml = np.bincount(base_labels.ravel(), minlength=n_base + 1)[1:] * g0.voxel_volume_ml
    own_ml = np.bincount(own.ravel(), minlength=n_own + 1)[1:] * grid.voxel_volume_ml
    truth = _truth(base_labels, moved0, own, under, base_ml, own_ml, _in_view(base_labels, g0, grid, motion))
    return FollowupCase(ct=ct, label=label, bones=bones, geometry=grid, transform=motion, orientation=orientation,
                        truth=truth)


def transform_row(case: str, fc: FollowupCase) -> dict[str, Any]:
    """One row of ``followup_transforms.csv`` (:data:`TRANSFORM_COLUMNS`)."""
    return motion_row(case, fc.orientation, fc.geometry, fc.transform)


def motion_row(case: str, orientation: str, geometry: Geometry, t: sitk.Euler3DTransform) -> dict[str, Any]:
    """A scan's storage and motion as a row of :data:`TRANSFORM_COLUMNS`."""
    m = np.asarray(t.GetMatrix()).reshape(3, 3)
    c, tr = np.asarray(t.GetCenter()), np.asarray(t.GetTranslation())
    offset = tr + c - m @ c
    row: dict[str, Any] = {"case": case, "orientation": orientation}
    row.update(zip(("spacing_x", "spacing_y", "spacing_z"), geometry.spacing))
    row.update(zip(("rotation_x_deg", "rotation_y_deg", "rotation_z_deg"),
                   (math.degrees(a) for a in (t.GetAngleX(), t.GetAngleY(), t.GetAngleZ()))))
    row.update(zip(("translation_x_mm", "translation_y_mm", "translation_z_mm"), tr))
    row.update(zip(("center_x_mm", "center_y_mm", "center_z_mm"), c))
    row.update({f"m{i}{j}": float(m[i, j]) for i in range(3) for j in range(3)})
    row.update(zip(("offset_x_mm", "offset_y_mm", "offset_z_mm"), offset))
    return row


class Followups:
    """The companion of :func:`analysis.cohort.phantom.generate_cohort` that writes the follow-ups
    (see the module docstring for the layout)."""

    def __init__(self) -> None:
        self.truth: list[dict[str, Any]] = []
        self.transforms: list[dict[str, Any]] = []

    def add(self, root: Path, case: str, seed: int, include_head: bool, lesion_free: bool,
            baseline: ph.PhantomCase) -> None:
        fc = generate_followup(seed, baseline, index=len(self.transforms), include_head=include_head,
                               lesion_free=lesion_free)
        cohort = Cohort(Path(root) / FOLLOWUP_DIR)
        write_array(fc.ct, fc.geometry, cohort.image_path(case))
        write_array(fc.label, fc.geometry, cohort.label_path(case))
        write_array(fc.bones, fc.geometry, cohort.bones_path(case))
        self.truth += [{"case": case, **row} for row in fc.truth]
        self.transforms.append(transform_row(case, fc))

    def finish(self, root: Path) -> None:
        write_dataset_json(Path(root) / FOLLOWUP_DIR, len(self.transforms),
                           description=f"{ph.PHANTOM_DESCRIPTION}: follow-up scans")
        atomic_write_text(Path(root) / TRUTH_CSV, csv_text(TRUTH_COLUMNS, self.truth))
        atomic_write_text(Path(root) / TRANSFORMS_CSV, csv_text(TRANSFORM_COLUMNS, self.transforms))
