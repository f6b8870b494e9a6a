"""A realistic synthetic CT phantom of a prostate-cancer patient with osteoblastic bone metastases.

The phantom lets every command of the project run and be tested without patient data. It is
built to be *hard*: lesions share their Hounsfield range with cortical bone, bone islands and
vascular calcifications, so no global HU threshold segments them (the tests check that the best
threshold stays below a Dice of 0.5); a model has to learn shape and context (blobby densities
inside trabecular bone, not rim-shaped cortex, not outside bone).

Anatomy is defined in millimetres of a nominal adult ("nominal mm": x to the patient's left,
y posterior, z superior, as in ITK's LPS frame) inside a 420 mm field of view, and sampled on
the requested voxel grid: the patient is scaled to fill the field of view in-plane, and along z
the scan covers at least mid-thigh to the lung apices (to the skull vertex in cases that include
the head), stretched only when the requested scan is shorter than that. So a 48 x 128 x 128
default case and a 385 x 512 x 512 ``scale="paper"`` case show the same anatomy. Structures
thinner than a voxel are widened to about one voxel so that they never vanish between samples.

HU values (published ranges, see ``shared/notes/domain-facts.md``):

* air -1000, subcutaneous and visceral fat about -100, muscle and organs 20-60, lungs -900 to
  -700 with vessels, contrast-filled aorta and heart 150-300 (arterial phase);
* cortical bone 600-1200, trabecular bone 150-300 (L1 trabecular ~226 HU young to ~89 HU old,
  Jang/Pickhardt, Radiology 2019), fatty marrow of long-bone shafts about -50..50;
* osteoblastic metastases: mean about 650 HU, range 400-1200 (untreated blastic lesions
  654 +/- 176 HU, Ulano et al., AJR 2016;207:362); focal (3-20 mm, irregular) or diffuse
  (most of a vertebral body or an iliac cross-section over several slices);
* unlabelled look-alikes: cortex itself, bone islands 1000-1400 HU (enostoses 1190 +/- 239 HU,
  Ulano et al.), aortic wall and costal cartilage calcifications;
* scanner noise (sd 10-25 HU, slightly correlated in-plane) after partial-volume blur
  (Gaussian, 0.5-1 voxel in-plane, 0.5 voxel along z).

Arrays are numpy ``(slices, rows, cols)`` = ``(z, y, x)``; spacing is ITK ``(x, y, z)`` in mm.
Slice index 0 is the most inferior slice (identity direction, z increasing superiorly).
Large cases are computed in slabs of slices, each in float32, so memory stays bounded.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from analysis.cohort import Cohort, write_dataset_json
from analysis.errors import InputError
from analysis.io import Geometry, atomic_directory, write_array

log = logging.getLogger(__name__)

DEFAULT_SHAPE = (48, 128, 128)
DEFAULT_SPACING = (1.0, 1.0, 3.0)
#: ``scale="paper"``: 512 x 512 in-plane, 385 slices (Pawan, Rich et al. used 8,863 slices of
#: 23 patients, ~385 per patient), 0.82 mm pixels (420 mm field of view), 2.5 mm slices.
PAPER_SHAPE = (385, 512, 512)
PAPER_SPACING = (0.8203125, 0.8203125, 2.5)
SCALES = ("paper",)

NOMINAL_FOV_MM = 420.0
SLAB_SLICES = 24
HU_MIN, HU_MAX = -1024, 3071

# nominal z landmarks (mm): scan bottom must reach Z_FEMUR, top Z_TOP_TRUNK or Z_TOP_HEAD
Z_FEMUR = 40.0
Z_TOP_TRUNK = 780.0
Z_TOP_HEAD = 1065.0

BONE, FATTY, CARTILAGE = 1, 2, 3  # marrow kinds of bone voxels
SKULL, SPINE, RIB, PELVIS, UPPER, LOWER, OTHER = 1, 2, 3, 4, 5, 6, 7  # analysis.cohort.BONE_CODES


@dataclass(frozen=True)
class PhantomCase:
    """One synthetic patient.

    Attributes:
        ct: int16 HU, ``(slices, rows, cols)``.
        label: uint8 0/1 lesion mask, same shape (lesion voxels, all inside bone).
        bones: uint8 bone codes of :data:`analysis.cohort.BONE_CODES`, same shape.
        geometry: size/spacing/origin in ITK ``(x, y, z)`` order.
        include_head: the scan reaches the skull vertex.
        lesion_free: the label is empty (no lesion placed, or none inside the scanned slices).
    """

    ct: np.ndarray
    label: np.ndarray
    bones: np.ndarray
    geometry: Geometry
    include_head: bool = False
    lesion_free: bool = False


# ---------------------------------------------------------------------------------------
# sampling frame: nominal mm of each voxel centre
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Frame:
    """Nominal coordinates of the voxel grid: ``x`` (cols), ``y`` (rows), ``z`` (slices)."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    floor_xy: float  # smallest radius (nominal mm) that still spans ~1.5 voxels in-plane
    floor_z: float   # smallest half-height (nominal mm) that still hits a slice
    mm_xy: float     # physical mm per nominal mm in-plane
    mm_z: float      # physical mm per nominal mm along z

    def index_range(self, axis: np.ndarray, lo: float, hi: float) -> tuple[int, int]:
        return int(np.searchsorted(axis, lo, "left")), int(np.searchsorted(axis, hi, "right"))


def _make_frame(shape: tuple[int, int, int], spacing: tuple[float, float, float],
                body_scale: float, z_top: float) -> tuple[_Frame, Geometry]:
    nz, ny, nx = shape
    sx, sy, sz = spacing
    fov = min(nx * sx, ny * sy)
    s_xy = fov / NOMINAL_FOV_MM * body_scale         # physical mm per nominal mm in-plane
    extent = max(nz * sz / s_xy, z_top - Z_FEMUR)    # nominal mm covered along z
    s_z = nz * sz / extent
    origin = (-(nx - 1) * sx / 2.0, -(ny - 1) * sy / 2.0, -(nz - 1) * sz)
    x = ((origin[0] + np.arange(nx) * sx) / s_xy).astype(np.float32)
    y = ((origin[1] + np.arange(ny) * sy) / s_xy).astype(np.float32)
    z = (z_top - extent + (np.arange(nz) + 0.5) * sz / s_z).astype(np.float32)
    frame = _Frame(x=x, y=y, z=z, floor_xy=0.75 * max(sx, sy) / s_xy, floor_z=0.55 * sz / s_z,
                   mm_xy=s_xy, mm_z=s_z)
    geometry = Geometry(size=(nx, ny, nz), spacing=tuple(float(s) for s in spacing),
                        origin=tuple(float(o) for o in origin),
                        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return frame, geometry


# ---------------------------------------------------------------------------------------
# primitives: each returns (inside mask, depth below the surface in nominal mm)
# ---------------------------------------------------------------------------------------

Coords = tuple[np.ndarray, np.ndarray, np.ndarray]  # Z (n,1,1), Y (1,m,1), X (1,1,k)


@dataclass(frozen=True)
class _Ellipsoid:
    """Ellipsoid rotated by ``angle`` about z; optional bend, posterior shear and taper.

    Local axes: u along ``angle`` in-plane, v across it, w = z. ``bend`` curves the v axis
    (v -= bend * u^2, a curved plate such as an iliac wing), ``shear`` moves the centre by
    ``shear`` mm in y per mm below the centre, ``taper`` widens u towards the top (sacrum).
    ``power`` 4 along z gives flat tops (a diffuse lesion filling whole vertebral levels).
    """

    c: tuple[float, float, float]  # x, y, z
    r: tuple[float, float, float]  # u, v, w radii
    angle: float = 0.0
    bend: float = 0.0
    shear: float = 0.0
    taper: float = 0.0
    power: int = 2
    wobble: tuple[float, float, int] = (0.0, 0.0, 0)  # amplitude, phase, lobes (irregular outline)

    def bbox(self) -> tuple[float, ...]:
        ru, rv, rw = self.r
        reach = max(ru * (1 + abs(self.taper)), rv) * (1 + self.wobble[0]) + abs(self.bend) * ru * ru
        sh = abs(self.shear) * rw
        return (self.c[2] - rw, self.c[2] + rw, self.c[1] - reach - sh, self.c[1] + reach + sh,
                self.c[0] - reach, self.c[0] + reach)

    def eval(self, Z: np.ndarray, Y: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ru, rv, rw = self.r
        dz = (Z - self.c[2]) / rw
        dx = X - self.c[0]
        dy = Y - self.c[1] + self.shear * (Z - self.c[2])
        ca, sa = math.cos(self.angle), math.sin(self.angle)
        u = ca * dx + sa * dy
        v = -sa * dx + ca * dy - self.bend * u * u
        ru_z = ru * (1.0 + self.taper * dz) if self.taper else ru
        rho2 = (u / ru_z) ** 2 + (v / rv) ** 2
        if self.wobble[0]:
            amp, phase, lobes = self.wobble
            rho2 = rho2 / (1.0 + amp * np.cos(lobes * np.arctan2(v / rv, u / ru) + phase + 2.0 * dz)) ** 2
        rho2 = rho2 + (dz ** 2 if self.power == 2 else dz ** self.power)
        rho = np.sqrt(rho2)
        return rho <= 1.0, (1.0 - rho) * min(ru, rv)


@dataclass(frozen=True)
class _Capsule:
    """Tube of radii ``r`` (x, y, z) around the segment ``p0``-``p1`` (anisotropic metric)."""

    p0: tuple[float, float, float]
    p1: tuple[float, float, float]
    r: tuple[float, float, float]

    def bbox(self) -> tuple[float, ...]:
        lo = [min(a, b) - r for a, b, r in zip(self.p0, self.p1, self.r)]
        hi = [max(a, b) + r for a, b, r in zip(self.p0, self.p1, self.r)]
        return (lo[2], hi[2], lo[1], hi[1], lo[0], hi[0])

    def eval(self, Z: np.ndarray, Y: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rx, ry, rz = self.r
        qx, qy, qz = (X - self.p0[0]) / rx, (Y - self.p0[1]) / ry, (Z - self.p0[2]) / rz
        dx, dy, dz = ((b - a) / r for a, b, r in zip(self.p0, self.p1, self.r))
        dd = dx * dx + dy * dy + dz * dz
        t = np.clip((qx * dx + qy * dy + qz * dz) / max(dd, 1e-9), 0.0, 1.0)
        rho = np.sqrt((qx - t * dx) ** 2 + (qy - t * dy) ** 2 + (qz - t * dz) ** 2)
        return rho <= 1.0, (1.0 - rho) * min(rx, ry)


@dataclass(frozen=True)
class _Cylinder:
    """Elliptic cylinder (vertebral body, sternum): in-plane radii ``r``, z from ``z0`` to ``z1``."""

    c: tuple[float, float]
    r: tuple[float, float]
    z0: float
    z1: float

    def bbox(self) -> tuple[float, ...]:
        return (self.z0, self.z1, self.c[1] - self.r[1], self.c[1] + self.r[1],
                self.c[0] - self.r[0], self.c[0] + self.r[0])

    def eval(self, Z: np.ndarray, Y: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rho = np.sqrt(((X - self.c[0]) / self.r[0]) ** 2 + ((Y - self.c[1]) / self.r[1]) ** 2)
        dzs = np.minimum(Z - self.z0, self.z1 - Z)
        depth = np.minimum((1.0 - rho) * min(self.r), dzs)
        return depth >= 0.0, depth


@dataclass(frozen=True)
class _Ring:
    """Elliptic annulus over a z range (vertebral arch around the spinal canal)."""

    c: tuple[float, float]
    r_in: float
    r_out: float
    z0: float
    z1: float

    def bbox(self) -> tuple[float, ...]:
        return (self.z0, self.z1, self.c[1] - self.r_out, self.c[1] + self.r_out,
                self.c[0] - self.r_out, self.c[0] + self.r_out)

    def eval(self, Z: np.ndarray, Y: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = np.sqrt((X - self.c[0]) ** 2 + (Y - self.c[1]) ** 2)
        depth = np.minimum(np.minimum(d - self.r_in, self.r_out - d),
                           np.minimum(Z - self.z0, self.z1 - Z))
        return depth >= 0.0, depth


@dataclass(frozen=True)
class _Shell:
    """Ellipsoidal shell of thickness ``t`` (skull), cut below ``z_cut``."""

    c: tuple[float, float, float]
    r: tuple[float, float, float]
    t: float
    z_cut: float

    def bbox(self) -> tuple[float, ...]:
        return (max(self.c[2] - self.r[2], self.z_cut), self.c[2] + self.r[2],
                self.c[1] - self.r[1], self.c[1] + self.r[1], self.c[0] - self.r[0], self.c[0] + self.r[0])

    def eval(self, Z: np.ndarray, Y: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rho = np.sqrt(((X - self.c[0]) / self.r[0]) ** 2 + ((Y - self.c[1]) / self.r[1]) ** 2
                      + ((Z - self.c[2]) / self.r[2]) ** 2)
        rm = (self.r[0] + self.r[1]) / 2.0
        depth = np.minimum((1.0 - rho) * rm, (rho - 1.0) * rm + self.t)
        depth = np.where(Z >= self.z_cut, depth, -1.0)
        return depth >= 0.0, depth


Primitive = _Ellipsoid | _Capsule | _Cylinder | _Ring | _Shell


class _Texture:
    """Smooth, zero-mean, roughly unit-variance random field: a sum of oblique plane waves.

    Each term is ``cos(kx x + ky y + p) * cos(kz z + q)`` with a random in-plane direction, so
    a term costs one 2D and one 1D cosine (cheap on 512 x 512 slabs) while the sum has no
    grid pattern. Defined on nominal coordinates, so slabs join seamlessly.
    """

    def __init__(self, rng: np.random.Generator, wavelength: tuple[float, float], terms: int = 6) -> None:
        k = 2 * np.pi / rng.uniform(*wavelength, size=terms)
        theta = rng.uniform(0, np.pi, size=terms)
        self.kx, self.ky = (k * np.cos(theta)).astype(np.float32), (k * np.sin(theta)).astype(np.float32)
        self.kz = (2 * np.pi / rng.uniform(*wavelength, size=terms)).astype(np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, size=(terms, 2)).astype(np.float32)
        self.norm = np.float32(math.sqrt(4.0 / terms))

    def __call__(self, Z: np.ndarray, Y: np.ndarray, X: np.ndarray) -> np.ndarray:
        out = None
        for kx, ky, kz, (p, q) in zip(self.kx, self.ky, self.kz, self.phase):
            term = np.cos(kx * X + ky * Y + p) * np.cos(kz * Z + q)
            out = term if out is None else out + term
        return out * self.norm


# ---------------------------------------------------------------------------------------
# the patient plan: every random choice is made here, before any voxel is computed
# ---------------------------------------------------------------------------------------


@dataclass
class _Bone:
    prim: Primitive
    code: int
    marrow: int = BONE
    cortex: float = 2.0  # cortical thickness, nominal mm (widened to ~1 voxel)


@dataclass
class _Tissue:
    prim: Primitive
    hu: float
    texture: float = 0.0  # amplitude of the soft-tissue texture
    in_lung: bool = False  # draw only inside the lungs (pulmonary vessels)
    outside_bone: bool = False


@dataclass
class _Lesion:
    prims: list[Primitive]
    hu: float
    diffuse: bool


@dataclass
class _Plan:
    frame: _Frame
    geometry: Geometry
    include_head: bool
    fat: float
    hu: dict[str, float]
    blur_xy: float
    noise_sd: float
    noise_seed: int
    tissues: list[_Tissue] = field(default_factory=list)
    bones: list[_Bone] = field(default_factory=list)
    islands: list[tuple[Primitive, float]] = field(default_factory=list)
    lesions: list[_Lesion] = field(default_factory=list)
    calcs: list[tuple[Primitive, float]] = field(default_factory=list)
    sites: list[tuple[float, int, Primitive]] = field(default_factory=list)  # weight, code, bone
    diffuse_sites: list[tuple[float, Primitive]] = field(default_factory=list)
    textures: dict[str, _Texture] = field(default_factory=dict)
    aorta: list[_Capsule] = field(default_factory=list)  # arterial segments (wall calcifications)
    levels: dict[str, tuple[float, ...]] = field(default_factory=dict)  # vertebra -> z0, z1, yc, ax, by, yk, canal
    cartilage: list[tuple[tuple[float, float, float], tuple[float, float, float]]] = field(default_factory=list)


# trunk outline (nominal mm) by z: half-width a, half-depth b, centre y
_TRUNK_Z = np.array([100, 130, 200, 300, 450, 600, 690, 725, 760, 800, 860, 900], np.float32)
_TRUNK_A = np.array([150, 165, 170, 150, 145, 150, 150, 120, 62, 55, 55, 55], np.float32)
_TRUNK_B = np.array([100, 105, 105, 105, 110, 105, 100, 85, 58, 55, 55, 55], np.float32)
_TRUNK_CY = np.array([5, 5, 0, 0, 0, 0, 0, 5, 15, 15, 15, 15], np.float32)

# vertebral levels from L5 upward: (name, body height, disc height, half-width, half-depth, canal radius)
_LEVELS = ([(f"L{i}", 27.0, 9.0, 25.0, 18.0, 10.0) for i in range(5, 0, -1)]
           + [(f"T{i}", 17.5, 5.5, 16.0 + i * 0.6, 13.0 + i * 0.4, 8.5) for i in range(12, 0, -1)]
           + [(f"C{i}", 13.0, 5.0, 11.0, 9.0, 8.0) for i in range(7, 0, -1)])
_L5_BOTTOM = 272.0


def _spine_y(z: float) -> float:
    """Vertebral-body centre y (mm, posterior positive): lordosis, kyphosis, cervical lordosis."""
    return float(np.interp(z, [270, 360, 450, 600, 700, 760, 860], [38, 32, 40, 50, 45, 28, 22]))


def _trunk(z: np.ndarray | float) -> tuple:
    return (np.interp(z, _TRUNK_Z, _TRUNK_A), np.interp(z, _TRUNK_Z, _TRUNK_B),
            np.interp(z, _TRUNK_Z, _TRUNK_CY))


def _plan(seed: int, shape: tuple[int, int, int], spacing: tuple[float, float, float],
          include_head: bool | None, lesion_free: bool | None) -> _Plan:
    rng = np.random.default_rng(seed)
    if include_head is None:
        include_head = bool(rng.random() < 1 / 3)
    if lesion_free is None:
        lesion_free = bool(rng.random() < 1 / 6)
    body_scale = float(rng.uniform(0.9, 1.03))
    frame, geometry = _make_frame(shape, spacing, body_scale, Z_TOP_HEAD if include_head else Z_TOP_TRUNK)
    contrast = float(rng.uniform(150, 300))
    hu = {
        "fat": float(rng.normal(-100, 8)), "muscle": float(rng.uniform(40, 55)),
        "lung": float(rng.uniform(-870, -800)), "contrast": contrast,
        "trabecular": float(rng.uniform(160, 280)), "cortex": float(rng.uniform(780, 1000)),
    }
    plan = _Plan(frame=frame, geometry=geometry, include_head=include_head,
                 fat=float(rng.uniform(8, 24)), hu=hu, blur_xy=float(rng.uniform(0.5, 1.0)),
                 noise_sd=float(rng.uniform(10, 25)), noise_seed=int(rng.integers(2**31)))
    plan.textures = {"soft": _Texture(rng, (30, 90)), "bone": _Texture(rng, (6, 16)),
                     "lesion": _Texture(rng, (4, 10)), "gut": _Texture(rng, (18, 45))}
    _plan_organs(plan, rng)
    _plan_spine(plan, rng)
    _plan_thorax_bones(plan, rng)
    _plan_pelvis_limbs(plan, rng)
    if include_head:
        skull = _Shell((0.0, 8.0, 962.0), (72.0, 90.0, 96.0), 7.0, 872.0)
        plan.tissues.append(_Tissue(_Ellipsoid((0.0, 8.0, 962.0), (66.0, 84.0, 90.0)), 35.0, 4.0))
        plan.bones.append(_Bone(skull, SKULL, BONE, 2.0))
        plan.sites.append((0.05, SKULL, skull))
    _plan_lookalikes(plan, rng)
    if not lesion_free:
        _plan_lesions(plan, rng)
    return plan


def _r(plan: _Plan, rx: float, ry: float, rz: float) -> tuple[float, float, float]:
    """Radii widened to the sampling floor so thin structures never fall between voxels."""
    f = plan.frame
    return (max(rx, f.floor_xy), max(ry, f.floor_xy), max(rz, f.floor_z))


def _plan_organs(plan: _Plan, rng: np.random.Generator) -> None:
    t = plan.tissues
    jitter = lambda s: float(rng.normal(0, s))  # noqa: E731 - tiny local helper
    c = plan.hu["contrast"]
    t.append(_Tissue(_Ellipsoid((-55 + jitter(5), -5.0, 440.0), (85.0, 72.0, 62.0)), rng.uniform(55, 65), 4))  # liver
    t.append(_Tissue(_Ellipsoid((80.0, 40.0, 455.0), (28.0, 40.0, 42.0), angle=0.5), rng.uniform(45, 55), 4))  # spleen
    for s in (-1, 1):  # kidneys (nephrographic contrast) with renal sinus fat
        t.append(_Tissue(_Ellipsoid((s * 62.0, 48.0, 385.0 + s * 8), (26.0, 22.0, 52.0), angle=s * 0.4), c * 0.7, 6))
        t.append(_Tissue(_Ellipsoid((s * 55.0, 42.0, 385.0 + s * 8), (8.0, 7.0, 20.0)), plan.hu["fat"]))
    t.append(_Tissue(_Ellipsoid((0.0, -35.0, 165.0), (40.0, 35.0, 32.0)), rng.uniform(5, 15)))  # bladder
    t.append(_Tissue(_Ellipsoid((0.0, 20.0, 125.0), (18.0, 16.0, 18.0)), rng.uniform(35, 45), 5))  # prostate
    t.append(_Tissue(_Ellipsoid((22.0, -28.0, 545.0), (58.0, 48.0, 52.0), angle=-0.5), 45.0, 3))  # heart
    t.append(_Tissue(_Ellipsoid((25.0, -30.0, 550.0), (34.0, 26.0, 34.0), angle=-0.5), c * 0.9, 4))  # blood pool
    # aorta: ascending, arch, descending anterior-left of the spine, iliac arteries
    ys = _spine_y
    aorta = [((8.0, -30.0, 570.0), 14.0), ((6.0, -30.0, 660.0), 14.0), ((14.0, 5.0, 690.0), 13.0),
             ((22.0, ys(650) - 30, 660.0), 12.0), ((20.0, ys(500) - 28, 500.0), 11.0),
             ((15.0, ys(400) - 32, 400.0), 10.0), ((8.0, ys(330) - 34, 330.0), 9.0)]
    iliac = [((8.0, ys(330) - 34, 330.0), 7.0), ((45.0, 5.0, 250.0), 6.0), ((72.0, -5.0, 175.0), 5.5)]
    chains = [aorta] + [[iliac[0]] + [((s * p[0], p[1], p[2]), r) for p, r in iliac[1:]] for s in (-1, 1)]
    for chain in chains:
        for (p0, r), (p1, _) in zip(chain[:-1], chain[1:]):
            cap = _Capsule(p0, p1, _r(plan, r, r, r))
            t.append(_Tissue(cap, c, 0.0))
            plan.aorta.append(cap)
    ivc = _Capsule((-24.0, ys(300) - 25, 300.0), (-20.0, ys(520) - 20, 520.0), _r(plan, 11, 11, 11))
    t.append(_Tissue(ivc, rng.uniform(60, 120), 2))
    # pulmonary vessels radiating from the hila
    for s in (-1, 1):
        hilum = (s * 45.0, 0.0, 600.0)
        for _ in range(14):
            direction = rng.normal(size=3) * (1.0, 1.0, 1.2)
            direction[0] = s * abs(direction[0]) + s * 0.5
            direction /= np.linalg.norm(direction)
            length = rng.uniform(40, 110)
            end = tuple(float(h + length * d) for h, d in zip(hilum, direction))
            r = rng.uniform(1.5, 4.5)
            t.append(_Tissue(_Capsule(hilum, end, _r(plan, r, r, r)), float(rng.uniform(40, c * 0.8)), in_lung=True))


def _plan_spine(plan: _Plan, rng: np.random.Generator) -> None:
    z = _L5_BOTTOM
    for name, h, disc, ax, by, canal in _LEVELS:
        yc = _spine_y(z + h / 2)
        z0, z1 = z, z + h
        body = _Cylinder((0.0, yc), (ax, by), z0, z1)
        plan.bones.append(_Bone(body, SPINE, BONE, 1.5))
        plan.sites.append((1.0 if name[0] in "LT" else 0.3, SPINE, body))
        plan.diffuse_sites.append((1.0 if name[0] in "LT" else 0.2, body))
        plan.tissues.append(_Tissue(_Cylinder((0.0, _spine_y(z1 + disc / 2)), (ax * 0.97, by * 0.97),
                                              z1, z1 + disc), 85.0, 3))  # intervertebral disc
        yk = yc + by + canal + 1.0  # spinal canal centre
        plan.tissues.append(_Tissue(_Cylinder((0.0, yk), (canal, canal), z0 - disc / 2, z1 + disc / 2), 20.0))
        arch = _Ring((0.0, yk), canal, canal + 6.0, z0 + 1.0, z1 - 1.0)
        plan.bones.append(_Bone(arch, SPINE, BONE, 2.0))
        room = float(_trunk(z0)[1] + _trunk(z0)[2]) - plan.fat - 6.0 - (yk + canal)  # stay under the skin fat
        spin_len = float(np.clip(room / 2.0, 4.0, 6.0 if name[0] == "C" else 10.0))
        spinous = _Ellipsoid((0.0, yk + canal + spin_len, (z0 + z1) / 2 - 3.0), _r(plan, spin_len + 2, 4.0, h / 2.2),
                             angle=math.pi / 2)
        plan.bones.append(_Bone(spinous, SPINE, BONE, 2.0))
        plan.sites.append((0.15, SPINE, spinous))
        for s in (-1, 1):
            reach = 22.0 if name[0] == "L" else 16.0 if name[0] == "T" else 10.0
            tp = _Ellipsoid((s * (canal + reach * 0.7), yk - 2.0 + (6.0 if name[0] == "T" else 0.0), (z0 + z1) / 2),
                            _r(plan, reach, 5.0, h / 3), angle=s * (0.3 if name[0] == "T" else 0.0))
            plan.bones.append(_Bone(tp, SPINE, BONE, 2.0))
        plan.levels[name] = (z0, z1, yc, ax, by, yk, canal)
        z = z1 + disc


def _plan_thorax_bones(plan: _Plan, rng: np.random.Generator) -> None:
    levels = plan.levels
    fat = plan.fat
    # ribs T1..T12 on both sides, costal cartilage for 1-7 to the sternum
    sternum_y = None
    for i in range(1, 13):
        z0, z1, yc, ax, by, yk, canal = levels[f"T{i}"]
        zi = (z0 + z1) / 2 + 4.0
        a, b, cy = (float(v) for v in _trunk(zi - 30))
        size = 0.55 + 0.45 * min(1.0, i / 4.0)
        cage_a, cage_b = (a - fat - 16) * size, (b - fat - 14)
        phi0 = math.asin(min(0.9, (canal + 14) / cage_a))
        phi_end = math.pi - 0.45 if i <= 7 else 2.2 if i <= 10 else 1.5
        drop = 35.0 + 8.0 * min(i, 7) if i <= 10 else 25.0
        n = 9
        phis = np.linspace(phi0, phi_end, n)
        for s in (-1, 1):
            pts = [(s * cage_a * math.sin(p), cy + cage_b * math.cos(p), zi - drop * (p - phi0) / math.pi)
                   for p in phis]
            pts[0] = (s * (canal + 10.0), yk - 2.0, zi + 2.0)
            for p0, p1 in zip(pts[:-1], pts[1:]):
                cap = _Capsule(p0, p1, _r(plan, 4.5, 4.5, 6.5))
                plan.bones.append(_Bone(cap, RIB, BONE, 1.5))
                plan.sites.append((0.03, RIB, cap))
            if i <= 7:  # costal cartilage to the sternum
                sternum_y = cy - cage_b + 8.0
                end = (s * 14.0, sternum_y, pts[-1][2] - 12.0)
                plan.bones.append(_Bone(_Capsule(pts[-1], end, _r(plan, 5.0, 5.0, 7.0)), OTHER, CARTILAGE, 0.0))
                plan.cartilage.append((pts[-1], end))
    a, b, cy = (float(v) for v in _trunk(640))
    sy = cy - (b - fat - 12.0)
    manubrium = _Cylinder((0.0, sy), (22.0, 7.0), 660.0, 712.0)
    body = _Cylinder((0.0, sy + 2.0), (15.0, 6.5), 545.0, 655.0)
    for st in (manubrium, body):
        plan.bones.append(_Bone(st, OTHER, BONE, 1.5))
        plan.sites.append((0.04, OTHER, st))
    # shoulder girdle and humeri (arms at the sides)
    for s in (-1, 1):
        plan.tissues.append(_Tissue(_Capsule((s * 168.0, 12.0, 700.0), (s * 176.0, 20.0, 380.0), (36.0, 36.0, 36.0)),
                                    plan.hu["muscle"], 5))
        clav = [(s * 16.0, sy - 4.0, 716.0), (s * 80.0, sy + 2.0, 728.0), (s * 150.0, -10.0, 722.0)]
        for p0, p1 in zip(clav[:-1], clav[1:]):
            cap = _Capsule(p0, p1, _r(plan, 7.0, 7.0, 7.0))
            plan.bones.append(_Bone(cap, UPPER, BONE, 2.0))
        scap = _Ellipsoid((s * 100.0, 82.0, 650.0), _r(plan, 55.0, 4.5, 70.0), angle=math.atan2(-0.5, s * 0.86),
                          bend=0.004)
        plan.bones.append(_Bone(scap, UPPER, BONE, 2.0))
        plan.sites.append((0.04, UPPER, scap))
        head = _Ellipsoid((s * 160.0, 12.0, 690.0), (24.0, 24.0, 26.0))
        shaft = _Capsule((s * 163.0, 13.0, 680.0), (s * 175.0, 20.0, 400.0), _r(plan, 12.0, 12.0, 12.0))
        plan.bones.append(_Bone(head, UPPER, BONE, 2.0))
        plan.bones.append(_Bone(shaft, UPPER, FATTY, 4.0))
        plan.sites.append((0.05, UPPER, head))
        plan.sites.append((0.03, UPPER, shaft))


def _plan_pelvis_limbs(plan: _Plan, rng: np.random.Generator) -> None:
    sacrum = _Ellipsoid((0.0, 68.0, 222.0), (46.0, 16.0, 50.0), shear=-0.45, taper=0.45)
    plan.bones.append(_Bone(sacrum, PELVIS, BONE, 1.5))
    plan.sites.append((0.5, PELVIS, sacrum))
    plan.diffuse_sites.append((0.4, sacrum))
    for s in (-1, 1):
        angle = math.atan2(-0.75, s * 0.66)  # posteromedial (SI joint) to anterolateral
        ilium = _Ellipsoid((s * 80.0, 28.0, 242.0), _r(plan, 66.0, 8.0, 58.0), angle=angle, bend=-s * 0.004)
        acetab = _Ellipsoid((s * 82.0, 5.0, 165.0), (30.0, 34.0, 36.0))
        pubis = _Capsule((s * 70.0, -22.0, 150.0), (s * 12.0, -62.0, 136.0), _r(plan, 9.0, 9.0, 12.0))
        ischium = _Capsule((s * 76.0, 24.0, 150.0), (s * 60.0, 44.0, 98.0), _r(plan, 13.0, 13.0, 13.0))
        for bone, w in ((ilium, 0.6), (acetab, 0.3), (pubis, 0.1), (ischium, 0.15)):
            plan.bones.append(_Bone(bone, PELVIS, BONE, 1.5 if bone is not ilium else 1.2))
            plan.sites.append((w, PELVIS, bone))
        plan.diffuse_sites.append((0.6, ilium))
        # femur: head in the acetabulum, neck, greater trochanter, shaft with fatty marrow
        fhead = _Ellipsoid((s * 90.0, 2.0, 152.0), (23.0, 23.0, 23.0))
        neck = _Capsule((s * 90.0, 2.0, 152.0), (s * 118.0, 8.0, 128.0), _r(plan, 14.0, 14.0, 14.0))
        troch = _Ellipsoid((s * 122.0, 10.0, 124.0), (18.0, 20.0, 22.0))
        shaft = _Capsule((s * 116.0, 12.0, 112.0), (s * 96.0, 18.0, -400.0), _r(plan, 14.0, 14.0, 14.0))
        for bone, marrow, cortex, w in ((fhead, BONE, 2.0, 0.15), (neck, BONE, 3.0, 0.1),
                                        (troch, BONE, 2.0, 0.1), (shaft, FATTY, 5.0, 0.1)):
            plan.bones.append(_Bone(bone, LOWER, marrow, cortex))
            plan.sites.append((w, LOWER, bone))


Point = tuple[float, float, float]


def _site_point(prim: Primitive, rng: np.random.Generator, spread: float = 0.55) -> tuple[Point, float]:
    """A random point well inside ``prim`` and the largest lesion radius that fits there."""
    if isinstance(prim, _Capsule):
        t = rng.random()
        p = [a + t * (b - a) for a, b in zip(prim.p0, prim.p1)]
        return (p[0], p[1], p[2]), min(prim.r[:2])
    if isinstance(prim, _Cylinder):
        u = rng.uniform(-spread, spread, 2)
        return ((prim.c[0] + u[0] * prim.r[0], prim.c[1] + u[1] * prim.r[1],
                 rng.uniform(prim.z0, prim.z1))), min(prim.r)
    if isinstance(prim, _Ring):
        a = rng.uniform(0, 2 * math.pi)
        d = (prim.r_in + prim.r_out) / 2
        point = (prim.c[0] + d * math.cos(a), prim.c[1] + d * math.sin(a), rng.uniform(prim.z0, prim.z1))
        return point, prim.r_out - prim.r_in
    if isinstance(prim, _Shell):
        v = rng.normal(size=3)
        v[2] = abs(v[2]) + 0.3
        v /= np.linalg.norm(v)
        k = 1.0 - prim.t / 2.0 / ((prim.r[0] + prim.r[1]) / 2)
        return tuple(float(c + k * r * d) for c, r, d in zip(prim.c, prim.r, v)), prim.t  # type: ignore[return-value]
    u, v, w = rng.uniform(-spread, spread, 3) * prim.r
    ca, sa = math.cos(prim.angle), math.sin(prim.angle)
    v += prim.bend * u * u
    return (prim.c[0] + ca * u - sa * v, prim.c[1] + sa * u + ca * v - prim.shear * w, prim.c[2] + w), min(prim.r[:2])


def _blob(plan: _Plan, rng: np.random.Generator, centre: tuple[float, float, float], radius: float,
          rz: float) -> list[Primitive]:
    """An irregular lesion: a main lobe and 1-3 smaller overlapping lobes."""
    prims: list[Primitive] = []
    for k in range(int(rng.integers(2, 5))):
        scale = 1.0 if k == 0 else rng.uniform(0.45, 0.8)
        offset = rng.normal(size=3) * np.array([radius, radius, rz]) * 0.5 * (k > 0)
        rr = np.array([radius, radius, rz]) * scale * rng.uniform(0.75, 1.25, 3)
        prims.append(_Ellipsoid(tuple(float(c + o) for c, o in zip(centre, offset)),  # type: ignore[arg-type]
                                _lesion_r(plan, rr), angle=float(rng.uniform(0, math.pi)),
                                wobble=(float(rng.uniform(0.1, 0.25)), float(rng.uniform(0, 6.3)),
                                        int(rng.integers(2, 5)))))
    return prims


def _lesion_r(plan: _Plan, r: Sequence[float]) -> tuple[float, float, float]:
    """Lesion radii, at least ~1.3 voxels in-plane and ~0.7 slice along z (visible when small)."""
    f = plan.frame
    return (max(r[0], 1.7 * f.floor_xy), max(r[1], 1.7 * f.floor_xy), max(r[2], 1.3 * f.floor_z))


def _pick(rng: np.random.Generator, weighted: Sequence[tuple]) -> tuple:
    w = np.array([x[0] for x in weighted], float)
    return weighted[int(rng.choice(len(weighted), p=w / w.sum()))]


def _in_scan(plan: _Plan, prim: Primitive) -> bool:
    """Whether a primitive's z range meets the scanned slices (so its lesions are visible)."""
    box = prim.bbox()
    return box[1] > plan.frame.z[0] and box[0] < plan.frame.z[-1]


def _plan_lesions(plan: _Plan, rng: np.random.Generator) -> None:
    sites = [site for site in plan.sites if _in_scan(plan, site[2])]
    diffuse_sites = [site for site in plan.diffuse_sites if _in_scan(plan, site[1])]
    n_focal = int(rng.integers(3, 13))
    for _ in range(n_focal):
        _, code, bone = _pick(rng, sites)
        centre, fit = _site_point(bone, rng)
        # 3-20 mm diameter on the output grid; wider than a thin bone it fills that bone's section
        radius_mm = float(rng.uniform(1.5, 10.0))
        radius = min(radius_mm / plan.frame.mm_xy, 1.5 * fit)
        rz = radius * plan.frame.mm_xy / plan.frame.mm_z
        hu = float(np.clip(rng.normal(690, 130), 480, 1000))
        plan.lesions.append(_Lesion(_blob(plan, rng, centre, radius, rz), hu, diffuse=False))
    # diffuse lesions: most of a vertebral body (1-2 levels) or of an iliac cross-section
    for _ in range(int(rng.random() < 0.7) + int(rng.random() < 0.25)):
        _, bone = _pick(rng, diffuse_sites)
        hu = float(np.clip(rng.normal(640, 80), 500, 850))
        wob = (float(rng.uniform(0.08, 0.18)), float(rng.uniform(0, 6.3)), int(rng.integers(3, 6)))
        if isinstance(bone, _Cylinder):
            levels = int(rng.integers(1, 3))
            h = (bone.z1 - bone.z0) * (levels - 0.1)
            prim: Primitive = _Ellipsoid((bone.c[0], bone.c[1] + rng.uniform(-2, 2), bone.z0 + h / 2),
                                         (bone.r[0] * 0.85, bone.r[1] * 0.85, h / 2), power=4, wobble=wob)
        else:
            ru, rv, rw = bone.r
            prim = _Ellipsoid((bone.c[0], bone.c[1], bone.c[2] + rng.uniform(-0.3, 0.3) * rw),
                              (ru * 0.6, rv * 1.2, rw * 0.45), angle=bone.angle, bend=bone.bend,
                              shear=bone.shear, power=4, wobble=wob)
        plan.lesions.append(_Lesion([prim], hu, diffuse=True))


def _plan_lookalikes(plan: _Plan, rng: np.random.Generator) -> None:
    # bone islands (enostoses): small, very dense, inside trabecular bone; not labelled
    for _ in range(int(rng.integers(1, 5))):
        hosts = [s for s in plan.sites if s[1] in (SPINE, PELVIS, LOWER, UPPER) and _in_scan(plan, s[2])]
        _, code, bone = _pick(rng, hosts)
        centre, fit = _site_point(bone, rng, spread=0.45)
        r = float(min(rng.uniform(1.5, 4.5), max(fit * 0.6, 1.5)))
        island = _Ellipsoid(centre, _r(plan, r, r * rng.uniform(0.7, 1.0), r))
        plan.islands.append((island, float(rng.uniform(1000, 1400))))
    # aortic and iliac wall calcifications: small bright plaques on the vessel wall
    for _ in range(int(rng.integers(3, 16))):
        cap = plan.aorta[int(rng.integers(len(plan.aorta)))]
        t = rng.random()
        p = np.array([a + t * (b - a) for a, b in zip(cap.p0, cap.p1)])
        axis = np.subtract(cap.p1, cap.p0)
        v = rng.normal(size=3)
        v -= axis * (v @ axis) / max(axis @ axis, 1e-9)
        v /= np.linalg.norm(v)
        centre = tuple(float(c) for c in p + v * cap.r[0] * 0.95)
        r = float(rng.uniform(1.5, 3.5))
        plan.calcs.append((_Ellipsoid(centre, _r(plan, r, r * 0.6, r)), float(rng.uniform(450, 1200))))
    # calcified costal cartilage (common in older men)
    for p0, p1 in plan.cartilage[:: max(1, int(rng.integers(2, 5)))]:
        t = rng.random()
        centre = tuple(float(a + t * (b - a)) for a, b in zip(p0, p1))
        plan.calcs.append((_Ellipsoid(centre, _r(plan, 3.0, 3.0, 4.0)), float(rng.uniform(300, 700))))


# ---------------------------------------------------------------------------------------
# rasterisation, one slab of slices at a time
# ---------------------------------------------------------------------------------------


class _Slab:
    """Float32 working arrays of slices ``[k0, k1)`` of a case."""

    def __init__(self, plan: _Plan, k0: int, k1: int) -> None:
        f = plan.frame
        self.plan, self.k0, self.k1 = plan, k0, k1
        self.Z = f.z[k0:k1, None, None]
        self.Y = f.y[None, :, None]
        self.X = f.x[None, None, :]
        shape = (k1 - k0, f.y.size, f.x.size)
        self.ct = np.full(shape, -1000.0, np.float32)
        self.depth = np.full(shape, -np.inf, np.float32)
        self.code = np.zeros(shape, np.uint8)
        self.marrow = np.zeros(shape, np.uint8)
        self.cortex = np.zeros(shape, np.float32)
        self.label = np.zeros(shape, bool)
        self.lung = np.zeros(shape, bool)

    def region(self, bbox: tuple[float, ...]):
        """Index slices and coordinates of the part of the slab inside a nominal bbox."""
        f = self.plan.frame
        z0, z1 = f.index_range(f.z, bbox[0], bbox[1])
        z0, z1 = max(z0, self.k0), min(z1, self.k1)
        y0, y1 = f.index_range(f.y, bbox[2], bbox[3])
        x0, x1 = f.index_range(f.x, bbox[4], bbox[5])
        if z0 >= z1 or y0 >= y1 or x0 >= x1:
            return None
        sl = (slice(z0 - self.k0, z1 - self.k0), slice(y0, y1), slice(x0, x1))
        return sl, (f.z[z0:z1, None, None], f.y[None, y0:y1, None], f.x[None, None, x0:x1])

    def rasterise(self) -> None:
        p = self.plan
        self._body()
        soft = p.textures["soft"]
        for tissue in p.tissues:
            reg = self.region(tissue.prim.bbox())
            if reg is None:
                continue
            sl, coords = reg
            inside, _ = tissue.prim.eval(*coords)
            if tissue.in_lung:
                inside &= self.lung[sl]
            val = tissue.hu + (tissue.texture * soft(*coords) if tissue.texture else 0.0)
            self.ct[sl] = np.where(inside, val, self.ct[sl])
        for bone in p.bones:
            reg = self.region(bone.prim.bbox())
            if reg is None:
                continue
            sl, coords = reg
            inside, depth = bone.prim.eval(*coords)
            win = inside & (depth > self.depth[sl])
            self.depth[sl] = np.where(win, depth, self.depth[sl])
            self.code[sl] = np.where(win, bone.code, self.code[sl])
            self.marrow[sl] = np.where(win, bone.marrow, self.marrow[sl])
            self.cortex[sl] = np.where(win, max(bone.cortex, p.frame.floor_xy * 1.1) if bone.cortex else 0.0,
                                       self.cortex[sl])
        self._bone_hu()
        for prim, hu in p.islands:
            self._paint(prim, hu, where="marrow")
        for lesion in p.lesions:
            for prim in lesion.prims:
                self._paint(prim, lesion.hu, where="lesion")
        for prim, hu in p.calcs:
            self._paint(prim, hu, where="any")

    def _body(self) -> None:
        p, Z, Y, X = self.plan, self.Z, self.Y, self.X
        a, b, cy = (np.asarray(v, np.float32) for v in _trunk(Z))
        trunk_on = Z >= 100.0
        rho = np.sqrt((X / a) ** 2 + ((Y - cy) / b) ** 2)
        body = trunk_on & (rho <= 1.0)
        inner = trunk_on & (np.sqrt((X / (a - p.fat)) ** 2 + ((Y - cy) / (b - p.fat * 0.8)) ** 2) <= 1.0)
        leg_r = np.interp(Z, [-400, 0, 100, 130], [52, 62, 70, 70]).astype(np.float32)
        for s in (-1, 1):
            d = np.sqrt((X - s * 98.0) ** 2 + (Y - 12.0) ** 2)
            leg = (Z < 135.0) & (d <= leg_r)
            body |= leg
            inner |= leg & (d <= leg_r - p.fat * 0.7)
        for s in (-1, 1):  # arms at the sides, shoulders
            body |= self._mask(_Capsule((s * 168.0, 12.0, 700.0), (s * 176.0, 20.0, 380.0), (42.0, 42.0, 42.0)))
        if p.include_head:
            head = self._mask(_Ellipsoid((0.0, 5.0, 955.0), (78.0, 98.0, 110.0)))
            body |= head
            inner |= head
        soft = p.textures["soft"](Z, Y, X)
        self.ct[...] = np.where(body, p.hu["fat"] + 6.0 * soft, -1000.0)
        self.ct[...] = np.where(inner, p.hu["muscle"] + 6.0 * soft, self.ct)
        # visceral fat and a little bowel gas in the abdomen and pelvis
        gut = p.textures["gut"](Z, Y, X)
        abdomen = inner & (Z > 130.0) & (Z < 470.0) & (np.sqrt((X / (a - p.fat - 15)) ** 2
                                                               + ((Y - cy + 10) / (b - p.fat - 30)) ** 2) <= 1.0)
        self.ct[...] = np.where(abdomen & (gut > 0.35), p.hu["fat"] + 8.0 * soft, self.ct)
        self.ct[...] = np.where(abdomen & (gut < -1.6), -950.0, self.ct)
        # lungs: two ellipsoids above domed diaphragms
        for s in (-1, 1):
            lung = self._mask(_Ellipsoid((s * 68.0, 8.0, 600.0), (58.0, 82.0, 150.0)))
            dome = 480.0 + 28.0 * (1.0 - ((X - s * 68.0) / 60.0) ** 2) + (6.0 if s < 0 else 0.0)
            lung &= (Z > dome) & ~((np.abs(X) < 30 + 15 * (Z < 560)) & (Y < 40))  # mediastinum
            self.lung |= lung
        self.ct[...] = np.where(self.lung, p.hu["lung"] + 25.0 * gut, self.ct)

    def _mask(self, prim: Primitive) -> np.ndarray:
        """Inside mask of ``prim`` over the whole slab, evaluated only within its bounding box."""
        mask = np.zeros(self.ct.shape, bool)
        reg = self.region(prim.bbox())
        if reg is not None:
            mask[reg[0]] = prim.eval(*reg[1])[0]
        return mask

    def _bone_hu(self) -> None:
        p = self.plan
        bone = self.code > 0
        if not bone.any():
            return
        tex = p.textures["bone"](self.Z, self.Y, self.X)
        cortex = bone & (self.depth < self.cortex)
        trab = np.float32(p.hu["trabecular"]) + 30.0 * tex
        marrow_hu = np.select([self.marrow == FATTY, self.marrow == CARTILAGE],
                              [-20.0 + 25.0 * tex, 150.0 + 25.0 * tex], trab)
        cort = np.clip(p.hu["cortex"] + 110.0 * tex, 600.0, 1200.0)
        self.ct[...] = np.where(cortex, cort, np.where(bone, marrow_hu, self.ct))

    def _paint(self, prim: Primitive, hu: float, where: str) -> None:
        reg = self.region(prim.bbox())
        if reg is None:
            return
        sl, coords = reg
        inside, _ = prim.eval(*coords)
        if where == "marrow":
            inside &= (self.code[sl] > 0) & (self.marrow[sl] != CARTILAGE) & (self.depth[sl] >= self.cortex[sl])
            val: np.ndarray | float = hu
        elif where == "lesion":
            inside &= (self.code[sl] > 0) & (self.marrow[sl] != CARTILAGE)
            val = np.clip(hu + 110.0 * self.plan.textures["lesion"](*coords), 400.0, 1200.0)
            self.label[sl] |= inside
        else:
            inside &= self.code[sl] == 0
            val = hu
        self.ct[sl] = np.where(inside, val, self.ct[sl])


def _noise_kernel_gain(sigma: float) -> float:
    impulse = np.zeros((15, 15), np.float64)
    impulse[7, 7] = 1.0
    return float(np.sqrt((ndimage.gaussian_filter(impulse, sigma) ** 2).sum()))


def _render(plan: _Plan, ct: np.ndarray, label: np.ndarray, bones: np.ndarray) -> None:
    """Fill the output arrays slab by slab (peak memory: a few float32 slabs)."""
    nz = ct.shape[0]
    sigma = (0.5, plan.blur_xy, plan.blur_xy)
    halo = int(4 * max(sigma) + 0.5) + 1
    gain = _noise_kernel_gain(0.6)
    for k0 in range(0, nz, SLAB_SLICES):
        k1 = min(nz, k0 + SLAB_SLICES)
        h0, h1 = max(0, k0 - halo), min(nz, k1 + halo)
        slab = _Slab(plan, h0, h1)
        slab.rasterise()
        core = slice(k0 - h0, k1 - h0)
        blurred = ndimage.gaussian_filter(slab.ct, sigma, mode="nearest")[core]
        rng = np.random.default_rng([plan.noise_seed, k0])
        noise = rng.standard_normal(blurred.shape, dtype=np.float32)
        noise = ndimage.gaussian_filter(noise, (0, 0.6, 0.6), mode="wrap") * np.float32(plan.noise_sd / gain)
        ct[k0:k1] = np.clip(np.rint(blurred + noise), HU_MIN, HU_MAX).astype(np.int16)
        label[k0:k1] = slab.label[core]
        bones[k0:k1] = slab.code[core]


# ---------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------


def _check_grid(shape: Sequence[int], spacing: Sequence[float]) -> tuple[tuple[int, int, int], Point]:
    if len(shape) != 3 or any(int(s) != s or s < 8 for s in shape):
        raise InputError(f"shape {tuple(shape)}: expected three integers Z,Y,X, each at least 8")
    if len(spacing) != 3 or any(not (0 < float(s) < 100) or not math.isfinite(float(s)) for s in spacing):
        raise InputError(f"spacing {tuple(spacing)}: expected three positive sizes X,Y,Z in mm (below 100)")
    return (int(shape[0]), int(shape[1]), int(shape[2])), (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def generate_case(seed: int, shape: Sequence[int] = DEFAULT_SHAPE, spacing: Sequence[float] = DEFAULT_SPACING, *,
                  include_head: bool | None = None, lesion_free: bool | None = None) -> PhantomCase:
    """Generate one synthetic patient, deterministically from ``seed``.

    Args:
        seed: random seed; the same seed, shape and spacing give identical arrays.
        shape: numpy shape ``(slices, rows, cols)``.
        spacing: voxel size in mm, ITK order ``(x, y, z)``.
        include_head: scan up to the skull vertex (None: about one case in three).
        lesion_free: place no lesions (None: about one case in six).

    Returns:
        The case: ``ct`` int16 HU, ``label`` uint8 0/1, ``bones`` uint8 codes, all
        ``(slices, rows, cols)``, and its geometry (origin at the in-plane centre).

    Raises:
        InputError: a shape or spacing that cannot hold the phantom.
    """
    shape_, spacing_ = _check_grid(shape, spacing)
    plan = _plan(int(seed), shape_, spacing_, include_head, lesion_free)
    ct = np.empty(shape_, np.int16)
    label = np.empty(shape_, np.uint8)
    bones = np.empty(shape_, np.uint8)
    _render(plan, ct, label, bones)
    return PhantomCase(ct=ct, label=label, bones=bones, geometry=plan.geometry,
                       include_head=plan.include_head, lesion_free=not label.any())


def case_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` of a cohort generated with ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def cohort_design(seed: int, cases: int) -> list[tuple[str, int, bool, bool]]:
    """Case id, case seed, include_head and lesion_free of each case of a cohort.

    About one case in six is lesion-free and one in three includes the head; cohorts of
    three or more cases have at least one of each, so small test cohorts cover both.
    """
    rng = np.random.default_rng([int(seed), 2**20])
    free = set(rng.choice(cases, size=max(1, round(cases / 6)) if cases >= 3 else 0, replace=False).tolist())
    head = set(rng.choice(cases, size=max(1, round(cases / 3)) if cases >= 3 else 0, replace=False).tolist())
    return [(f"case_{i:03d}", case_seed(seed, i), i in head, i in free) for i in range(cases)]


def generate_cohort(out: str | os.PathLike, *, cases: int = 8, seed: int = 0, shape: Sequence[int] = DEFAULT_SHAPE,
                    spacing: Sequence[float] = DEFAULT_SPACING, scale: str | None = None, overwrite: bool = False,
                    progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Write a synthetic cohort in the project's layout, one case at a time.

    Writes ``imagesTr/<case>_0000.nii.gz``, ``labelsTr/<case>.nii.gz``, ``bonesTr/<case>.nii.gz``
    and ``dataset.json`` (no ``splits.json``). The folder is built in a temporary sibling and
    moved into place when complete. Output files are byte-identical for the same arguments.

    Args:
        out: the dataset folder to create.
        cases: number of cases (patients), ids ``case_000``, ``case_001``, ...
        seed: cohort seed; case ``i`` uses :func:`case_seed` ``(seed, i)``.
        shape: numpy shape ``(slices, rows, cols)`` of every case.
        spacing: voxel size in mm, ITK order ``(x, y, z)``.
        scale: ``"paper"`` for paper-sized cases (:data:`PAPER_SHAPE`, :data:`PAPER_SPACING`),
            replacing ``shape`` and ``spacing``; None keeps them.
        overwrite: replace an existing non-empty ``out``.
        progress: called as ``progress(done, total, case_id)`` after each case is written.

    Returns:
        The dataset folder.

    Raises:
        InputError: bad arguments, or ``out`` exists and is not empty without ``overwrite``.
    """
    if scale is not None and scale not in SCALES:
        raise InputError(f"scale {scale!r}: expected one of {', '.join(SCALES)} or none")
    if scale == "paper":
        shape, spacing = PAPER_SHAPE, PAPER_SPACING
    shape_, spacing_ = _check_grid(shape, spacing)
    if int(cases) != cases or cases < 1:
        raise InputError(f"cases {cases!r}: expected a positive number of cases")
    design = cohort_design(seed, int(cases))
    with atomic_directory(out, overwrite=overwrite) as tmp:
        cohort = Cohort(tmp)
        for done, (case, cseed, head, free) in enumerate(design, start=1):
            pc = generate_case(cseed, shape_, spacing_, include_head=head, lesion_free=free)
            write_array(pc.ct, pc.geometry, cohort.image_path(case))
            write_array(pc.label, pc.geometry, cohort.label_path(case))
            write_array(pc.bones, pc.geometry, cohort.bones_path(case))
            log.debug("%s: %d lesion voxels, head=%s", case, int(pc.label.sum()), head)
            del pc
            if progress is not None:
                progress(done, len(design), case)
        write_dataset_json(tmp, len(design))
    return Path(out)
