"""analysis.prediction.shards: the one shard definition of `predict` and `nnunet predict`."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from analysis.errors import InputError
from analysis.prediction.shards import parse_shard, shard_cases


def test_golden_split():
    cases = ["c3", "c1", "c5", "c2", "c4"]
    assert shard_cases(cases, (0, 2)) == ["c1", "c3", "c5"]
    assert shard_cases(cases, (1, 2)) == ["c2", "c4"]
    assert shard_cases(cases, None) == ["c1", "c2", "c3", "c4", "c5"]
    assert shard_cases(cases, (4, 6)) == ["c5"] and shard_cases(cases, (5, 6)) == []


@given(st.lists(st.text(min_size=1, max_size=6), unique=True, max_size=30), st.integers(1, 8))
def test_shards_partition_any_case_list_whatever_its_order(cases, n):
    parts = [shard_cases(cases, (i, n)) for i in range(n)]
    flat = [c for part in parts for c in part]
    assert sorted(flat) == sorted(cases) and len(flat) == len(set(flat))
    assert parts == [shard_cases(list(reversed(cases)), (i, n)) for i in range(n)]
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced


@pytest.mark.parametrize("text", ["2/2", "-1/2", "0/0", "1", "a/b", "1/2/3", ""])
def test_bad_shards_are_input_errors(text):
    with pytest.raises(InputError, match="--shard"):
        parse_shard(text)
    assert parse_shard("3/4") == (3, 4) and parse_shard(None) is None
    with pytest.raises(InputError, match="--shard 2/2"):
        shard_cases(["a"], (2, 2))
