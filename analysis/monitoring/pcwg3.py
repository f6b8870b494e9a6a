"""The PCWG3 rule for bone progression, from per-scan sets of tracked lesions.

Source: Scher HI, Morris MJ, Stadler WM, et al. Trial Design and Objectives for Castration-Resistant
Prostate Cancer: Updated Recommendations From the Prostate Cancer Clinical Trials Working Group 3.
J Clin Oncol 2016;34(12):1402-1418 (PCWG3), its "2+2" rule for bone. PCWG3 states it for bone scans;
this project applies it, as stated here, to the bone lesions a CT timeline tracks.

The rule as this project specifies it (issue #36), with scans in date order t0 (baseline), t1 (the
first post-treatment scan), t2, ...:

* a lesion is **new at tk against a reference scan** when its track had no lesion at the
  reference; it **counts** only when it is not ``indeterminate``: below ``followup``'s minimum size
  (:data:`analysis.lesions.DEFAULT_MIN_LESION_ML`, ``--min-lesion-ml``) it is too small to call new
  (:func:`pcwg3_tracks`; the caller of :func:`pcwg3_bone` passes what may count in ``countable``);
* **at t1**: at least ``min_new`` (2) new lesions against t0 make t1 ``unconfirmed``; it becomes
  ``progression (t1's date)`` when the confirming scan shows at least ``min_additional`` (2)
  *additional* new lesions against t1, else ``not confirmed (flare)``;
* **at tk, k >= 2**: at least ``min_new`` new lesions against t1 make tk ``unconfirmed``; it becomes
  ``progression (tk's date)`` when at least ``min_persist`` (2) of them still have a lesion (any
  size) on the confirming scan, else ``not confirmed (flare)`` (the issue's one word for new
  lesions a later scan does not bear out; after t1 it is not a flare in the clinical sense);
* the **confirming scan** of an unconfirmed tk is the first later scan at least
  ``interval_days`` (42: six weeks) after tk: a scan less than six weeks after the one it
  confirms cannot confirm. Scans between tk and its confirming scan are ``not evaluable``
  (they neither confirm nor refute; the table says why); when no such scan exists yet, tk stays
  ``unconfirmed`` and the later scans are ``not evaluable``;
* once progression is confirmed, that scan, its confirming scan and every later one read
  ``progression (date)`` with the date of the scan that showed the new lesions (the event's
  date; PCWG3 dates progression at the first scan showing them);
* every other post-baseline scan is ``no progression``; t0 is ``baseline``.

The function is pure: dates and sets of track ids in, one :class:`TimePointState` per scan out.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, AbstractSet, Sequence

from analysis.lesions import DEFAULT_MIN_LESION_ML

if TYPE_CHECKING:
    from analysis.monitoring.tracking import Tracking

__all__ = ["Pcwg3Rule", "TimePointState", "pcwg3_bone", "STATES", "BASELINE", "NO_PROGRESSION", "UNCONFIRMED",
           "PROGRESSION", "NOT_CONFIRMED", "NOT_EVALUABLE", "progression_state", "pcwg3_tracks"]

BASELINE = "baseline"
NO_PROGRESSION = "no progression"
UNCONFIRMED = "unconfirmed"
#: ``progression (YYYY-MM-DD)``: :func:`progression_state` writes it with the event's date.
PROGRESSION = "progression"
NOT_CONFIRMED = "not confirmed (flare)"
NOT_EVALUABLE = "not evaluable"
#: The state vocabulary (``progression`` carries its date in parentheses).
STATES = (BASELINE, NO_PROGRESSION, UNCONFIRMED, PROGRESSION, NOT_CONFIRMED, NOT_EVALUABLE)


def progression_state(date: dt.date) -> str:
    """``progression (YYYY-MM-DD)``.

    >>> progression_state(dt.date(2026, 3, 1))
    'progression (2026-03-01)'
    """
    return f"{PROGRESSION} ({date.isoformat()})"


@dataclass(frozen=True)
class Pcwg3Rule:
    """The rule's counts and interval; the defaults are PCWG3's.

    Attributes:
        min_new: new lesions (against the reference) that make a scan ``unconfirmed``.
        min_additional: additional new lesions (against t1) the confirming scan must show to
            confirm an unconfirmed t1.
        min_persist: of an unconfirmed tk's (k >= 2) new lesions, how many must still be present
            on the confirming scan.
        interval_days: a confirming scan is at least this many days after the scan it confirms.
    """

    min_new: int = 2
    min_additional: int = 2
    min_persist: int = 2
    interval_days: int = 42

    def check(self) -> None:
        """Raise ValueError (naming the setting) for a count below 1 or a negative interval."""
        for name in ("min_new", "min_additional", "min_persist"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)}: expected at least 1")
        if self.interval_days < 0:
            raise ValueError(f"interval_days {self.interval_days}: expected >= 0")

    def describe(self) -> str:
        """The rule in one paragraph, with these settings."""
        weeks = f"{self.interval_days / 7:g} weeks" if self.interval_days % 7 == 0 else f"{self.interval_days} days"
        return (f"PCWG3 bone rule (Scher et al., J Clin Oncol 2016;34:1402-1418), applied to CT lesion tracks: t1 "
                f"with >= {self.min_new} new lesions against t0 is unconfirmed, progression dated t1 when the "
                f"confirming scan shows >= {self.min_additional} additional new lesions against t1, else not "
                f"confirmed (flare); tk (k >= 2) with >= {self.min_new} new lesions against t1 is unconfirmed, "
                f"progression dated tk when >= {self.min_persist} of them are present on the confirming scan; the "
                f"confirming scan is the first scan >= {weeks} later (earlier scans are not evaluable); new "
                f"lesions that are indeterminate (below the minimum size) do not count")


@dataclass(frozen=True)
class TimePointState:
    """The rule's verdict at one scan.

    Attributes:
        index: the scan's position (0 = t0).
        date: its date.
        reference: the scan new lesions are counted against (None for t0).
        new: track ids new against ``reference`` that count (sorted).
        state: one of :data:`STATES` (``progression (date)`` with its date).
        progression_date: the event's date when ``state`` is a progression.
        confirms: for a confirming scan, the index of the scan it decided (None otherwise).
        note: why, in one sentence (which scan confirmed, or why a scan could not).
    """

    index: int
    date: dt.date
    reference: int | None
    new: tuple[int, ...]
    state: str
    progression_date: dt.date | None = None
    confirms: int | None = None
    note: str = ""


def _label(k: int, dates: Sequence[dt.date]) -> str:
    return f"t{k} ({dates[k].isoformat()})"


def pcwg3_bone(dates: Sequence[dt.date], present: Sequence[AbstractSet[int]],
               countable: Sequence[AbstractSet[int]] | None = None, *, rule: Pcwg3Rule = Pcwg3Rule()
               ) -> list[TimePointState]:
    """The PCWG3 bone state of every scan of a timeline (the rule: module docstring).

    Args:
        dates: the scans' dates, strictly increasing (t0 first).
        present: per scan, the ids of the tracks that have a lesion on it (any size).
        countable: per scan, the subset of ``present`` that may count as new (not
            ``indeterminate``); None: all of ``present``.
        rule: counts and interval.

    Returns:
        One :class:`TimePointState` per scan, in order.

    Raises:
        ValueError: lengths differ, dates not strictly increasing, ``countable`` not within
            ``present``, or a bad rule setting.

    Examples:
        Two new lesions at t1, two more at t2 eight weeks later: progression dated t1.

        >>> d = [dt.date(2026, 1, 1), dt.date(2026, 3, 1), dt.date(2026, 4, 26)]
        >>> [s.state for s in pcwg3_bone(d, [{1}, {1, 2, 3}, {1, 2, 3, 4, 5}])]
        ['baseline', 'progression (2026-03-01)', 'progression (2026-03-01)']
    """
    rule.check()
    n = len(dates)
    if len(present) != n or (countable is not None and len(countable) != n):
        raise ValueError(f"{n} dates but {len(present)} sets of present tracks"
                         + ("" if countable is None else f" and {len(countable)} of countable ones"))
    for k in range(1, n):
        if not dates[k] > dates[k - 1]:
            raise ValueError(f"scan {k} dated {dates[k]} is not after scan {k - 1} ({dates[k - 1]}); expected dates "
                             "in strictly increasing order")
    present = [frozenset(p) for p in present]
    counted = present if countable is None else [frozenset(c) for c in countable]
    for k in range(n):
        if not counted[k] <= present[k]:
            raise ValueError(f"scan {k}: countable tracks {sorted(counted[k] - present[k])} are not present")

    def new(k: int, ref: int) -> tuple[int, ...]:
        return tuple(sorted(counted[k] - present[ref]))

    def confirming(k: int) -> int | None:
        return next((j for j in range(k + 1, n) if (dates[j] - dates[k]).days >= rule.interval_days), None)

    out: list[TimePointState | None] = [None] * n
    if n:
        out[0] = TimePointState(0, dates[0], None, (), BASELINE)
    decided: dict[int, tuple[int, str]] = {}  # a confirming scan that refuted: (the scan it decided, why)
    k = 1
    while k < n:
        ref = 0 if k == 1 else 1
        found = new(k, ref)
        confirms, note = decided.get(k, (None, ""))
        if len(found) < rule.min_new:
            out[k] = TimePointState(k, dates[k], ref, found, NO_PROGRESSION, confirms=confirms, note=note)
            k += 1
            continue
        c = confirming(k)
        for j in range(k + 1, n if c is None else c):
            out[j] = TimePointState(j, dates[j], 1, new(j, 1), NOT_EVALUABLE, note=(
                f"{(dates[j] - dates[k]).days} days after {_label(k, dates)}: less than {rule.interval_days} days, "
                f"cannot confirm its {len(found)} new lesions"))
        lead = f"{note}; " if note else ""
        if c is None:
            out[k] = TimePointState(k, dates[k], ref, found, UNCONFIRMED, confirms=confirms, note=(
                f"{lead}{len(found)} new lesions against {_label(ref, dates)}; no scan >= {rule.interval_days} days "
                "later to confirm them yet"))
            break
        if k == 1:
            extra = new(c, 1)
            confirmed = len(extra) >= rule.min_additional
            why = (f"{_label(c, dates)} shows {len(extra)} additional new lesions against t1 "
                   f"({'>=' if confirmed else '<'} {rule.min_additional})")
        else:
            still = [t for t in found if t in present[c]]
            confirmed = len(still) >= rule.min_persist
            why = (f"{len(still)} of its {len(found)} new lesions are present on {_label(c, dates)} "
                   f"({'>=' if confirmed else '<'} {rule.min_persist})")
        if not confirmed:
            out[k] = TimePointState(k, dates[k], ref, found, NOT_CONFIRMED, confirms=confirms,
                                    note=f"{lead}not confirmed: {why}")
            decided[c] = (k, f"refutes {_label(k, dates)}")
            k = c  # the confirming scan is then judged on its own, against t1
            continue
        state = progression_state(dates[k])
        out[k] = TimePointState(k, dates[k], ref, found, state, dates[k], confirms=confirms,
                                note=f"{lead}confirmed: {why}")
        for j in range(c, n):
            out[j] = TimePointState(j, dates[j], 1, new(j, 1), state, dates[k], confirms=k if j == c else None,
                                    note=f"confirms {_label(k, dates)}" if j == c else "after confirmed progression")
        break
    assert all(s is not None for s in out), "every scan has a state"
    return out  # type: ignore[return-value]


def pcwg3_tracks(dates: Sequence[dt.date], tracking: "Tracking", *, rule: Pcwg3Rule = Pcwg3Rule(),
                 min_lesion_ml: float = DEFAULT_MIN_LESION_ML) -> list[TimePointState]:
    """:func:`pcwg3_bone` of a timeline's lesion tracks (:mod:`analysis.monitoring.tracking`).

    A track is present at a scan when it has a lesion there (any size: a small lesion still persists
    and still keeps a later one from being new); it may count as new at tk when its volume there is at
    least ``min_lesion_ml`` (smaller, it is ``indeterminate``, as
    :func:`analysis.lesions.change_status` calls a new lesion below it) and tk's reference scan (t0
    for t1, t1 after) held its place in its field of view (a lesion outside the reference's field of
    view cannot be called new against it).

    Args:
        dates: the scans' dates, strictly increasing.
        tracking: the timeline's tracks, one step list per scan.
        rule: counts and interval.
        min_lesion_ml: ``followup``'s minimum size (ml); 0: every new lesion counts.
    """
    present, countable = [], []
    for k, steps in enumerate(tracking.steps):
        ref = 0 if k <= 1 else 1
        here = [s for s in steps if s.present]
        present.append({s.track for s in here})
        countable.append({s.track for s in here if s.volume_ml >= min_lesion_ml and ref not in s.unseen_by})
    return pcwg3_bone(dates, present, countable, rule=rule)
