"""Patient-level hold-out test set and k-fold cross-validation splits.

One case is one patient, so splitting cases never leaks a patient's slices between
training, validation and test (the paper's 80:20 train/test split is patient-level).

Lesion-bearing cases are spread so that every validation fold (and the test set) holds
one where the cohort allows: a validation fold without lesion leaves its training run no
validation Dice or AUC to choose a checkpoint by (issue #31), and a test set without lesion
no Dice to report. The rule only moves cases where a group has none, so a split that already
has a lesion-bearing case in every group is the plain shuffled one.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np

from analysis.cohort.layout import Cohort
from analysis.errors import InputError
from analysis.imaging.io import atomic_write_json, read_array, require_writable

log = logging.getLogger(__name__)


def make_splits(cases: Sequence[str], *, test_fraction: float = 0.2, folds: int = 5, seed: int = 0,
                lesion_cases: Collection[str] | None = None) -> dict[str, Any]:
    """Shuffle ``cases`` with ``seed`` and split them into a test set and ``folds`` folds.

    The test set holds ``round(test_fraction * n)`` cases (at least one when the fraction
    is positive and at least two cases remain for training). The remaining cases are
    dealt round-robin into ``folds`` validation sets; fold k trains on every other
    non-test case. Folds are disjoint, never contain a test case, and their validation
    sets together cover every non-test case.

    With ``lesion_cases``, each group (validation set of fold 0, 1, ..., then the test set)
    that holds no lesion-bearing case swaps one of its cases for a lesion-bearing case of
    the group holding the most of them (the first such group; its first such case in the
    shuffled order), as long as that group holds at least two. Group sizes stay, a group
    never loses its last lesion-bearing case, and a split where every group already holds
    one is returned unchanged. In the end every group holds a lesion-bearing case when the
    cohort has at least as many as there are groups; otherwise each lesion-bearing case
    is in a group of its own and :func:`groups_without_lesions` names the rest.

    Args:
        cases: case ids (patients).
        test_fraction: share of patients held out for testing, in [0, 1).
        folds: number of cross-validation folds, >= 2 (or 1: train = val = all).
        seed: shuffling seed.
        lesion_cases: the cases whose label holds a lesion voxel (None: no stratification).

    Returns:
        ``{"seed": seed, "test_fraction": f, "test": [...], "folds": [{"train": [...], "val": [...]}, ...]}``

    Raises:
        InputError: too few cases for the requested split, or bad arguments.
    """
    cases = sorted(set(cases))
    if not 0.0 <= test_fraction < 1.0:
        raise InputError(f"--test-fraction {test_fraction}: expected a value in [0, 1)")
    if folds < 1:
        raise InputError(f"--folds {folds}: expected at least 1")
    n = len(cases)
    n_test = int(round(test_fraction * n))
    if test_fraction > 0 and n_test == 0 and n >= 3:
        n_test = 1
    n_rest = n - n_test
    if n_rest < max(folds, 1) or (folds > 1 and n_rest < 2):
        raise InputError(f"{n} case(s) cannot make a test set of {n_test} and {folds} folds; "
                         f"expected at least {n_test + max(folds, 2)} cases")
    rng = np.random.default_rng(seed)
    order = [cases[i] for i in rng.permutation(n)]
    test, rest = order[:n_test], order[n_test:]
    vals = [rest] if folds == 1 else [rest[k::folds] for k in range(folds)]
    if lesion_cases is not None:
        _spread_lesions(vals + ([test] if test else []), set(lesion_cases))
    fold_list = []
    for k, val in enumerate(vals):
        train = val if folds == 1 else [c for j, other in enumerate(vals) if j != k for c in other]
        fold_list.append({"train": sorted(train), "val": sorted(val)})
    return {"seed": int(seed), "test_fraction": float(test_fraction), "test": sorted(test), "folds": fold_list}


def _spread_lesions(groups: list[list[str]], lesion: set[str]) -> None:
    """Swap cases between ``groups`` (in place) by the rule of :func:`make_splits`."""
    def count(group: list[str]) -> int:
        return sum(c in lesion for c in group)

    for group in groups:
        if count(group) or not group:
            continue
        donor = max(groups, key=count)  # the first of the groups holding the most
        if count(donor) < 2:
            return  # every lesion-bearing case is alone in its group: nothing more can move
        i = next(i for i, c in enumerate(donor) if c in lesion)
        donor[i], group[0] = group[0], donor[i]


def groups_without_lesions(splits: dict[str, Any], lesion_cases: Collection[str]) -> list[str]:
    """The groups of ``splits`` without a lesion-bearing case: ``"fold K's validation set"``
    for each such fold, then ``"the test set"`` when it is not empty and holds none."""
    lesion = set(lesion_cases)
    names = [f"fold {k}'s validation set" for k, fold in enumerate(splits["folds"]) if not lesion & set(fold["val"])]
    if splits["test"] and not lesion & set(splits["test"]):
        names.append("the test set")
    return names


def write_splits(dataset: str | os.PathLike, *, test_fraction: float = 0.2, folds: int = 5, seed: int = 0) -> Path:
    """Make splits over the cohort's cases, stratified by lesion (:func:`make_splits`), and
    write ``DATASET/splits.json`` atomically. Logs one warning naming the folds (and the test
    set) left without a lesion-bearing case when the cohort has too few.

    Raises:
        InputError: the cohort is missing, has too few cases, or cannot be written (a read-only mount).
    """
    cohort = Cohort(dataset)
    cohort.require_exists()
    require_writable(cohort.root)
    cases = cohort.cases()
    if not cases:
        raise InputError(f"{cohort.root}: no case has both imagesTr/<case>_0000.nii.gz and labelsTr/<case>.nii.gz")
    lesion_cases = [c for c in cases if has_lesion(cohort, c)]
    splits = make_splits(cases, test_fraction=test_fraction, folds=folds, seed=seed, lesion_cases=lesion_cases)
    missing = groups_without_lesions(splits, lesion_cases)
    if missing:
        outside = len(set(lesion_cases) - set(splits["test"]))
        log.warning("%s: %d of %d cases hold lesions (%d outside the test set), too few for %d fold(s)%s: "
                    "no lesion-bearing case in %s; `train` on such a fold keeps its last epoch",
                    cohort.splits_path, len(lesion_cases), len(cases), outside, len(splits["folds"]),
                    " and a test set" if splits["test"] else "", ", ".join(missing))
    return atomic_write_json(cohort.splits_path, splits)


def has_lesion(cohort: Cohort, case: str) -> bool:
    """Whether ``case``'s label holds a lesion voxel (any non-zero voxel).

    Raises:
        InputError: the label cannot be read.
    """
    label, _ = read_array(cohort.label_path(case))
    return bool(np.any(label))
