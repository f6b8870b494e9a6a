from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.cohort.splits import make_splits
from analysis.errors import InputError
from cli import main


@settings(max_examples=60, deadline=None)
@given(n=st.integers(min_value=12, max_value=40), folds=st.integers(min_value=2, max_value=5),
       frac=st.floats(min_value=0.0, max_value=0.5), seed=st.integers(0, 10_000))
def test_split_properties(n, folds, frac, seed):
    cases = [f"p{i:02d}" for i in range(n)]
    s = make_splits(cases, test_fraction=frac, folds=folds, seed=seed)
    test = set(s["test"])
    rest = set(cases) - test
    assert len(s["folds"]) == folds
    vals = [set(f["val"]) for f in s["folds"]]
    for f, val in zip(s["folds"], vals):
        assert not (set(f["train"]) | val) & test           # never a test case
        assert not set(f["train"]) & val                    # disjoint
        assert set(f["train"]) | val == rest                # fold covers the rest
    assert set().union(*vals) == rest                      # vals cover every non-test case
    assert sum(len(v) for v in vals) == len(rest)          # and are pairwise disjoint
    assert s == make_splits(list(reversed(cases)), test_fraction=frac, folds=folds, seed=seed)


def test_split_sizes_and_seed():
    cases = [f"p{i:02d}" for i in range(23)]
    s = make_splits(cases, test_fraction=0.2, folds=5, seed=1)
    assert len(s["test"]) == 5  # round(0.2 * 23)
    assert make_splits(cases, seed=2)["test"] != s["test"]


def test_too_few_cases():
    with pytest.raises(InputError, match="cannot make"):
        make_splits(["a", "b", "c"], folds=5)


def test_split_cli_writes_splits_json(tiny_cohort):
    r = CliRunner().invoke(main, ["split", str(tiny_cohort), "--test-fraction", "0", "--folds", "2", "--seed", "3"])
    assert r.exit_code == 0, r.output
    s = json.loads((tiny_cohort / "splits.json").read_text(encoding="utf-8"))
    assert s["seed"] == 3 and s["test"] == [] and len(s["folds"]) == 2
