"""A lesion the model missed, grown from the reader's click.

The rule (:func:`grow`), on the CT in HU:

1. the click (a point in LPS mm) goes to the voxel whose centre is nearest; a point outside the
   volume is refused;
2. a click on a voxel of a lesion already there (predicted, or added before) is refused: decide
   that lesion instead;
3. the seed is the clicked voxel when it is at least :data:`GROW_HU`, else the nearest such voxel
   within :data:`SEED_SEARCH_MM` that no lesion holds (ties: the brighter); none there is refused;
4. the lesion is the 26-connected component of the seed (the project's lesion connectivity,
   :func:`analysis.lesions.lesion_instances`) among the voxels that are at least :data:`GROW_HU`,
   lie within :data:`GROW_RADIUS_MM` of the seed (physical distance) and belong to no other lesion.

Every voxel of :data:`GROW_HU` or more is bone by the project's threshold (150 HU,
:data:`analysis.lesions.DEFAULT_BONE_HU`), so the lesion lies inside bone. The rule finds a sclerotic
(osteoblastic) lesion, the kind the phantom and the models' training data hold; a lytic lesion is
darker than its bone and is not grown by it (it is refused at step 3 unless it borders something
brighter).
"""
from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from analysis.imaging.io import Geometry

__all__ = ["GROW_HU", "GROW_RADIUS_MM", "SEED_SEARCH_MM", "GrowRefused", "Grown", "grow", "point_to_index",
           "encode_voxels", "decode_voxels"]

#: Lowest HU of a grown voxel: the lower end of untreated osteoblastic metastases, 654 +/- 176 HU
#: (Ulano et al., AJR 2016;207:362): mean - 1.5 SD = 390 HU, rounded to 400 HU. Trabecular bone
#: (150-300 HU) stays out; cortex (600-1200 HU) does not, hence the radius bound.
GROW_HU = 400.0
#: Farthest a grown voxel lies from the seed: focal metastases are 3-20 mm across (the phantom's
#: range, :mod:`analysis.cohort.phantom`); 15 mm covers one clicked anywhere in its inner half and
#: keeps a leak along cortex short.
GROW_RADIUS_MM = 15.0
#: How far from the click the seed may be (a click one voxel off a small lesion still grows it).
SEED_SEARCH_MM = 3.0


class GrowRefused(ValueError):
    """No lesion can be grown at the point (one line: why). ``lesion`` names the lesion the point is in."""

    def __init__(self, message: str, lesion: int | None = None) -> None:
        super().__init__(message)
        self.lesion = lesion


@dataclass(frozen=True)
class Grown:
    """A grown lesion: ``voxels`` flat indices into the ``(slices, rows, cols)`` volume, ascending;
    ``seed`` the ``(k, j, i)`` index it grew from; ``clicked`` the voxel nearest the click."""

    voxels: np.ndarray
    seed: tuple[int, int, int]
    clicked: tuple[int, int, int]


def point_to_index(point_mm: Sequence[float], geometry: Geometry) -> np.ndarray:
    """Continuous array index ``(k, j, i)`` (``(slices, rows, cols)``) of a point in LPS mm:
    the inverse of ITK's ``origin + direction @ (spacing * (x, y, z) index)``.

    >>> g = Geometry(size=(4, 4, 3), spacing=(0.5, 0.5, 2.0), origin=(-1.0, 0.0, 10.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    >>> point_to_index((0.0, 1.0, 14.0), g).tolist()
    [2.0, 2.0, 2.0]
    """
    d = np.asarray(geometry.direction, np.float64).reshape(3, 3)
    xyz = np.linalg.solve(d, np.asarray(point_mm, np.float64) - np.asarray(geometry.origin)) / np.asarray(geometry.spacing)
    return xyz[::-1]


def grow(ct: np.ndarray, geometry: Geometry, point_mm: Sequence[float], taken: np.ndarray, *,
         hu: float = GROW_HU, radius_mm: float = GROW_RADIUS_MM, seed_mm: float = SEED_SEARCH_MM) -> Grown:
    """Grow a lesion from a click by the module's rule.

    Args:
        ct: HU ``(slices, rows, cols)`` in the stored order of ``geometry``.
        geometry: the CT's geometry.
        point_mm: the click, ``(x, y, z)`` LPS mm.
        taken: lesion ids ``(slices, rows, cols)`` of the lesions already there (0: none).
        hu, radius_mm, seed_mm: the rule's constants.

    Returns:
        The grown lesion.

    Raises:
        GrowRefused: a point outside the volume, on a lesion already there (``lesion`` says
            which), or with no voxel of ``hu`` or more within ``seed_mm``.
    """
    from scipy import ndimage

    shape = np.array(ct.shape)
    index = point_to_index(point_mm, geometry)
    clicked = np.rint(index).astype(int)
    if not np.all(np.isfinite(index)) or np.any(clicked < 0) or np.any(clicked >= shape):
        raise GrowRefused(f"point {tuple(round(float(v), 1) for v in point_mm)} mm lies outside the CT")
    holder = int(taken[tuple(clicked)])
    if holder:
        raise GrowRefused(f"the point lies in lesion {holder}: decide that lesion instead", lesion=holder)
    spacing = np.asarray(geometry.spacing, np.float64)[::-1]  # (slices, rows, cols) order
    reach = np.ceil(radius_mm / spacing).astype(int) + 1
    lo = np.maximum(clicked - reach, 0)
    hi = np.minimum(clicked + reach + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    ct_box = np.asarray(ct[box], np.float64)
    free = taken[box] == 0
    grids = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij")
    near_click = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, clicked, spacing))
    candidates = (ct_box >= hu) & free & (near_click <= seed_mm ** 2)
    if not candidates.any():
        raise GrowRefused(f"no voxel of {hu:g} HU or more within {seed_mm:g} mm of the point: "
                          f"no sclerotic lesion there")
    order = np.lexsort((-ct_box[candidates], near_click[candidates]))  # nearest, then brightest
    seed = np.argwhere(candidates)[order[0]] + lo
    near_seed = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, seed, spacing))
    allowed = (ct_box >= hu) & free & (near_seed <= radius_mm ** 2)
    components, _ = ndimage.label(allowed, structure=np.ones((3, 3, 3), bool))
    region = components == components[tuple(seed - lo)]
    local = np.argwhere(region) + lo
    voxels = np.sort(np.ravel_multi_index(local.T, ct.shape))
    return Grown(voxels=voxels, seed=tuple(int(v) for v in seed), clicked=tuple(int(v) for v in clicked))


def encode_voxels(voxels: np.ndarray) -> str:
    """Ascending flat voxel indices as text for the journal: differences as little-endian uint32,
    zlib-compressed, base64.

    >>> decode_voxels(encode_voxels(np.array([3, 4, 5, 90]))).tolist()
    [3, 4, 5, 90]
    """
    flat = np.asarray(voxels, np.int64)
    steps = np.diff(flat, prepend=0).astype("<u4")
    return base64.b64encode(zlib.compress(steps.tobytes(), 9)).decode("ascii")


def decode_voxels(text: str) -> np.ndarray:
    """The flat voxel indices :func:`encode_voxels` wrote (int64)."""
    steps = np.frombuffer(zlib.decompress(base64.b64decode(text)), "<u4")
    return np.cumsum(steps.astype(np.int64))
