"""Lesions of two scans of one patient matched in the baseline frame, and their status.

Definitions (also in the README's "Follow-up" section and in every ``followup.json``):

* **Lesions** are 3D connected components (26-connectivity) of each scan's mask, as ``analyze``
  and ``predict`` define them (:func:`analysis.lesions.lesion_instances`); ids ``1..N`` in each
  scan's own numbering, so they equal the ``lesion_id`` of that scan's ``lesions.csv``.
* **Volumes** come from each scan's own grid (voxels x that scan's voxel volume), never from a
  resampled mask.
* **Matching**, in the baseline frame (the follow-up registered onto the baseline): first, a
  baseline and a follow-up lesion match when they share a voxel; then, among the lesions left
  without any match in both scans, pairs whose centroids lie within ``match_mm`` match, nearest
  pair first, one to one. Lesions linked by matches form a *group*: one baseline and one
  follow-up lesion, or a **split** (one baseline lesion, several follow-up lesions), a **merge**
  (several baseline lesions, one follow-up lesion) or both.
* **Status** of a group (:func:`analysis.lesions.group_lesions`, :func:`analysis.lesions.change_status`
  on the group's summed volumes): new, resolved, grown, shrunk or stable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from analysis.imaging.io import Geometry
from analysis.lesions import lesion_instances

__all__ = ["ScanLesions", "scan_lesions", "match", "DEFAULT_MATCH_MM"]

#: Centroids of two otherwise unmatched lesions at most this far apart (mm) match (``--match-mm``).
DEFAULT_MATCH_MM = 10.0


@dataclass(frozen=True)
class ScanLesions:
    """The lesions of one scan on its own grid.

    Attributes:
        labels: ``(slices, rows, cols)`` lesion ids ``0..n`` (0 background).
        n: lesion count.
        volume_ml: ``(n,)`` volumes in ml from this scan's voxel size.
        centroid_mm: ``(n, 3)`` centroids in this scan's patient coordinates (LPS mm, x, y, z).
    """

    labels: np.ndarray
    n: int
    volume_ml: np.ndarray
    centroid_mm: np.ndarray


def scan_lesions(mask: np.ndarray, geometry: Geometry) -> ScanLesions:
    """Lesions (26-connected components) of ``mask`` ``(slices, rows, cols)`` with ``geometry``.

    Examples:
        >>> g = Geometry((4, 1, 1), (2.0, 1.0, 1.0), (10.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
        >>> s = scan_lesions(np.array([[[1, 1, 0, 1]]]), g)
        >>> s.n, s.volume_ml.tolist(), s.centroid_mm[:, 0].tolist()
        (2, [0.004, 0.002], [11.0, 16.0])
    """
    labels, n = lesion_instances(mask, 26)
    flat = np.flatnonzero(labels)
    ids = labels.ravel()[flat].astype(np.int64)
    count = np.bincount(ids, minlength=n + 1)[1:].astype(np.float64)
    coords = np.unravel_index(flat, labels.shape)                     # (z, y, x) indices
    mean_zyx = np.stack([np.bincount(ids, weights=c.astype(np.float64), minlength=n + 1)[1:] for c in coords], axis=1)
    index_xyz = (mean_zyx / np.maximum(count, 1)[:, None])[:, ::-1]
    d = np.asarray(geometry.direction, np.float64).reshape(3, 3)
    centroid = np.asarray(geometry.origin)[None, :] + (index_xyz * np.asarray(geometry.spacing)) @ d.T
    return ScanLesions(labels=labels, n=n, volume_ml=count * geometry.voxel_volume_ml, centroid_mm=centroid.reshape(n, 3))


def match(overlaps: Iterable[tuple[int, int]], baseline_centroids: np.ndarray, followup_centroids: np.ndarray,
          match_mm: float = DEFAULT_MATCH_MM) -> set[tuple[int, int]]:
    """All matched ``(baseline_id, followup_id)`` pairs (see the module docstring).

    Args:
        overlaps: ``(baseline_id, followup_id)`` pairs sharing a voxel on the baseline grid: the
            ids of :func:`analysis.lesions.overlap.overlap_pairs` of the baseline's lesion ids and the
            follow-up's resampled (nearest neighbour) onto the baseline grid through the registration.
        baseline_centroids: ``(n_b, 3)`` baseline centroids, LPS mm.
        followup_centroids: ``(n_f, 3)`` follow-up centroids mapped into the baseline frame.
        match_mm: largest centroid distance for lesions that overlap nothing.

    Examples:
        Lesion 1 overlaps, lesion 2 of each scan is 4 mm from its partner, 3 is 30 mm away:

        >>> b = np.array([[0, 0, 0], [50, 0, 0], [100, 0, 0.]]); f = np.array([[0, 0, 0], [54, 0, 0], [130, 0, 0.]])
        >>> sorted(match({(1, 1)}, b, f, 10.0))
        [(1, 1), (2, 2)]
    """
    pairs = {(int(i), int(j)) for i, j in overlaps}
    taken_b = {i for i, _ in pairs}
    taken_f = {j for _, j in pairs}
    free_b = [i for i in range(1, len(baseline_centroids) + 1) if i not in taken_b]
    free_f = [j for j in range(1, len(followup_centroids) + 1) if j not in taken_f]
    if free_b and free_f:
        d = np.linalg.norm(baseline_centroids[np.array(free_b) - 1][:, None, :]
                           - followup_centroids[np.array(free_f) - 1][None, :, :], axis=2)
        order = np.argsort(d, axis=None, kind="stable")
        used_b, used_f = set(), set()
        for k in order:
            bi, fj = np.unravel_index(k, d.shape)
            if d[bi, fj] > match_mm:
                break
            if bi in used_b or fj in used_f:
                continue
            used_b.add(bi)
            used_f.add(fj)
            pairs.add((free_b[bi], free_f[fj]))
    return pairs
