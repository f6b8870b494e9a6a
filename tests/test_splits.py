from __future__ import annotations

import json
import logging

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.cohort.splits import groups_without_lesions, make_splits
from analysis.errors import InputError
from cli import main
from tests.conftest import write_tiny_cohort


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


def _groups(s):
    return [set(f["val"]) for f in s["folds"]] + ([set(s["test"])] if s["test"] else [])


@settings(max_examples=80, deadline=None)
@given(n=st.integers(min_value=10, max_value=30), folds=st.integers(min_value=1, max_value=5),
       frac=st.floats(min_value=0.0, max_value=0.4), seed=st.integers(0, 10_000), data=st.data())
def test_lesion_stratification_properties(n, folds, frac, seed, data):
    cases = [f"p{i:02d}" for i in range(n)]
    lesion = set(data.draw(st.lists(st.sampled_from(cases), unique=True, max_size=n)))
    plain = make_splits(cases, test_fraction=frac, folds=folds, seed=seed)
    s = make_splits(cases, test_fraction=frac, folds=folds, seed=seed, lesion_cases=lesion)
    groups = _groups(s)
    # the same sizes, still a partition of the non-test cases into validation sets
    assert [len(g) for g in groups] == [len(g) for g in _groups(plain)]
    rest = set(cases) - set(s["test"])
    for f in s["folds"]:
        assert set(f["train"]) | set(f["val"]) == rest
        assert folds == 1 or not set(f["train"]) & set(f["val"])
    # every group holds a lesion-bearing case when there are enough, else each lesion-bearing case has a group
    covered = sum(bool(g & lesion) for g in groups)
    assert covered == min(len(lesion), len(groups))
    assert len(groups_without_lesions(s, lesion)) == len(groups) - covered
    if all(g & lesion for g in _groups(plain)):
        assert s == plain  # an already balanced split is left as it was
    assert s == make_splits(list(reversed(cases)), test_fraction=frac, folds=folds, seed=seed,
                            lesion_cases=sorted(lesion))  # deterministic


def test_a_fold_without_lesions_gets_one():
    cases = [f"p{i:02d}" for i in range(12)]
    plain = make_splits(cases, test_fraction=0.25, folds=3, seed=7)
    # lesions only where the plain split left them out of fold 0's validation set
    lesion = set(cases) - set(plain["folds"][0]["val"])
    assert groups_without_lesions(plain, lesion) == ["fold 0's validation set"]
    s = make_splits(cases, test_fraction=0.25, folds=3, seed=7, lesion_cases=lesion)
    assert groups_without_lesions(s, lesion) == []
    assert all(set(f["val"]) & lesion for f in s["folds"]) and set(s["test"]) & lesion
    # one swap: fold 0 gave one case and got one lesion-bearing case
    moved = set(s["folds"][0]["val"]) - set(plain["folds"][0]["val"])
    assert len(moved) == 1 and moved <= lesion


def test_a_lesion_free_test_set_gets_one_when_a_fold_can_spare_it():
    cases = [f"p{i:02d}" for i in range(10)]
    plain = make_splits(cases, test_fraction=0.2, folds=2, seed=1)
    lesion = set(cases) - set(plain["test"])
    s = make_splits(cases, test_fraction=0.2, folds=2, seed=1, lesion_cases=lesion)
    assert groups_without_lesions(plain, lesion) == ["the test set"] and groups_without_lesions(s, lesion) == []
    assert len(s["test"]) == 2


def test_split_cli_names_the_folds_it_cannot_give_a_lesion(tmp_path, caplog):
    ds = write_tiny_cohort(tmp_path / "ds", n_cases=4)  # case_003 has no lesion
    with caplog.at_level(logging.WARNING, logger="analysis.cohort.splits"):
        r = CliRunner().invoke(main, ["split", str(ds), "--test-fraction", "0", "--folds", "4"])
    assert r.exit_code == 0, r.output
    s = json.loads((ds / "splits.json").read_text(encoding="utf-8"))
    fold = next(k for k, f in enumerate(s["folds"]) if f["val"] == ["case_003"])
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "analysis.cohort.splits"]
    assert len(lines) == 1 and "3 of 4 cases hold lesions" in lines[0]
    assert f"no lesion-bearing case in fold {fold}'s validation set;" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="analysis.cohort.splits"):
        r = CliRunner().invoke(main, ["split", str(ds), "--test-fraction", "0", "--folds", "3"])
    assert r.exit_code == 0 and not [rec for rec in caplog.records if rec.name == "analysis.cohort.splits"]
    s = json.loads((ds / "splits.json").read_text(encoding="utf-8"))
    assert all(set(f["val"]) - {"case_003"} for f in s["folds"])
