"""How a lesion changed between two scans of one patient: the one vocabulary of follow-up
statuses, the change rule, and the grouping of matched lesions (splits and merges).

Every place that names a status (``followup``'s tables, ``status.nii.gz``, the preview's colours,
the follow-up's DICOM report) keys off :data:`STATUSES` and :data:`STATUS_CODES`; how the
lesions of two scans are paired is the caller's (:mod:`analysis.monitoring.matching` on
:func:`analysis.lesions.overlap.overlap_pairs`, or the follow-up phantom's exact frame).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["NEW", "RESOLVED", "GROWN", "SHRUNK", "STABLE", "INDETERMINATE", "DEFAULT_MIN_LESION_ML", "STATUSES", "STATUS_CODES", "ONE_TO_ONE", "SPLIT",
           "MERGE", "SPLIT_MERGE", "DEFAULT_CHANGE", "DEFAULT_MIN_CHANGE_ML", "NEW_LESIONS_FLAG", "change_status",
           "status_rule", "status_counts", "new_lesions_flag", "describe_counts", "Group", "group_lesions",
           "linked_components", "OUTSIDE_FOV", "SEEN_FRACTION"]

NEW, RESOLVED, GROWN, SHRUNK, STABLE = "new", "resolved", "grown", "shrunk", "stable"
#: A lesion on one scan only that is too small to call new or resolved (:data:`DEFAULT_MIN_LESION_ML`),
#: or a baseline lesion whose place the follow-up scan did not cover (:data:`OUTSIDE_FOV`).
INDETERMINATE = "indeterminate"
#: The event of a lesion whose place lies outside a later scan's field of view (less than half of its
#: voxels inside): that scan cannot tell whether it is still there, so it is not called resolved.
OUTSIDE_FOV = "outside field of view"
#: A lesion's place is in a scan's field of view when at least this fraction of its voxels lie within
#: the box of the scan's voxel centres (half a voxel beyond the outer ones).
SEEN_FRACTION = 0.5
#: The status of a tracked lesion between a baseline and a follow-up scan (:func:`change_status`), in
#: the order ``followup`` reports them: summary.csv's count columns, the report's counts.
STATUSES: tuple[str, ...] = (NEW, RESOLVED, GROWN, SHRUNK, STABLE, INDETERMINATE)
#: Each status's code in the follow-up's label map ``status.nii.gz`` (0: no lesion;
#: :mod:`analysis.monitoring.followup`); the preview's legend runs in this order.
STATUS_CODES: dict[str, int] = {STABLE: 1, GROWN: 2, SHRUNK: 3, NEW: 4, RESOLVED: 5, INDETERMINATE: 6}
#: How a tracked lesion's baseline and follow-up lesions are linked (:attr:`Group.event`; a group
#: without lesions on one side has its status, new or resolved, as its event).
ONE_TO_ONE, SPLIT, MERGE, SPLIT_MERGE = "one-to-one", "split", "merge", "split-merge"
#: Relative volume change that counts as growth or shrinkage (``--change``).
DEFAULT_CHANGE = 0.2
#: Smallest absolute volume change (ml) that counts (``--min-change-ml``): below it a change is
#: within what a voxel grid and a threshold can move by themselves.
DEFAULT_MIN_CHANGE_ML = 0.1
#: A lesion seen on one scan only is called new or resolved from this volume (ml) up
#: (``--min-lesion-ml``); below it the status is :data:`INDETERMINATE` and it does not count toward
#: the new-lesion flag. 0.1 ml is a sphere of 5.8 mm: the Fleischner Society's size below which a
#: solid CT finding is not followed (MacMahon et al., Radiology 2017;284:228-243: < 6 mm, < 100
#: mm^3), and well under RECIST 1.1's 10 mm, below which a lesion is non-measurable and a new one
#: must be unequivocal before it counts (Eisenhauer et al., Eur J Cancer 2009;45:228-247). The same
#: CT moved rigidly gave a phantom-trained model 36 "new" lesions of 0.016-0.071 ml (BENCHMARKS.md).
DEFAULT_MIN_LESION_ML = 0.1


def change_status(baseline_ml: float, followup_ml: float, *, change: float = DEFAULT_CHANGE,
                  min_change_ml: float = DEFAULT_MIN_CHANGE_ML, min_lesion_ml: float = DEFAULT_MIN_LESION_ML) -> str:
    """The follow-up status of one tracked lesion from its volumes at the two time points.

    Rule: **new** without a baseline volume, **resolved** without a follow-up volume, each only
    from ``min_lesion_ml`` up (smaller: **indeterminate**, too small to call);
    otherwise **grown** when ``followup / baseline >= 1 + change`` and the volume rose by at
    least ``min_change_ml``, **shrunk** when ``followup / baseline <= 1 - change`` and it fell by
    at least ``min_change_ml``, **stable** otherwise. (A volume rule in the spirit of the
    volumetric criteria used for bone lesions, not RECIST's diameters; the thresholds are options.)

    Args:
        baseline_ml: the lesion's (or its matched group's) volume on the baseline, ml; 0 if absent.
        followup_ml: the same on the follow-up, ml; 0 if absent.
        change: relative change threshold (0.2 = 20 %).
        min_change_ml: absolute change floor in ml.
        min_lesion_ml: a lesion on one scan only is new or resolved from this volume up, else
            indeterminate (0: every one counts).

    Examples:
        >>> [change_status(1.0, v) for v in (0.0, 0.5, 0.9, 1.3)]
        ['resolved', 'shrunk', 'stable', 'grown']
        >>> change_status(0.0, 0.2), change_status(0.1, 0.15)
        ('new', 'stable')
        >>> change_status(0.0, 0.05), change_status(0.05, 0.0), change_status(0.0, 0.05, min_lesion_ml=0)
        ('indeterminate', 'indeterminate', 'new')
    """
    if baseline_ml <= 0 and followup_ml <= 0:
        raise ValueError("a lesion needs a volume at one time point at least")
    if baseline_ml <= 0:
        return NEW if followup_ml >= min_lesion_ml else INDETERMINATE
    if followup_ml <= 0:
        return RESOLVED if baseline_ml >= min_lesion_ml else INDETERMINATE
    ratio, delta = followup_ml / baseline_ml, followup_ml - baseline_ml
    if ratio >= 1 + change and delta >= min_change_ml:
        return GROWN
    if ratio <= 1 - change and -delta >= min_change_ml:
        return SHRUNK
    return STABLE


def status_rule(change: float = DEFAULT_CHANGE, min_change_ml: float = DEFAULT_MIN_CHANGE_ML,
                min_lesion_ml: float = DEFAULT_MIN_LESION_ML) -> str:
    """:func:`change_status`'s rule in one line with its thresholds (the records' definition).

    Examples:
        >>> status_rule().split("; ")[2]
        'grown: follow-up/baseline volume >= 1.2 and an increase >= 0.1 ml'
    """
    return (f"{NEW}: no baseline lesion; {RESOLVED}: no follow-up lesion; {GROWN}: follow-up/baseline volume >= "
            f"{1 + change:g} and an increase >= {min_change_ml:g} ml; {SHRUNK}: ratio <= {1 - change:g} "
            f"and a decrease >= {min_change_ml:g} ml; {STABLE} otherwise; {INDETERMINATE}: a lesion on one scan "
            f"only, below {min_lesion_ml:g} ml (too small to call {NEW} or {RESOLVED}), or a baseline lesion "
            f"{OUTSIDE_FOV} of the follow-up (it cannot tell)")


#: A patient's follow-up is flagged when it holds at least this many new lesions: the lesion-count
#: rule prostate-cancer trials apply to bone scans (PCWG3, Scher et al., J Clin Oncol 2016), stated
#: as such; not a diagnosis (PCWG3 also asks for confirmation on a later scan).
NEW_LESIONS_FLAG = 2


def status_counts(statuses: Sequence[str]) -> dict[str, int]:
    """How many tracked lesions have each status, in :data:`STATUSES` order.

    Examples:
        >>> status_counts([NEW, STABLE, NEW, INDETERMINATE])
        {'new': 2, 'resolved': 0, 'grown': 0, 'shrunk': 0, 'stable': 1, 'indeterminate': 1}
        >>> new_lesions_flag(status_counts([NEW, INDETERMINATE, INDETERMINATE])), describe_counts(status_counts([GROWN]))
        (0, '0 new, 0 resolved, 1 grown, 0 shrunk, 0 stable, 0 indeterminate')
    """
    return {name: sum(s == name for s in statuses) for name in STATUSES}


def new_lesions_flag(counts: Mapping[str, int]) -> int:
    """1 when ``counts`` (per status, :func:`status_counts`) hold at least :data:`NEW_LESIONS_FLAG`
    new lesions, else 0."""
    return int(counts[NEW] >= NEW_LESIONS_FLAG)


def describe_counts(counts: Mapping[str, int]) -> str:
    """``"2 new, 1 resolved, ..."``: the counts per status in :data:`STATUSES` order (messages)."""
    return ", ".join(f"{counts[name]} {name}" for name in STATUSES)


@dataclass(frozen=True)
class Group:
    """One tracked lesion: the baseline and follow-up lesions linked by matches.

    Attributes:
        baseline: baseline lesion ids (empty: new).
        followup: follow-up lesion ids (empty: resolved).
        baseline_ml, followup_ml: summed volumes, each from its scan's grid.
        status: one of :data:`STATUSES`.
        outside: a baseline lesion (no follow-up lesion) whose place lies outside the follow-up's
            field of view: :data:`INDETERMINATE`, event :data:`OUTSIDE_FOV`.
    """

    baseline: tuple[int, ...]
    followup: tuple[int, ...]
    baseline_ml: float
    followup_ml: float
    status: str
    outside: bool = False

    @property
    def event(self) -> str:
        """:data:`ONE_TO_ONE`, :data:`SPLIT`, :data:`MERGE`, :data:`SPLIT_MERGE`, or the status
        (:data:`NEW`, :data:`RESOLVED`, :data:`INDETERMINATE`) of a group with lesions on one side only."""
        nb, nf = len(self.baseline), len(self.followup)
        if self.outside:
            return OUTSIDE_FOV
        if nb == 0 or nf == 0:
            return self.status
        return {(True, True): ONE_TO_ONE, (True, False): SPLIT, (False, True): MERGE}.get((nb == 1, nf == 1),
                                                                                        SPLIT_MERGE)


def linked_components(pairs: set[tuple[int, int]], n_a: int, n_b: int) -> list[tuple[list[int], list[int]]]:
    """Connected components of the bipartite graph of ``pairs`` on ids ``1..n_a`` and ``1..n_b``
    (lesions of two scans, or tracks and a scan's lesions): ``(a ids, b ids)`` each, those holding
    an ``a`` id first by their lowest ``a`` id, then the rest by ``b`` id.

    >>> linked_components({(1, 2), (2, 2)}, 3, 2)
    [([1, 2], [2]), ([3], []), ([], [1])]
    """
    rows = [i - 1 for i, _ in pairs]
    cols = [n_a + j - 1 for _, j in pairs]
    graph = coo_matrix((np.ones(len(pairs)), (rows, cols)), shape=(n_a + n_b, n_a + n_b))
    _, comp = connected_components(graph, directed=False)
    members: dict[int, tuple[list[int], list[int]]] = {}
    for i in range(n_a):
        members.setdefault(int(comp[i]), ([], []))[0].append(i + 1)
    for j in range(n_b):
        members.setdefault(int(comp[n_a + j]), ([], []))[1].append(j + 1)
    return sorted(members.values(), key=lambda m: (0, m[0][0]) if m[0] else (1, m[1][0]))


def group_lesions(pairs: set[tuple[int, int]], baseline_ml: np.ndarray, followup_ml: np.ndarray, *,
                  change: float = DEFAULT_CHANGE, min_change_ml: float = DEFAULT_MIN_CHANGE_ML,
                  min_lesion_ml: float = DEFAULT_MIN_LESION_ML) -> list[Group]:
    """Tracked lesions: the connected groups of baseline and follow-up lesions linked by ``pairs``
    (how pairs are found is the caller's: :func:`analysis.monitoring.matching.match`, or the
    follow-up phantom's exact frame), each with its status from its summed volumes
    (:func:`change_status`). Order: groups holding baseline lesions by their lowest baseline
    id, then new lesions by follow-up id.

    Args:
        pairs: ``(baseline_id, followup_id)`` links, ids ``1..n`` of each scan.
        baseline_ml, followup_ml: ``(n_b,)`` and ``(n_f,)`` lesion volumes (ml), each on its own grid.
        change, min_change_ml, min_lesion_ml: the status thresholds of :func:`change_status`.

    Examples:
        >>> gs = group_lesions({(1, 1), (1, 2)}, np.array([1.0, 0.5]), np.array([0.9, 0.9, 0.3]))
        >>> [(g.baseline, g.followup, g.status, g.event) for g in gs]
        [((1,), (1, 2), 'grown', 'split'), ((2,), (), 'resolved', 'resolved'), ((), (3,), 'new', 'new')]
    """
    groups = []
    for b, f in linked_components(pairs, len(baseline_ml), len(followup_ml)):
        bml = float(sum(baseline_ml[i - 1] for i in b))
        fml = float(sum(followup_ml[j - 1] for j in f))
        groups.append(Group(tuple(b), tuple(f), bml, fml,
                            change_status(bml, fml, change=change, min_change_ml=min_change_ml,
                                          min_lesion_ml=min_lesion_ml)))
    return groups
