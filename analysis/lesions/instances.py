"""Lesion instances and their attributes: extent, volume, neighbours, bone identity, and
diffuse versus focal involvement.

Lesions are 3D connected components of a binary mask ``(slices, rows, cols)``
(26-connectivity by default, as in BraTS 2023 and panoptica; autoPET uses 18).
Lesion ids are the component labels ``1..N`` in cc3d's raster order, so they are
deterministic for a given mask.

Everything here works on whole label volumes with vectorised numpy (``bincount``,
``unique`` over label pairs, ``find_objects`` bounding boxes); per-lesion work only
touches a lesion's bounding box. How two sets of lesions overlap is :mod:`analysis.lesions.overlap`,
how a lesion changed between two scans :mod:`analysis.lesions.change`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import cc3d
import numpy as np
from scipy import ndimage

__all__ = ["LesionTable", "lesion_instances", "lesion_table", "count_neighbours", "bone_identity",
           "diffuse_fractions", "seg_lesion_centroids", "BONE_NAMES", "UNKNOWN", "WEIGHT_BEARING_CODES",
           "LOCATION_CATEGORIES", "DEFAULT_BONE_HU", "IN_PLANE_DILATION"]

#: Paper's words for the ``bonesTr`` codes (see ``analysis.cohort.layout.BONE_CODES``).
#: Upper and lower extremity (5, 6) are both "extremity"; 7 is "other".
BONE_NAMES: dict[int, str] = {1: "skull", 2: "spine", 3: "rib", 4: "pelvis", 5: "extremity",
                              6: "extremity", 7: "other"}
UNKNOWN = "unknown"
#: Location categories of the clinical task (one-vs-rest), in the paper's words.
LOCATION_CATEGORIES = ("skull", "spine", "rib", "pelvis", "extremity")
#: Weight-bearing bones: spine, pelvis, lower extremity.
WEIGHT_BEARING_CODES = frozenset({2, 4, 6})
#: Without a ``bonesTr`` map, voxels with CT >= this many HU count as bone for the
#: diffuse/focal rule. 150 HU sits below aged trabecular bone (~226 HU at < 30 y down to
#: ~89 HU at 90 y, Jang/Pickhardt, Radiology 2019: the lowest values are missed) and
#: above soft tissue (+40 to +80 HU); cortical bone is +400 to +1000 HU.
DEFAULT_BONE_HU = 150.0
#: Fallback for bone identity: chessboard (8-neighbour) dilation by this many voxels in-plane.
IN_PLANE_DILATION = 2


def lesion_instances(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Split a binary mask into 3D connected components.

    Args:
        mask: ``(slices, rows, cols)``, non-zero is lesion.
        connectivity: 6, 18 or 26 (face, edge, corner neighbours).

    Returns:
        ``(labels, n)``: an unsigned integer volume of the mask's shape with 0 for
        background and ``1..n`` for the lesions, and the lesion count.

    Raises:
        ValueError: a mask that is not 3D or an unsupported connectivity.

    Examples:
        Two voxels touching at a corner are one lesion at 26-connectivity, two at 6:

        >>> mask = np.zeros((1, 3, 5), np.uint8)
        >>> mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 2, 4] = 1
        >>> labels, n = lesion_instances(mask)
        >>> n
        2
        >>> labels[0].tolist()
        [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 2]]
        >>> lesion_instances(mask, connectivity=6)[1]
        3
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"expected a (slices, rows, cols) mask, got shape {mask.shape}")
    if connectivity not in (6, 18, 26):
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    binary = mask != 0
    if min(binary.shape) < 2:
        # cc3d 4.1 raises "maximum length exception" at 26-connectivity when two axes have
        # length 1 (e.g. shape (1, 1, 3)); zero padding to length 2 keeps the components.
        padded = np.pad(binary, [(0, 1 if d < 2 else 0) for d in binary.shape])
        labels, n = cc3d.connected_components(padded, connectivity=connectivity, return_N=True)
        return np.ascontiguousarray(labels[tuple(slice(0, d) for d in binary.shape)]), int(n)
    labels, n = cc3d.connected_components(binary, connectivity=connectivity, return_N=True)
    return labels, int(n)


@dataclass
class LesionTable:
    """Per-lesion attributes of one mask, one entry per lesion id ``1..n`` (index ``id - 1``).

    Attributes:
        z_first, z_last: first and last axial slice index (axis 0) of each lesion.
        voxels: voxel count; ``volume_ml`` = voxels x voxel volume (mm^3) / 1000.
        boxes: bounding boxes as tuples of slices (as ``scipy.ndimage.find_objects`` gives).
    """

    z_first: np.ndarray
    z_last: np.ndarray
    voxels: np.ndarray
    volume_ml: np.ndarray
    boxes: list[tuple[slice, slice, slice]]

    @property
    def n(self) -> int:
        return len(self.voxels)


def lesion_table(labels: np.ndarray, n: int, *, spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> LesionTable:
    """Extent and size of each lesion of a label volume.

    Args:
        labels: ``(slices, rows, cols)`` labels ``0..n`` from :func:`lesion_instances`.
        n: number of lesions.
        spacing_mm: voxel size in mm (any order: only the product is used).

    Returns:
        The :class:`LesionTable`.
    """
    # Work on the lesion voxels only (a few per mille of a CT): one pass to find them,
    # then per-label min/max by sorting, instead of full-volume find_objects/bincount.
    flat = np.flatnonzero(labels)
    ids = labels.ravel()[flat].astype(np.int64)
    voxels = np.bincount(ids, minlength=n + 1)[1:n + 1].astype(np.int64)
    if ids.size and voxels.min() == 0:
        raise ValueError("labels must be consecutive 1..n (every id present), as from lesion_instances")
    order = np.argsort(ids, kind="stable")
    starts = np.r_[0, np.cumsum(voxels)[:-1]] if n else np.zeros(0, np.int64)
    coords = np.unravel_index(flat[order], labels.shape)
    lows = [np.minimum.reduceat(c, starts) if n else np.zeros(0, np.int64) for c in coords]
    highs = [np.maximum.reduceat(c, starts) if n else np.zeros(0, np.int64) for c in coords]
    boxes = [tuple(slice(int(lo[i]), int(hi[i]) + 1) for lo, hi in zip(lows, highs)) for i in range(n)]
    z_first, z_last = lows[0].astype(np.int64), highs[0].astype(np.int64)
    volume = voxels * (float(np.prod(spacing_mm)) / 1000.0)
    return LesionTable(z_first, z_last, voxels, volume, list(boxes))


def count_neighbours(z_first: np.ndarray, z_last: np.ndarray, cluster_slices: int = 10) -> np.ndarray:
    """Spatial clustering: for each lesion, the number of other lesions within ``cluster_slices``.

    Two lesions are neighbours when the gap between their slice ranges,
    ``max(0, other.z_first - this.z_last, this.z_first - other.z_last)``, is at most
    ``cluster_slices`` (so overlapping ranges have gap 0). The relation is symmetric.

    Args:
        z_first, z_last: per-lesion first and last slice indices (same length).
        cluster_slices: largest gap, in slices, that still counts as a neighbour.

    Returns:
        int64 array of neighbour counts.

    Examples:
        Slices 0-3 and 5-8 are 2 slices apart; 30-31 is 22 slices from its nearest:

        >>> count_neighbours(np.array([0, 5, 30]), np.array([3, 8, 31]), cluster_slices=10).tolist()
        [1, 1, 0]
        >>> count_neighbours(np.array([0, 5, 30]), np.array([3, 8, 31]), cluster_slices=1).tolist()
        [0, 0, 0]
    """
    a = np.asarray(z_first, dtype=np.int64)
    b = np.asarray(z_last, dtype=np.int64)
    gap = np.maximum(0, np.maximum(a[None, :] - b[:, None], a[:, None] - b[None, :]))
    near = gap <= cluster_slices
    np.fill_diagonal(near, False)
    return near.sum(axis=1).astype(np.int64)


def _argmax_codes(lesion_ids: np.ndarray, codes: np.ndarray, n: int) -> np.ndarray:
    """Most frequent non-zero code per lesion id (ties: lower code); 0 where none."""
    keep = codes != 0
    ids, codes = lesion_ids[keep].astype(np.int64), codes[keep].astype(np.int64)
    out = np.zeros(n, np.int64)
    if ids.size == 0:
        return out
    ncode = int(codes.max()) + 1
    pairs, counts = np.unique(ids * ncode + codes, return_counts=True)
    pid, pcode = pairs // ncode, pairs % ncode
    order = np.lexsort((pcode, -counts, pid))
    first = order[np.r_[True, pid[order][1:] != pid[order][:-1]]]
    out[pid[first] - 1] = pcode[first]
    return out


def bone_identity(labels: np.ndarray, table: LesionTable, bones: np.ndarray | None) -> tuple[list[str], np.ndarray]:
    """The bone each lesion lies in, in the paper's words, and whether it is weight-bearing.

    Rule: the most frequent non-zero ``bonesTr`` code under the lesion (ties: lower code);
    if there is none, the most frequent non-zero code under the lesion dilated by
    :data:`IN_PLANE_DILATION` voxels in-plane (8-neighbour steps within each slice, never
    across slices); otherwise ``unknown``. Without a bone map every lesion is ``unknown``.
    Names: skull (1), spine (2), rib (3), pelvis (4), extremity (5 upper, 6 lower),
    other (7). Weight-bearing: spine, pelvis or lower extremity (codes 2, 4, 6).

    Args:
        labels: ``(slices, rows, cols)`` lesion labels.
        table: the lesions' :class:`LesionTable` (bounding boxes).
        bones: ``(slices, rows, cols)`` integer bone codes, or None.

    Returns:
        ``(names, weight_bearing)``: one name and one bool per lesion.
    """
    n = table.n
    if bones is None or n == 0:
        return [UNKNOWN] * n, np.zeros(n, bool)
    inside = labels != 0
    codes = _argmax_codes(labels[inside], bones[inside], n)
    r = IN_PLANE_DILATION
    structure = np.zeros((1, 2 * r + 1, 2 * r + 1), bool)
    structure[0] = True
    for i in np.flatnonzero(codes == 0):
        zs, ys, xs = table.boxes[i]
        ys = slice(max(ys.start - r, 0), ys.stop + r)
        xs = slice(max(xs.start - r, 0), xs.stop + r)
        grown = ndimage.binary_dilation(labels[zs, ys, xs] == i + 1, structure=structure)
        found = bones[zs, ys, xs][grown]
        found = found[found != 0]
        if found.size:
            vals, counts = np.unique(found, return_counts=True)
            codes[i] = vals[np.argmax(counts)]
    names = [BONE_NAMES.get(int(c), UNKNOWN) for c in codes]
    return names, np.isin(codes, list(WEIGHT_BEARING_CODES))


def diffuse_fractions(labels: np.ndarray, n: int, bone: np.ndarray) -> np.ndarray:
    """Largest per-slice fraction of its bone region that each lesion occupies.

    In every slice, the bone region a lesion touches is the union of the 8-connected 2D
    components of (bone or any lesion) pixels that contain pixels of that lesion; the
    slice's fraction is the lesion's pixels there divided by that region's pixels. A
    lesion is diffuse when its largest fraction reaches the threshold (0.6 by default,
    see :func:`analysis.evaluation.analyze.run_analysis`), focal otherwise.

    Args:
        labels: ``(slices, rows, cols)`` lesion labels ``0..n``.
        n: lesion count.
        bone: ``(slices, rows, cols)`` bool bone pixels (from ``bonesTr`` or a HU threshold).

    Returns:
        float64 array, one largest fraction in ``(0, 1]`` per lesion.
    """
    best = np.zeros(n, np.float64)
    if n == 0:
        return best
    # One small 2D labelling per lesion slice (cc3d, 8-connectivity); faster here than one
    # 3D call on the stacked slices, and memory stays at one slice.
    for z in np.flatnonzero((labels != 0).any(axis=(1, 2))):
        lab = labels[z]
        on = lab != 0
        comps = cc3d.connected_components(on | bone[z], connectivity=8)
        ids = lab[on].astype(np.int64)
        cs = comps[on].astype(np.int64)
        lesion_px = np.bincount(ids, minlength=n + 1)
        comp_px = np.bincount(comps.ravel())
        ncomp = comp_px.size
        pairs = np.unique(ids * ncomp + cs)          # distinct (lesion, component) pairs
        pid, pc = pairs // ncomp, pairs % ncomp
        region = np.bincount(pid, weights=comp_px[pc], minlength=n + 1)
        present = np.flatnonzero(lesion_px[1:]) + 1
        best[present - 1] = np.maximum(best[present - 1], lesion_px[present] / region[present])
    return best


def seg_lesion_centroids(seg_path: str | os.PathLike) -> list[tuple[float, float, float]]:
    """Centroid (patient LPS mm) of each 26-connected lesion of a DICOM SEG, from its frames'
    geometry (:func:`analysis.imaging.dicom_seg.read_seg_volume`; all segments combined).

    Args:
        seg_path: a DICOM SEG file.

    Returns:
        ``(x, y, z)`` per lesion, in order of each lesion's first voxel along (slice, row, col).

    Raises:
        InputError: not a readable SEG.
    """
    from analysis.imaging.dicom_seg import read_seg_volume

    seg = read_seg_volume(seg_path)
    labels, n = lesion_instances(seg.mask, connectivity=26)
    flat = labels.ravel()
    nonzero = np.flatnonzero(flat)
    first_voxel = {int(lab): int(idx) for lab, idx in zip(*np.unique(flat[nonzero], return_index=True))}
    out = []
    for lesion in sorted(range(1, n + 1), key=lambda lab: nonzero[first_voxel[lab]]):
        k, i, j = np.nonzero(labels == lesion)
        out.append(tuple(float(v) for v in seg.points(k, i, j).mean(axis=0)))
    return out  # type: ignore[return-value]
