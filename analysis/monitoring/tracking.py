"""Lesion tracks over a patient's timeline: one id per lesion for its whole life.

Every scan's lesions are placed in the **first scan's frame** (its lesion ids resampled nearest
neighbour onto the first scan's grid through the scan's own rigid registration to it, its centroids
mapped through the same transform); volumes stay those of each scan's own grid. Scans are then taken
in date order:

* **t0**: lesion ``i`` (the ``lesion_id`` of its ``lesions.csv``) starts track ``i``.
* **tk, k >= 1**: every track known so far (present at t(k-1) or not) is represented by its
  *footprint*, the first-frame voxels and volume-weighted centroid of its lesions at the last scan
  that showed it. tk's lesions are matched to footprints with ``followup``'s rule
  (:func:`analysis.monitoring.matching.match`): those sharing a voxel match; then, among tracks and
  lesions left without any match, pairs whose centroids lie within ``match_mm`` match, nearest first,
  one to one. The tracks and lesions linked by matches form *components*:

  - lesions without a track start a new track (the next id, in order of their lowest lesion id);
  - one track with one or several lesions continues (several: a **split**; the pieces keep the id
    and their volumes add up, as a split lesion's fragments do in RECIST 1.1);
  - several tracks with lesions: a **merge**; the lowest (oldest) id continues, the others end
    (``merged into N``) and are not counted as resolved;
  - a track without a lesion is absent: **resolved** at the first scan it is missing from, unless
    less than half of its footprint lies in that scan's field of view (``outside field of view``: the
    scan cannot tell; the track keeps its last volume);
  - a track absent before whose footprint a lesion of tk matches **reappears**: same id.

  The status of a continuing track compares its components' summed volumes at tk with those at the
  last scan whose field of view held it (normally t(k-1); :func:`analysis.lesions.change_status`):
  ``new`` when it had no lesion there (a new track, or one reappearing), ``resolved`` when it has
  none at tk, else grown, shrunk, stable; a new or resolved track below ``min_lesion_ml`` is
  ``indeterminate`` (``followup``'s rule: too small to call, and not counted as new by PCWG3). Each
  present track also records which earlier scans' fields of view did not hold its place
  (:attr:`TrackStep.unseen_by`): a lesion there cannot be called new against them.

Nothing of a scan depends on later scans, so appending a scan never changes the tracks of earlier
ones (what lets the node reuse a track's DICOM tracking UID across studies). The two-scan case is
exactly ``followup``'s matching: its groups are the components at t1
(:func:`followup_groups`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from analysis.imaging.io import Geometry
from analysis.lesions import (
    DEFAULT_CHANGE,
    DEFAULT_MIN_CHANGE_ML,
    DEFAULT_MIN_LESION_ML,
    INDETERMINATE,
    MERGE,
    OUTSIDE_FOV,
    SEEN_FRACTION,
    NEW,
    ONE_TO_ONE,
    RESOLVED,
    SPLIT,
    SPLIT_MERGE,
    Group,
    change_status,
    linked_components,
)
from analysis.monitoring.matching import DEFAULT_MATCH_MM, match

__all__ = ["PlacedScan", "TrackStep", "Tracking", "track_lesions", "followup_groups",
           "Tracker", "REAPPEARED", "MERGED_INTO", "BASELINE_EVENT", "ABSENT", "OUTSIDE", "SEEN_FRACTION",
           "field_of_view"]

#: Events beyond :attr:`analysis.lesions.Group.event`'s: a track seen at t0, one whose lesions
#: vanished before and came back, one that merged into another (``merged into N``), one absent
#: at this scan and the one before.
BASELINE_EVENT, REAPPEARED, MERGED_INTO, ABSENT = "baseline", "reappeared", "merged into", "absent"
OUTSIDE = OUTSIDE_FOV


@dataclass(frozen=True)
class PlacedScan:
    """One scan's lesions in the first scan's frame.

    Attributes:
        moved: ``(slices, rows, cols)`` on the first scan's grid: this scan's lesion ids ``1..n``
            resampled nearest neighbour through its registration (the first scan: its own labels).
        centroid_mm: ``(n, 3)`` volume-weighted centroids mapped into the first scan's frame (LPS mm).
        volume_ml: ``(n,)`` volumes from the scan's own grid.
        sees: which voxels of the first scan's grid (flat indices) lie in this scan's field of view
            (a bool per index); None: all of them (the first scan itself).
    """

    moved: np.ndarray
    centroid_mm: np.ndarray
    volume_ml: np.ndarray
    sees: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def n(self) -> int:
        return len(self.volume_ml)


@dataclass(frozen=True)
class TrackStep:
    """One track at one scan.

    Attributes:
        track: the track id.
        scan: the scan index (0 = t0).
        lesions: this scan's lesion ids on the track (empty: absent).
        volume_ml: their summed volume (own grid), 0.0 when absent.
        status: against the previous scan (:data:`analysis.lesions.STATUSES`);
            None at t0 and for a track absent at both scans or merged into another.
        event: ``baseline`` (t0), one-to-one, split, merge, split-merge, new, reappeared, resolved,
            ``merged into N``, ``outside field of view`` or ``absent``.
        previous_ml: the volume the status compared against (at the last scan that saw the track's
            place, merged tracks included).
        unseen_by: for a present track, the earlier scans whose field of view held less than half
            of its place (its first-frame voxels at this scan).
    """

    track: int
    scan: int
    lesions: tuple[int, ...]
    volume_ml: float
    status: str | None
    event: str
    previous_ml: float = 0.0
    unseen_by: tuple[int, ...] = ()

    @property
    def present(self) -> bool:
        return bool(self.lesions)


@dataclass
class Tracking:
    """The tracks of a timeline.

    Attributes:
        steps: per scan, one :class:`TrackStep` per track known at that scan (ended tracks,
            merged into another, are listed at the scan of the merge and not after), by track id.
        merged: ``{track: (scan, into)}`` for tracks that merged into another.
    """

    steps: list[list[TrackStep]] = field(default_factory=list)
    merged: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def tracks(self) -> list[int]:
        """Every track id, ascending."""
        return sorted({s.track for scan in self.steps for s in scan})

    def present(self, k: int) -> set[int]:
        """Tracks with a lesion at scan ``k``."""
        return {s.track for s in self.steps[k] if s.present}

    def step(self, k: int, track: int) -> TrackStep | None:
        return next((s for s in self.steps[k] if s.track == track), None)


@dataclass
class _Footprint:
    voxels: np.ndarray          # flat indices on the first scan's grid
    centroid: np.ndarray        # (3,) first frame, LPS mm
    volume_ml: float            # at the last scan showing it (0 after it went missing)


def _link_event(n_tracks: int, n_lesions: int) -> str:
    """How tracks and lesions are linked, in :attr:`analysis.lesions.Group.event`'s words."""
    return {(True, True): ONE_TO_ONE, (True, False): SPLIT, (False, True): MERGE}.get(
        (n_tracks == 1, n_lesions == 1), SPLIT_MERGE)


def _weighted(centroids: np.ndarray, volumes: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    idx = np.asarray(ids) - 1
    w = volumes[idx]
    return (centroids[idx] * w[:, None]).sum(axis=0) / max(float(w.sum()), 1e-12)


def _by_lesion(moved: np.ndarray) -> dict[int, np.ndarray]:
    """The flat indices of each lesion id's voxels, one pass over the volume."""
    flat = moved.ravel()
    nz = np.flatnonzero(flat)
    ids = flat[nz]
    order = np.argsort(ids, kind="stable")
    labels, starts = np.unique(ids[order], return_index=True)
    return {int(i): nz[order[a:b]] for i, a, b in zip(labels, starts, [*starts[1:], len(order)])}


def _voxels(by_lesion: dict[int, np.ndarray], ids: Sequence[int]) -> np.ndarray:
    parts = [by_lesion[i] for i in ids if i in by_lesion]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class Tracker:
    """:func:`track_lesions` one scan at a time (a scan's tracks never depend on later scans, so a
    timeline can drop each scan's images once it is tracked).

    Args:
        match_mm, change, min_change_ml, min_lesion_ml: as :func:`track_lesions`.
    """

    def __init__(self, *, match_mm: float = DEFAULT_MATCH_MM, change: float = DEFAULT_CHANGE,
                 min_change_ml: float = DEFAULT_MIN_CHANGE_ML, min_lesion_ml: float = DEFAULT_MIN_LESION_ML) -> None:
        self.match_mm, self.change, self.min_change_ml = match_mm, change, min_change_ml
        self.min_lesion_ml = min_lesion_ml
        self.tracking = Tracking()
        self._foot: dict[int, _Footprint] = {}
        self._sees: list[Callable[[np.ndarray], np.ndarray] | None] = []
        self._shape: tuple[int, ...] | None = None
        self._next = 1

    def _status(self, previous_ml: float, volume_ml: float) -> str:
        return change_status(previous_ml, volume_ml, change=self.change, min_change_ml=self.min_change_ml,
                             min_lesion_ml=self.min_lesion_ml)

    def _seen_by(self, j: int, voxels: np.ndarray) -> bool:
        sees = self._sees[j]
        return sees is None or voxels.size == 0 or float(np.mean(sees(voxels))) >= SEEN_FRACTION

    def add(self, scan: PlacedScan) -> list[TrackStep]:
        """Track the next scan; returns its steps (one per track known at it, by track id).

        Raises:
            ValueError: ``scan.moved`` is not on the first scan's grid.
        """
        k = len(self.tracking.steps)
        if k == 0:
            self._shape = scan.moved.shape
        elif scan.moved.shape != self._shape:
            raise ValueError(f"scan {k}: lesion ids on a grid of shape {scan.moved.shape}; expected the first "
                             f"scan's {self._shape}")
        self._sees.append(scan.sees)
        foot = self._foot
        steps: list[TrackStep] = []
        by_lesion = _by_lesion(scan.moved)
        if k == 0:
            for i in range(1, scan.n + 1):
                steps.append(TrackStep(i, 0, (i,), float(scan.volume_ml[i - 1]), None, BASELINE_EVENT))
                foot[i] = _Footprint(_voxels(by_lesion, [i]), scan.centroid_mm[i - 1].copy(),
                                     float(scan.volume_ml[i - 1]))
            self._next = scan.n + 1
            self.tracking.steps.append(steps)
            return steps
        alive = sorted(foot)
        flat = scan.moved.ravel()
        overlaps = set()
        for a, t in enumerate(alive, start=1):
            hit = np.unique(flat[foot[t].voxels])
            overlaps |= {(a, int(j)) for j in hit if j}
        centroids = np.array([foot[t].centroid for t in alive]).reshape(-1, 3)
        pairs = match(overlaps, centroids, scan.centroid_mm.reshape(-1, 3), self.match_mm)
        previous = {t: foot[t].volume_ml for t in alive}
        updates: dict[int, _Footprint] = {}
        for a_ids, lesions in linked_components(pairs, len(alive), scan.n):
            tracks = [alive[a - 1] for a in a_ids]
            volume = float(sum(scan.volume_ml[j - 1] for j in lesions))
            if not lesions:  # one track, absent here
                (t,) = tracks
                if not self._seen_by(k, foot[t].voxels):
                    steps.append(TrackStep(t, k, (), 0.0, None, OUTSIDE, previous[t]))
                elif previous[t] > 0:
                    steps.append(TrackStep(t, k, (), 0.0, self._status(previous[t], 0.0), RESOLVED, previous[t]))
                    foot[t].volume_ml = 0.0
                else:
                    steps.append(TrackStep(t, k, (), 0.0, None, ABSENT))
                continue
            before = float(sum(previous[t] for t in tracks))
            status = self._status(before, volume)
            if not tracks:
                survivor, event = self._next, NEW
                self._next += 1
            else:
                survivor = min(tracks)
                event = REAPPEARED if before == 0 else _link_event(len(tracks), len(lesions))
                for t in tracks:
                    if t != survivor:
                        steps.append(TrackStep(t, k, (), 0.0, None, f"{MERGED_INTO} {survivor}", previous[t]))
                        self.tracking.merged[t] = (k, survivor)
                        del foot[t]
            place = _voxels(by_lesion, lesions)
            unseen = tuple(j for j in range(k) if not self._seen_by(j, place))
            steps.append(TrackStep(survivor, k, tuple(lesions), volume, status, event, before, unseen))
            updates[survivor] = _Footprint(place, _weighted(scan.centroid_mm, scan.volume_ml, lesions), volume)
        for t, fp in updates.items():
            if fp.voxels.size == 0 and t in foot:  # a lesion outside the first scan's field of view
                fp.voxels = foot[t].voxels
            foot[t] = fp
        steps.sort(key=lambda s: s.track)
        self.tracking.steps.append(steps)
        return steps


def track_lesions(scans: Sequence[PlacedScan], *, match_mm: float = DEFAULT_MATCH_MM, change: float = DEFAULT_CHANGE,
                  min_change_ml: float = DEFAULT_MIN_CHANGE_ML,
                  min_lesion_ml: float = DEFAULT_MIN_LESION_ML) -> Tracking:
    """The tracks of ``scans`` (date order, all in the first scan's frame; the rule: module docstring).

    Args:
        scans: the placed scans, t0 first; every ``moved`` on the same grid.
        match_mm: centroids of otherwise unmatched tracks and lesions within this distance match.
        change, min_change_ml, min_lesion_ml: the status thresholds of :func:`analysis.lesions.change_status`
            (new or resolved tracks below ``min_lesion_ml`` are ``indeterminate``; 0: every one counts).

    Returns:
        The :class:`Tracking` (:class:`Tracker` adds one scan at a time).

    Raises:
        ValueError: a scan's ``moved`` is not on the first scan's grid.

    Examples:
        Lesion 1 of t0 resolves at t1 and comes back at t2 at its place; a new one appears at t1 50 mm
        away (voxels 10 mm apart along x):

        >>> grid = np.zeros((1, 1, 8), np.uint8)
        >>> def scan(ids, cents, vols):
        ...     m = grid.copy()
        ...     for i, x in zip(ids, cents): m[0, 0, x] = i
        ...     return PlacedScan(m, np.array([[10.0 * x, 0, 0] for x in cents]), np.array(vols, float))
        >>> t = track_lesions([scan([1], [1], [1.0]), scan([1], [6], [0.5]), scan([1, 2], [1, 6], [1.0, 0.5])])
        >>> for k in t.steps:
        ...     print([(s.track, s.status, s.event) for s in k])
        [(1, None, 'baseline')]
        [(1, 'resolved', 'resolved'), (2, 'new', 'new')]
        [(1, 'new', 'reappeared'), (2, 'stable', 'one-to-one')]
    """
    tracker = Tracker(match_mm=match_mm, change=change, min_change_ml=min_change_ml, min_lesion_ml=min_lesion_ml)
    for scan in scans:
        tracker.add(scan)
    return tracker.tracking


def followup_groups(tracking: Tracking, baseline_ml: np.ndarray) -> list[Group]:
    """``followup``'s tracked lesions (two scans): the components at t1 as
    :class:`analysis.lesions.Group`, in its order (groups holding baseline lesions by their lowest
    baseline id, then new lesions by follow-up id). A baseline lesion outside the follow-up's field of
    view is :data:`analysis.lesions.INDETERMINATE` there (event ``outside field of view``), not resolved.

    Args:
        tracking: :func:`track_lesions` of exactly two scans.
        baseline_ml: ``(n,)`` t0 lesion volumes (track ``i`` at t0 is lesion ``i``).
    """
    if len(tracking.steps) != 2:
        raise ValueError(f"followup_groups: expected two scans, got {len(tracking.steps)}")
    merged: dict[int, list[int]] = {}
    for t, (_, into) in tracking.merged.items():
        merged.setdefault(into, []).append(t)
    groups = []
    for s in tracking.steps[1]:
        if s.event.startswith(MERGED_INTO):
            continue
        baseline = tuple(sorted([s.track, *merged.get(s.track, [])])) if s.track < len(baseline_ml) + 1 else ()
        outside = s.event == OUTSIDE  # the follow-up cannot tell: not resolved
        groups.append(Group(baseline, s.lesions, float(sum(baseline_ml[i - 1] for i in baseline)), s.volume_ml,
                            INDETERMINATE if outside else s.status, outside=outside))
    return sorted(groups, key=lambda g: (0, g.baseline[0]) if g.baseline else (1, g.followup[0]))


def field_of_view(first: Geometry, scan: Geometry, to_scan: Callable[[np.ndarray], np.ndarray]
                  ) -> Callable[[np.ndarray], np.ndarray]:
    """:attr:`PlacedScan.sees` for a scan on grid ``scan`` registered to the first scan's grid.

    Args:
        first: the first scan's geometry (the frame's grid).
        scan: the scan's own geometry.
        to_scan: maps first-frame points ``(n, 3)`` LPS mm to the scan's points (the registration).

    Returns:
        ``sees(flat)``: for flat indices of ``(slices, rows, cols)`` voxels of the first grid, whether
        each lies within the scan's voxel centres' box (half a voxel beyond the outer centres).

    Examples:
        >>> g = Geometry((4, 1, 1), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
        >>> short = Geometry((2, 1, 1), (1.0, 1.0, 1.0), (2.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
        >>> field_of_view(g, short, lambda p: p)(np.arange(4)).tolist()
        [False, False, True, True]
    """
    d0 = np.asarray(first.direction, np.float64).reshape(3, 3)
    d1 = np.asarray(scan.direction, np.float64).reshape(3, 3)
    o0, s0 = np.asarray(first.origin, np.float64), np.asarray(first.spacing, np.float64)
    o1, s1 = np.asarray(scan.origin, np.float64), np.asarray(scan.spacing, np.float64)
    size = np.asarray(scan.size, np.float64)

    def sees(flat: np.ndarray) -> np.ndarray:
        z, y, x = np.unravel_index(np.asarray(flat, np.int64), first.shape)
        points = o0 + (np.stack([x, y, z], axis=1) * s0) @ d0.T
        index = ((to_scan(points) - o1) @ d1) / s1         # d1 orthonormal: its inverse is its transpose
        return np.all((index >= -0.5) & (index <= size - 0.5), axis=1)

    return sees
