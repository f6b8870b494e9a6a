"""The PCWG3 bone rule (analysis.monitoring.pcwg3): the issue's edge cases by hand, and invariants
over random timelines (hypothesis)."""
from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.monitoring.pcwg3 import (
    BASELINE,
    NO_PROGRESSION,
    NOT_CONFIRMED,
    NOT_EVALUABLE,
    UNCONFIRMED,
    Pcwg3Rule,
    pcwg3_bone,
    progression_state,
)

T0 = dt.date(2026, 1, 5)


def days(*offsets: int) -> list[dt.date]:
    return [T0 + dt.timedelta(days=d) for d in offsets]


def states(dates, present, countable=None, **rule) -> list[str]:
    return [s.state for s in pcwg3_bone(dates, present, countable, rule=Pcwg3Rule(**rule))]


def test_two_new_then_one_more_is_not_confirmed():
    d = days(0, 84, 168)
    got = pcwg3_bone(d, [{1}, {1, 2, 3}, {1, 2, 3, 4}])
    assert [s.state for s in got] == [BASELINE, NOT_CONFIRMED, NO_PROGRESSION]
    assert got[1].new == (2, 3) and got[1].reference == 0
    assert got[2].new == (4,) and got[2].reference == 1 and got[2].confirms == 1
    assert "1 additional new lesions" in got[1].note


def test_two_new_then_two_more_is_progression_dated_t1():
    d = days(0, 84, 168, 250)
    got = pcwg3_bone(d, [{1}, {1, 2, 3}, {1, 2, 3, 4, 5}, {1, 2, 3, 4, 5}])
    t1 = progression_state(d[1])
    assert [s.state for s in got] == [BASELINE, t1, t1, t1]
    assert got[1].progression_date == d[1] == got[3].progression_date
    assert got[2].confirms == 1 and got[2].new == (4, 5)


def test_two_new_at_t2_persisting_at_t3_is_progression_dated_t2():
    d = days(0, 84, 168, 252)
    got = states(d, [{1}, {1}, {1, 7, 8}, {1, 7, 8}])
    assert got == [BASELINE, NO_PROGRESSION, progression_state(d[2]), progression_state(d[2])]


def test_new_at_t2_counted_against_t1_not_t0():
    """A lesion new at t1 (one only: no progression) is no longer new at t2: t1 is the reference."""
    d = days(0, 84, 168)
    assert states(d, [{1}, {1, 2}, {1, 2, 3}]) == [BASELINE, NO_PROGRESSION, NO_PROGRESSION]


def test_two_new_at_t2_of_which_one_persists_is_not_confirmed():
    d = days(0, 84, 168, 252)
    assert states(d, [set(), set(), {7, 8}, {7}]) == [BASELINE, NO_PROGRESSION, NOT_CONFIRMED, NO_PROGRESSION]


def test_a_confirmation_scan_under_six_weeks_cannot_confirm():
    d = days(0, 84, 84 + 35)  # t2 five weeks after t1
    got = pcwg3_bone(d, [{1}, {1, 2, 3}, {1, 2, 3, 4, 5}])
    assert [s.state for s in got] == [BASELINE, UNCONFIRMED, NOT_EVALUABLE]
    assert "35 days after t1" in got[2].note and "less than 42 days" in got[2].note
    # the next scan at least six weeks after t1 confirms it
    d4 = days(0, 84, 84 + 35, 84 + 60)
    got = states(d4, [{1}, {1, 2, 3}, {1, 2, 3, 4, 5}, {1, 2, 3, 4, 5}])
    assert got == [BASELINE, progression_state(d4[1]), NOT_EVALUABLE, progression_state(d4[1])]
    # exactly six weeks confirms
    assert states(days(0, 84, 84 + 42), [{1}, {1, 2, 3}, {1, 2, 3, 4, 5}])[1] == progression_state(d4[1])


def test_the_last_scan_unconfirmed_waits():
    assert states(days(0, 84), [set(), {1, 2}]) == [BASELINE, UNCONFIRMED]
    assert states(days(0, 84, 168, 250), [set(), set(), set(), {4, 5}])[-1] == UNCONFIRMED


def test_indeterminate_new_lesions_do_not_count():
    d = days(0, 84, 168)
    present = [{1}, {1, 2, 3}, {1, 2, 3, 4, 5}]
    assert states(d, present, [{1}, {1, 2}, {1, 2, 3, 4, 5}])[1] == NO_PROGRESSION  # 3 was too small at t1
    # persistence counts any size: an unconfirmed t2 whose lesions shrink below the minimum still confirms
    d = days(0, 84, 168, 252)
    present = [set(), set(), {7, 8}, {7, 8}]
    assert states(d, present, [set(), set(), {7, 8}, set()])[2] == progression_state(d[2])


def test_a_lesion_that_resolved_at_t1_and_comes_back_is_new_against_t1():
    d = days(0, 84, 168, 252)
    assert states(d, [{1, 2}, set(), {1, 2}, {1, 2}])[2] == progression_state(d[2])


def test_after_a_flare_a_later_pair_can_still_progress():
    d = days(0, 84, 168, 252, 336)
    got = states(d, [set(), {1, 2}, {1, 2}, {1, 2, 5, 6}, {1, 2, 5, 6}])
    assert got == [BASELINE, NOT_CONFIRMED, NO_PROGRESSION, progression_state(d[3]), progression_state(d[3])]


def test_options_change_the_counts_and_the_interval():
    d = days(0, 84, 98)
    present = [set(), {1}, {1, 2}]
    assert states(d, present) == [BASELINE, NO_PROGRESSION, NO_PROGRESSION]
    assert states(d, present, min_new=1, min_additional=1, interval_days=14) == [
        BASELINE, progression_state(d[1]), progression_state(d[1])]
    assert states(d, present, min_new=1, min_additional=1) == [BASELINE, UNCONFIRMED, NOT_EVALUABLE]


@pytest.mark.parametrize("dates, present, countable, message", [
    (days(0, 10), [set()], None, "2 dates but 1"),
    (days(10, 0), [set(), set()], None, "not after scan 0"),
    (days(0, 0), [set(), set()], None, "strictly increasing"),
    (days(0, 10), [set(), {1}], [set(), {2}], "not present"),
])
def test_bad_inputs_are_refused(dates, present, countable, message):
    with pytest.raises(ValueError, match=message):
        pcwg3_bone(dates, present, countable)


def test_bad_rule_settings_are_refused():
    with pytest.raises(ValueError, match="min_new 0"):
        pcwg3_bone(days(0), [set()], rule=Pcwg3Rule(min_new=0))
    with pytest.raises(ValueError, match="interval_days"):
        pcwg3_bone(days(0), [set()], rule=Pcwg3Rule(interval_days=-1))


timelines = st.integers(1, 7).flatmap(lambda n: st.tuples(
    st.lists(st.integers(1, 120), min_size=n - 1, max_size=n - 1),
    st.lists(st.sets(st.integers(1, 6), max_size=6), min_size=n, max_size=n)))


@settings(max_examples=300, deadline=None)
@given(timelines)
def test_invariants(timeline):
    gaps, present = timeline
    d = [T0]
    for g in gaps:
        d.append(d[-1] + dt.timedelta(days=g))
    got = pcwg3_bone(d, present)
    assert [s.index for s in got] == list(range(len(d))) and got[0].state == BASELINE
    first = next((s for s in got if s.progression_date is not None), None)
    for s in got[1:]:
        assert s.state in (NO_PROGRESSION, UNCONFIRMED, NOT_CONFIRMED, NOT_EVALUABLE) or s.state.startswith(
            "progression (")
        assert s.reference == (0 if s.index == 1 else 1)
        assert set(s.new) == set(present[s.index]) - set(present[s.reference])
    if first is not None:  # progression: dated at the scan that showed the new lesions, and final
        assert first.state == progression_state(first.date) and first.progression_date == first.date
        assert all(s.state in (first.state, NOT_EVALUABLE) for s in got[first.index:])
        assert got[-1].state == first.state
        confirmer = next(s for s in got if s.confirms == first.index)
        assert (confirmer.date - first.date).days >= 42
    # a scan with fewer than two new lesions against its reference is never unconfirmed or a progression event
    for s in got[1:]:
        if len(s.new) < 2:
            assert s.state not in (UNCONFIRMED, NOT_CONFIRMED) and s.progression_date in (None,) + (
                () if first is None else (first.date,))
            assert first is None or s.index != first.index
    # without any scan with two new lesions against its reference there is never anything but "no progression"
    if all(len(s.new) < 2 for s in got[1:]):
        assert {s.state for s in got[1:]} <= {NO_PROGRESSION}
