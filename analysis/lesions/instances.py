"""Lesion instances and their attributes: extent, volume, largest cross-section with its long and
short axis (the outline a report draws there), neighbours, bone identity, and diffuse versus focal
involvement.

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
from scipy.spatial import ConvexHull

__all__ = ["LesionTable", "lesion_instances", "lesion_table", "count_neighbours", "bone_identity",
           "CrossSection", "cross_sections", "bidirectional", "outline",
           "diffuse_fractions", "seg_lesion_centroids", "BONE_NAMES", "UNKNOWN", "WEIGHT_BEARING_CODES",
           "LOCATION_CATEGORIES", "DEFAULT_BONE_HU", "IN_PLANE_DILATION", "MIN_ON_BONE", "on_bone_fractions"]

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
#: A lesion with less than this share of its voxels on the bone map is "off bone": mostly where a
#: bone metastasis cannot be (the QC report's ``off bone`` flag, predict's ``lesions.csv`` column).
MIN_ON_BONE = 0.5


def on_bone_fractions(labels: np.ndarray, n: int, bone: np.ndarray) -> np.ndarray:
    """Each lesion's share of voxels on the bone map.

    Args:
        labels: ``(slices, rows, cols)`` lesion labels ``0..n`` (:func:`lesion_instances`).
        n: the number of lesions.
        bone: bool (or non-zero) bone voxels, same shape.

    Returns:
        float64 ``(n,)``, index ``id - 1``.

    Examples:
        >>> labels = np.array([[[1, 1, 0, 2]]])
        >>> on_bone_fractions(labels, 2, np.array([[[1, 0, 0, 0]]])).tolist()
        [0.5, 0.0]
    """
    inside = labels != 0
    voxels = np.bincount(labels[inside].ravel(), minlength=n + 1)[1:]
    on = np.bincount(labels[inside & (np.asarray(bone) != 0)].ravel(), minlength=n + 1)[1:]
    return on / np.maximum(voxels, 1)


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


# --- the largest cross-section of a lesion and its bidirectional measurement ---------------------

#: In-plane connectivity of the part of a cross-section that is outlined (4: pixels sharing an edge).
_EDGE = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class CrossSection:
    """A lesion's largest axial cross-section: where a reader measures it and where a report draws it.

    Coordinates are in-plane pixel coordinates ``(col, row)`` of slice ``z`` with ``(0, 0)`` the top
    left corner of the first pixel (a pixel's centre is at ``+0.5``): the convention of DICOM
    SCOORD (PS3.3 C.18.6.1.1).

    Attributes:
        z: slice index (array axis 0) holding the most lesion pixels; ties: the lowest index.
        pixels: the lesion's pixels in slice ``z``.
        long_axis_mm: the maximum Feret diameter of those pixels (the squares, not their centres).
        short_axis_mm: the longest extent of those pixels along a line perpendicular to the long axis.
        long_axis, short_axis: their end points ``((col, row), (col, row))``.
        outline: ``(k, 2)`` closed ring (its first point repeated last) along pixel edges around the
            largest 4-connected part of those pixels, holes filled; the other parts, if any, are
            not outlined (a closed polyline draws one region).
    """

    z: int
    pixels: int
    long_axis_mm: float
    short_axis_mm: float
    long_axis: tuple[tuple[float, float], tuple[float, float]]
    short_axis: tuple[tuple[float, float], tuple[float, float]]
    outline: np.ndarray


def _pixel_corners(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``(4 * n, 2)``: the four corners ``(col, row)`` of each pixel."""
    c = cols[:, None] + np.array([0, 1, 1, 0])
    r = rows[:, None] + np.array([0, 0, 1, 1])
    return np.stack([c.ravel(), r.ravel()], axis=1).astype(np.float64)


def outline(pixels: np.ndarray) -> np.ndarray:
    """The boundary, along pixel edges, of the largest 4-connected part of a slice's pixels with its
    holes filled: a closed ring of ``(col, row)`` corners (first point repeated last), clockwise as
    the image is shown (rows downwards), one point per corner where the boundary turns.

    Filling the holes (``scipy.ndimage.binary_fill_holes``, background 4-connected) leaves a part
    whose boundary is one simple ring, so each corner is left by one edge. The pixels whose
    centres lie inside the ring (even-odd rule) are exactly that part.

    Args:
        pixels: ``(rows, cols)`` bool, at least one True.

    Returns:
        ``(k, 2)`` float64.

    Raises:
        ValueError: an empty slice.

    Examples:
        >>> ring = outline(np.array([[0, 1, 1], [0, 1, 0]], bool))
        >>> ring.tolist()
        [[1.0, 0.0], [3.0, 0.0], [3.0, 1.0], [2.0, 1.0], [2.0, 2.0], [1.0, 2.0], [1.0, 0.0]]
    """
    parts, n = ndimage.label(pixels, structure=_EDGE)
    if n == 0:
        raise ValueError("outline: the slice has no lesion pixel")
    part = ndimage.binary_fill_holes(parts == 1 + int(np.argmax(np.bincount(parts.ravel())[1:])))
    padded = np.pad(part, 1)
    rows, cols = np.nonzero(part)
    step: dict[tuple[int, int], tuple[int, int]] = {}
    # each edge with the part on its right: the top edge left to right, the right one downwards, ...
    for dr, dc, start, end in ((-1, 0, (0, 0), (1, 0)), (0, 1, (1, 0), (1, 1)), (1, 0, (1, 1), (0, 1)),
                               (0, -1, (0, 1), (0, 0))):
        open_side = ~padded[rows + 1 + dr, cols + 1 + dc]
        for r, c in zip(rows[open_side].tolist(), cols[open_side].tolist()):
            step[(c + start[0], r + start[1])] = (c + end[0], r + end[1])
    first = min(step)
    ring = [first]
    point = step[first]
    while point != first:
        ring.append(point)
        point = step[point]
    points = np.asarray(ring, np.float64)
    before, after = points - np.roll(points, 1, axis=0), np.roll(points, -1, axis=0) - points
    turns = points[before[:, 0] * after[:, 1] != before[:, 1] * after[:, 0]]
    return np.concatenate([turns, turns[:1]])


def _perpendicular_extent(lo: np.ndarray, hi: np.ndarray, u: np.ndarray, offsets: np.ndarray) -> tuple[float, ...]:
    """The longest extent of the union of the boxes ``[lo, hi]`` (mm, ``(m, 2)``) along a line
    ``{p : p . u = s}``, over the offsets ``s``: ``(extent, s, t_first, t_last)``, the line's points
    being ``s u + t v`` with ``v`` = ``u`` turned by 90 degrees."""
    v = np.array([-u[1], u[0]])
    best = (-1.0, 0.0, 0.0, 0.0)
    parallel = np.abs(v) < 1e-12
    for chunk in np.array_split(offsets, max(1, offsets.size // 256)):
        base = chunk[:, None, None] * u                                   # (k, 1, 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            t0, t1 = (lo[None] - base) / v, (hi[None] - base) / v         # (k, m, 2)
        enter, leave = np.minimum(t0, t1), np.maximum(t0, t1)
        if parallel.any():  # the line runs along an axis: inside that slab everywhere, or nowhere
            within = (lo[None] - 1e-9 <= base) & (base <= hi[None] + 1e-9)
            enter = np.where(parallel, np.where(within, -np.inf, np.inf), enter)
            leave = np.where(parallel, np.where(within, np.inf, -np.inf), leave)
        start, stop = enter.max(axis=2), leave.min(axis=2)                # (k, m): each box's stretch
        hit = start <= stop + 1e-9
        first = np.where(hit, start, np.inf).min(axis=1)
        last = np.where(hit, stop, -np.inf).max(axis=1)
        k = int(np.argmax(last - first))
        if last[k] - first[k] > best[0] + 1e-12:
            best = (float(last[k] - first[k]), float(chunk[k]), float(first[k]), float(last[k]))
    return best


def bidirectional(pixels: np.ndarray, pixel_spacing_mm: tuple[float, float]) -> tuple[float, float, tuple, tuple]:
    """The long and short axis of a lesion's cross-section in one slice, in mm: the bidirectional
    measurement of RECIST 1.1's axial plane (Eisenhauer et al., Eur J Cancer 2009;45:228-247) and
    of the WHO criteria before it (longest diameter and the longest diameter perpendicular to it).

    - long axis: the maximum Feret diameter, the largest distance between two points of the
      pixels taken as squares (the largest distance between two corners of their convex hull);
    - short axis: among the lines perpendicular to the long axis, the longest extent of the pixels
      along one (from the first to the last lesion point on the line). Its maximum lies on a line
      through a corner (the extent is piecewise linear between such lines), so those are tried.

    Args:
        pixels: ``(rows, cols)`` bool, at least one True.
        pixel_spacing_mm: ``(between rows, between columns)`` mm, DICOM PixelSpacing's order.

    Returns:
        ``(long_mm, short_mm, long_axis, short_axis)``, the axes as end points ``(col, row)``.

    Examples:
        A 3 x 5 rectangle: the long axis is its diagonal, the short axis the chord through its
        centre perpendicular to the diagonal (3 x diagonal / 5):

        >>> m = np.zeros((6, 8), bool)
        >>> m[1:4, 2:7] = True
        >>> long_mm, short_mm, _, _ = bidirectional(m, (1.0, 1.0))
        >>> round(long_mm, 4), round(float(np.sqrt(34)), 4), round(short_mm, 4), round(3 * float(np.sqrt(34)) / 5, 4)
        (5.831, 5.831, 3.4986, 3.4986)
    """
    row_mm, col_mm = (float(s) for s in pixel_spacing_mm)
    scale = np.array([col_mm, row_mm])
    rows, cols = np.nonzero(pixels)
    corners = _pixel_corners(rows, cols) * scale
    hull = corners[ConvexHull(corners).vertices]
    distance = np.linalg.norm(hull[:, None, :] - hull[None, :, :], axis=2)
    i, j = np.unravel_index(int(np.argmax(distance)), distance.shape)
    a, b = sorted([tuple(hull[i]), tuple(hull[j])])
    a, b = np.asarray(a), np.asarray(b)
    long_mm = float(np.linalg.norm(b - a))
    u = (b - a) / long_mm
    # the first and the last lesion point on a line lie on the edge pixels (a 4-neighbour outside)
    edge = pixels & ~ndimage.binary_erosion(pixels, structure=_EDGE, border_value=0)
    er, ec = np.nonzero(edge)
    lo = np.stack([ec * col_mm, er * row_mm], axis=1).astype(np.float64)
    offsets = np.unique(np.round(_pixel_corners(er, ec) * scale @ u, 9))
    short_mm, s, t0, t1 = _perpendicular_extent(lo, lo + scale, u, offsets)
    v = np.array([-u[1], u[0]])

    def pixel(p: np.ndarray) -> tuple[float, float]:
        return float(p[0] / col_mm), float(p[1] / row_mm)

    return long_mm, short_mm, (pixel(a), pixel(b)), (pixel(s * u + t0 * v), pixel(s * u + t1 * v))


def cross_sections(labels: np.ndarray, table: LesionTable, *,
                   pixel_spacing_mm: tuple[float, float]) -> list[CrossSection]:
    """Each lesion's largest cross-section along array axis 0 (:class:`CrossSection`).

    Args:
        labels: ``(slices, rows, cols)`` lesion labels ``1..n``.
        table: their :class:`LesionTable` (bounding boxes).
        pixel_spacing_mm: ``(between rows, between columns)`` mm.

    Returns:
        One :class:`CrossSection` per lesion, in id order.
    """
    out = []
    for i, (zs, ys, xs) in enumerate(table.boxes):
        inside = labels[zs, ys, xs] == i + 1
        areas = inside.sum(axis=(1, 2))
        k = int(np.argmax(areas))
        pixels = inside[k]
        long_mm, short_mm, long_axis, short_axis = bidirectional(pixels, pixel_spacing_mm)
        shift = np.array([xs.start, ys.start], np.float64)

        def moved(axis: tuple) -> tuple:
            return tuple((p[0] + xs.start, p[1] + ys.start) for p in axis)

        out.append(CrossSection(z=zs.start + k, pixels=int(areas[k]), long_axis_mm=long_mm, short_axis_mm=short_mm,
                                long_axis=moved(long_axis), short_axis=moved(short_axis),
                                outline=outline(pixels) + shift))
    return out


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
