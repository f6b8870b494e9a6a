"""Shards of a case list: the one definition used by ``predict`` and ``nnunet predict``.

``--shard i/n`` splits a run across ``n`` processes (machines, GPUs or a job array):
shard ``i`` (0-based) takes ``sorted(cases)[i::n]``. The ``n`` shards are disjoint, their
union is the whole selection, and the split depends only on the case ids (not on the order
they were listed or found in), so every process computes the same partition without
talking to the others.
"""
from __future__ import annotations

from typing import Sequence

from analysis.errors import InputError

Shard = tuple[int, int]


def parse_shard(text: str | None) -> Shard | None:
    """Parse ``--shard i/n`` (0-based ``i``, ``0 <= i < n``); None stays None.

    Args:
        text: the option's value, e.g. ``"0/4"``.

    Returns:
        ``(i, n)``, or None when ``text`` is None.

    Raises:
        InputError: not of the form ``i/n`` with integers ``0 <= i < n``.

    Examples:
        >>> parse_shard("1/4")
        (1, 4)
        >>> parse_shard(None) is None
        True
        >>> parse_shard("4/4")
        Traceback (most recent call last):
        ...
        analysis.errors.InputError: --shard 4/4: expected 0 <= i < n (i is 0-based), e.g. 0/4 .. 3/4
    """
    if text is None:
        return None
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise InputError(f"--shard {text!r}: expected i/n with integers, e.g. 0/4") from None
    return check_shard((i, n))


def check_shard(shard: Shard) -> Shard:
    """Return ``shard`` if ``0 <= i < n``.

    Raises:
        InputError: ``n < 1`` or ``i`` outside ``0..n-1``.
    """
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard {i}/{n}: expected 0 <= i < n (i is 0-based), e.g. 0/4 .. 3/4")
    return i, n


def shard_cases(cases: Sequence[str], shard: Shard | None) -> list[str]:
    """The deterministic share ``sorted(cases)[i::n]`` of shard ``(i, n)``.

    Args:
        cases: case ids (any order; duplicates are kept).
        shard: ``(i, n)``, or None for every case.

    Returns:
        The shard's case ids, sorted. May be empty when ``n > len(cases)``.

    Raises:
        InputError: an invalid shard (see :func:`check_shard`).

    Examples:
        >>> shard_cases(["c", "a", "d", "b", "e"], (0, 2))
        ['a', 'c', 'e']
        >>> shard_cases(["c", "a", "d", "b", "e"], (1, 2))
        ['b', 'd']
        >>> shard_cases(["b", "a"], (2, 3))
        []
    """
    ordered = sorted(cases)
    if shard is None:
        return ordered
    i, n = check_shard(shard)
    return ordered[i::n]
