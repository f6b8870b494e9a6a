"""Lesion tracks over several scans (analysis.monitoring.tracking): hand-made timelines for splits,
merges, reappearance and the minimum size; agreement with followup's own matching and grouping for
two scans (an independent path: overlap_pairs + match + group_lesions); appending a scan never
changes the tracks of earlier ones (hypothesis)."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.lesions import INDETERMINATE, group_lesions, lesion_instances, overlap_pairs
from analysis.monitoring.matching import match
from analysis.monitoring.tracking import PlacedScan, followup_groups, track_lesions

SHAPE = (1, 4, 40)


def scan(*boxes: tuple[int, int, int, int]) -> PlacedScan:
    """Lesions as boxes ``(row0, row1, col0, col1)`` on a 1 x 4 x 40 grid, 1 mm voxels, id in order."""
    moved = np.zeros(SHAPE, np.uint16)
    for i, (r0, r1, c0, c1) in enumerate(boxes, start=1):
        moved[0, r0:r1, c0:c1] = i
    return placed(moved)


def placed(moved: np.ndarray) -> PlacedScan:
    n = int(moved.max())
    cent, vol = [], []
    for i in range(1, n + 1):
        z, y, x = np.nonzero(moved == i)
        cent.append([x.mean(), y.mean(), z.mean()])
        vol.append(len(x) / 1000.0)
    return PlacedScan(moved, np.array(cent).reshape(-1, 3), np.array(vol))


def track(scans, **options):
    """:func:`track_lesions` without the minimum size (these lesions are a few 1 mm voxels) unless asked."""
    return track_lesions(scans, **{"min_lesion_ml": 0.0, **options})


def table(tracking) -> list[list[tuple]]:
    return [[(s.track, s.lesions, s.status, s.event) for s in k] for k in tracking.steps]


def test_a_split_keeps_its_id_and_sums_the_pieces():
    t = track([scan((0, 4, 2, 12)), scan((0, 4, 2, 6), (0, 4, 8, 12)), scan((0, 4, 2, 6), (0, 4, 8, 12))],
                      min_change_ml=0.0)
    assert table(t) == [[(1, (1,), None, "baseline")],
                        [(1, (1, 2), "shrunk", "split")],
                        [(1, (1, 2), "stable", "split")]]
    assert t.step(1, 1).volume_ml == 0.032 and t.step(1, 1).previous_ml == 0.04


def test_a_merge_continues_the_oldest_id_and_the_other_is_not_resolved():
    t = track([scan((0, 4, 2, 6), (0, 4, 8, 12)), scan((0, 4, 2, 12)), scan((0, 4, 2, 12))],
                      min_change_ml=0.0)
    assert table(t) == [[(1, (1,), None, "baseline"), (2, (2,), None, "baseline")],
                        [(1, (1,), "grown", "merge"), (2, (), None, "merged into 1")],
                        [(1, (1,), "stable", "one-to-one")]]
    assert t.merged == {2: (1, 1)} and t.tracks == [1, 2]


def test_a_lesion_that_comes_back_where_it_was_keeps_its_id():
    by_overlap = track([scan((0, 4, 2, 6)), scan(), scan(), scan((1, 3, 3, 5))])
    assert [[(s.track, s.status, s.event) for s in k] for k in by_overlap.steps] == [
        [(1, None, "baseline")], [(1, "resolved", "resolved")], [(1, None, "absent")], [(1, "new", "reappeared")]]
    # no shared voxel, but within match_mm of where it was last seen
    by_centroid = track([scan((0, 4, 2, 6)), scan(), scan((0, 4, 7, 10))], match_mm=10.0)
    assert by_centroid.step(2, 1).event == "reappeared"
    elsewhere = track([scan((0, 4, 2, 6)), scan(), scan((0, 4, 30, 34))], match_mm=10.0)
    assert table(elsewhere)[2] == [(1, (), None, "absent"), (2, (1,), "new", "new")]


def test_new_tracks_take_the_next_ids_in_lesion_order():
    t = track([scan((0, 4, 2, 6)), scan((0, 4, 2, 6), (0, 4, 14, 18), (0, 4, 30, 34))])
    assert [(s.track, s.lesions, s.event) for s in t.steps[1]] == [(1, (1,), "one-to-one"), (2, (2,), "new"),
                                                                    (3, (3,), "new")]


def test_small_new_and_resolved_tracks_are_indeterminate():
    t = track([scan((0, 1, 2, 3), (0, 4, 20, 30)), scan((0, 4, 20, 30), (0, 1, 36, 37))], min_lesion_ml=0.01)
    assert [(s.track, s.status) for s in t.steps[1]] == [(1, INDETERMINATE), (2, "stable"), (3, INDETERMINATE)]
    # followup's default 0.1 ml: the 0.04 ml lesion (40 voxels of 1 mm) is too small to call new or resolved
    t = track_lesions([scan((0, 4, 2, 12)), scan()])
    assert [(s.track, s.status, s.event) for s in t.steps[1]] == [(1, INDETERMINATE, "resolved")]


def test_a_scan_on_another_grid_is_refused():
    import pytest

    with pytest.raises(ValueError, match="first scan's"):
        track([scan(), placed(np.zeros((1, 4, 41), np.uint16))])


masks = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 36), st.integers(1, 4), st.integers(1, 6)),
                 max_size=6)


def _random_scan(boxes) -> PlacedScan:
    mask = np.zeros(SHAPE, np.uint8)
    for r, c, h, w in boxes:
        mask[0, r:r + h, c:c + w] = 1
    labels, _ = lesion_instances(mask)
    return placed(labels.astype(np.uint16))


@settings(max_examples=200, deadline=None)
@given(masks, masks, st.floats(0.0, 15.0), st.sampled_from([0.0, 0.004, 0.01, 0.1]))
def test_two_scans_group_exactly_as_followup_does(a, b, match_mm, min_lesion_ml):
    base, fu = _random_scan(a), _random_scan(b)
    shared_b, shared_f, _ = overlap_pairs(base.moved, fu.moved)
    expected = group_lesions(match(zip(shared_b, shared_f), base.centroid_mm, fu.centroid_mm, match_mm),
                             base.volume_ml, fu.volume_ml, min_lesion_ml=min_lesion_ml)
    got = followup_groups(track_lesions([base, fu], match_mm=match_mm, min_lesion_ml=min_lesion_ml),
                          base.volume_ml)
    assert got == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(masks, min_size=2, max_size=5))
def test_appending_a_scan_never_changes_the_earlier_tracks(timeline):
    scans = [_random_scan(b) for b in timeline]
    full = track(scans)
    shorter = track(scans[:-1])
    assert table(full)[:-1] == table(shorter)
    # every lesion of every scan is on exactly one track
    for k, s in enumerate(scans):
        on_tracks = sorted(j for step in full.steps[k] for j in step.lesions)
        assert on_tracks == list(range(1, s.n + 1))


def test_a_track_outside_a_scans_field_of_view_is_not_resolved():
    """The second scan sees only columns >= 20: lesion 1 (columns 2..6) is outside it, not resolved,
    and compared with its last seen volume when a later scan sees it again."""
    half = scan((0, 4, 24, 28))
    half = PlacedScan(half.moved, half.centroid_mm, half.volume_ml, sees=lambda flat: flat % SHAPE[2] >= 20)
    t = track([scan((0, 4, 2, 6), (0, 4, 24, 28)), half, scan((0, 4, 2, 6), (0, 4, 24, 28))])
    assert [(s.track, s.status, s.event) for s in t.steps[1]] == [(1, None, "outside field of view"),
                                                                  (2, "stable", "one-to-one")]
    assert (t.step(2, 1).status, t.step(2, 1).previous_ml) == ("stable", 0.016)
    # a lesion first seen where an earlier scan did not look records it: it cannot be new against that scan
    t = track([scan((0, 4, 24, 28)), half, scan((0, 4, 24, 28), (0, 4, 2, 6))])
    assert t.step(2, 2).unseen_by == (1,) and t.step(2, 2).status == "new"


def test_pcwg3_of_tracks_counts_neither_small_nor_unseen_new_lesions():
    import datetime as dt

    from analysis.monitoring.pcwg3 import pcwg3_tracks

    d = [dt.date(2026, 1, 1), dt.date(2026, 4, 1), dt.date(2026, 7, 1)]
    t = track([scan((0, 4, 2, 6)), scan((0, 4, 2, 6), (0, 4, 14, 18), (0, 4, 30, 31)),
                       scan((0, 4, 2, 6), (0, 4, 14, 18), (0, 2, 22, 25), (0, 4, 30, 31), (0, 4, 36, 39))])
    assert [s.state for s in pcwg3_tracks(d, t, min_lesion_ml=0.0)][1] == "progression (2026-04-01)"
    assert [s.state for s in pcwg3_tracks(d, t, min_lesion_ml=0.01)][1] == "no progression"  # 0.004 ml is too small
    # the default is followup's minimum size: these lesions of a few 1 mm voxels are all indeterminate
    assert [s.state for s in pcwg3_tracks(d, t)] == ["baseline", "no progression", "no progression"]
