"""Patient-level hold-out test set and k-fold cross-validation splits.

One case is one patient, so splitting cases never leaks a patient's slices between
training, validation and test (the paper's 80:20 train/test split is patient-level).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from analysis.cohort.layout import Cohort
from analysis.errors import InputError
from analysis.imaging.io import atomic_write_json, require_writable


def make_splits(cases: Sequence[str], *, test_fraction: float = 0.2, folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """Shuffle ``cases`` with ``seed`` and split them into a test set and ``folds`` folds.

    The test set holds ``round(test_fraction * n)`` cases (at least one when the fraction
    is positive and at least two cases remain for training). The remaining cases are
    dealt round-robin into ``folds`` validation sets; fold k trains on every other
    non-test case. Folds are disjoint, never contain a test case, and their validation
    sets together cover every non-test case.

    Args:
        cases: case ids (patients).
        test_fraction: share of patients held out for testing, in [0, 1).
        folds: number of cross-validation folds, >= 2 (or 1: train = val = all).
        seed: shuffling seed.

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
    test = sorted(order[:n_test])
    rest = order[n_test:]
    fold_list = []
    if folds == 1:
        fold_list.append({"train": sorted(rest), "val": sorted(rest)})
    else:
        for k in range(folds):
            val = sorted(rest[k::folds])
            train = sorted(c for c in rest if c not in set(val))
            fold_list.append({"train": train, "val": val})
    return {"seed": int(seed), "test_fraction": float(test_fraction), "test": test, "folds": fold_list}


def write_splits(dataset: str | os.PathLike, *, test_fraction: float = 0.2, folds: int = 5, seed: int = 0) -> Path:
    """Make splits over the cohort's cases and write ``DATASET/splits.json`` atomically.

    Raises:
        InputError: the cohort is missing, has too few cases, or cannot be written (a read-only mount).
    """
    cohort = Cohort(dataset)
    cohort.require_exists()
    require_writable(cohort.root)
    cases = cohort.cases()
    if not cases:
        raise InputError(f"{cohort.root}: no case has both imagesTr/<case>_0000.nii.gz and labelsTr/<case>.nii.gz")
    splits = make_splits(cases, test_fraction=test_fraction, folds=folds, seed=seed)
    return atomic_write_json(cohort.splits_path, splits)
