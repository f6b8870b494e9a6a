"""Lesion instances and their attributes: extent, volume, neighbours, matching,
bone identity, and diffuse versus focal involvement.

Lesions are 3D connected components of a binary mask ``(slices, rows, cols)``
(26-connectivity by default, as in BraTS 2023 and panoptica; autoPET uses 18).
Lesion ids are the component labels ``1..N`` in cc3d's raster order, so they are
deterministic for a given mask.

Everything here works on whole label volumes with vectorised numpy (``bincount``,
``unique`` over label pairs, ``find_objects`` bounding boxes); per-lesion work only
touches a lesion's bounding box.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import cc3d
import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["LesionTable", "lesion_instances", "lesion_table", "count_neighbours", "match_lesions",
           "bone_identity", "diffuse_fractions", "BONE_NAMES", "WEIGHT_BEARING_CODES",
           "LOCATION_CATEGORIES", "DEFAULT_BONE_HU", "IN_PLANE_DILATION", "CHANGE_CODES", "change_status",
           "DEFAULT_CHANGE", "DEFAULT_MIN_CHANGE_ML", "Group", "group_lesions"]

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


def match_lesions(gt_labels: np.ndarray, n_gt: int, pred_labels: np.ndarray, n_pred: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Match predicted to ground-truth lesions by shared voxels.

    A predicted lesion matches a ground-truth lesion when they share at least one voxel
    (the BraTS/autoPET/MedPy hit rule). A ground-truth lesion's match is the overlapping
    predicted lesion with the most shared voxels, and a predicted lesion's is the
    overlapping ground-truth lesion with the most shared voxels; ties go to the lower id.

    Args:
        gt_labels, pred_labels: label volumes of one shape (0 = background).
        n_gt, n_pred: their lesion counts.

    Returns:
        ``(gt_match, gt_shared, pred_match)``: for each ground-truth lesion the id of its
        predicted match (0 = none) and the shared voxel count; for each predicted lesion
        the id of its ground-truth match (0 = overlaps no ground-truth lesion).
    """
    both = (gt_labels != 0) & (pred_labels != 0)
    g = gt_labels[both].astype(np.int64)
    p = pred_labels[both].astype(np.int64)
    gt_match = np.zeros(n_gt, np.int64)
    gt_shared = np.zeros(n_gt, np.int64)
    pred_match = np.zeros(n_pred, np.int64)
    if g.size == 0:
        return gt_match, gt_shared, pred_match
    pairs, counts = np.unique(g * (n_pred + 1) + p, return_counts=True)
    pg, pp = pairs // (n_pred + 1), pairs % (n_pred + 1)
    # best partner per gt lesion: sort by (gt, -count, pred) and keep the first of each gt
    order = np.lexsort((pp, -counts, pg))
    first = order[np.r_[True, pg[order][1:] != pg[order][:-1]]]
    gt_match[pg[first] - 1] = pp[first]
    gt_shared[pg[first] - 1] = counts[first]
    order = np.lexsort((pg, -counts, pp))
    first = order[np.r_[True, pp[order][1:] != pp[order][:-1]]]
    pred_match[pp[first] - 1] = pg[first]
    return gt_match, gt_shared, pred_match


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


#: Status of a lesion between a baseline and a follow-up scan, with its code in the follow-up's
#: label map (``status.nii.gz``, :mod:`analysis.monitoring.followup`).
CHANGE_CODES: dict[str, int] = {"stable": 1, "grown": 2, "shrunk": 3, "new": 4, "resolved": 5}
#: Relative volume change that counts as growth or shrinkage (``--change``).
DEFAULT_CHANGE = 0.2
#: Smallest absolute volume change (ml) that counts (``--min-change-ml``): below it a change is
#: within what a voxel grid and a threshold can move by themselves.
DEFAULT_MIN_CHANGE_ML = 0.1


def change_status(baseline_ml: float, followup_ml: float, *, change: float = DEFAULT_CHANGE,
                  min_change_ml: float = DEFAULT_MIN_CHANGE_ML) -> str:
    """The follow-up status of one tracked lesion from its volumes at the two time points.

    Rule: **new** without a baseline volume, **resolved** without a follow-up volume;
    otherwise **grown** when ``followup / baseline >= 1 + change`` and the volume rose by at
    least ``min_change_ml``, **shrunk** when ``followup / baseline <= 1 - change`` and it fell by
    at least ``min_change_ml``, **stable** otherwise. (A volume rule in the spirit of the
    volumetric criteria used for bone lesions, not RECIST's diameters; the thresholds are options.)

    Args:
        baseline_ml: the lesion's (or its matched group's) volume on the baseline, ml; 0 if absent.
        followup_ml: the same on the follow-up, ml; 0 if absent.
        change: relative change threshold (0.2 = 20 %).
        min_change_ml: absolute change floor in ml.

    Examples:
        >>> [change_status(1.0, v) for v in (0.0, 0.5, 0.9, 1.3)]
        ['resolved', 'shrunk', 'stable', 'grown']
        >>> change_status(0.0, 0.2), change_status(0.1, 0.15)
        ('new', 'stable')
    """
    if baseline_ml <= 0 and followup_ml <= 0:
        raise ValueError("a lesion needs a volume at one time point at least")
    if baseline_ml <= 0:
        return "new"
    if followup_ml <= 0:
        return "resolved"
    ratio, delta = followup_ml / baseline_ml, followup_ml - baseline_ml
    if ratio >= 1 + change and delta >= min_change_ml:
        return "grown"
    if ratio <= 1 - change and -delta >= min_change_ml:
        return "shrunk"
    return "stable"


@dataclass(frozen=True)
class Group:
    """One tracked lesion: the baseline and follow-up lesions linked by matches.

    Attributes:
        baseline: baseline lesion ids (empty: new).
        followup: follow-up lesion ids (empty: resolved).
        baseline_ml, followup_ml: summed volumes, each from its scan's grid.
        status: ``new``, ``resolved``, ``grown``, ``shrunk`` or ``stable``.
    """

    baseline: tuple[int, ...]
    followup: tuple[int, ...]
    baseline_ml: float
    followup_ml: float
    status: str

    @property
    def event(self) -> str:
        """``one-to-one``, ``split``, ``merge``, ``split-merge``, ``new`` or ``resolved``."""
        nb, nf = len(self.baseline), len(self.followup)
        if nb == 0 or nf == 0:
            return self.status
        return {(True, True): "one-to-one", (True, False): "split", (False, True): "merge"}.get(
            (nb == 1, nf == 1), "split-merge")


def group_lesions(pairs: set[tuple[int, int]], baseline_ml: np.ndarray, followup_ml: np.ndarray, *,
                  change: float = DEFAULT_CHANGE, min_change_ml: float = DEFAULT_MIN_CHANGE_ML) -> list[Group]:
    """Tracked lesions: the connected groups of baseline and follow-up lesions linked by ``pairs``
    (how pairs are found is the caller's: :func:`analysis.monitoring.matching.match`, or the
    follow-up phantom's exact frame), each with its status from its summed volumes
    (:func:`change_status`). Order: groups holding baseline lesions by their lowest baseline
    id, then new lesions by follow-up id.

    Args:
        pairs: ``(baseline_id, followup_id)`` links, ids ``1..n`` of each scan.
        baseline_ml, followup_ml: ``(n_b,)`` and ``(n_f,)`` lesion volumes (ml), each on its own grid.
        change, min_change_ml: the status thresholds of :func:`change_status`.

    Examples:
        >>> gs = group_lesions({(1, 1), (1, 2)}, np.array([1.0, 0.5]), np.array([0.9, 0.9, 0.3]))
        >>> [(g.baseline, g.followup, g.status, g.event) for g in gs]
        [((1,), (1, 2), 'grown', 'split'), ((2,), (), 'resolved', 'resolved'), ((), (3,), 'new', 'new')]
    """
    nb, nf = len(baseline_ml), len(followup_ml)
    rows = [i - 1 for i, _ in pairs]
    cols = [nb + j - 1 for _, j in pairs]
    graph = coo_matrix((np.ones(len(pairs)), (rows, cols)), shape=(nb + nf, nb + nf))
    _, comp = connected_components(graph, directed=False)
    members: dict[int, tuple[list[int], list[int]]] = {}
    for i in range(nb):
        members.setdefault(int(comp[i]), ([], []))[0].append(i + 1)
    for j in range(nf):
        members.setdefault(int(comp[nb + j]), ([], []))[1].append(j + 1)
    ordered = sorted(members.values(), key=lambda m: (0, m[0][0]) if m[0] else (1, m[1][0]))
    groups = []
    for b, f in ordered:
        bml = float(sum(baseline_ml[i - 1] for i in b))
        fml = float(sum(followup_ml[j - 1] for j in f))
        groups.append(Group(tuple(b), tuple(f), bml, fml,
                            change_status(bml, fml, change=change, min_change_ml=min_change_ml)))
    return groups
