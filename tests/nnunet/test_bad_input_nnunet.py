"""Bad input for `nnunet train` / `nnunet predict`: exit 2, one `error:` line naming the file,
no traceback, nothing written and nothing modified. Only checks that fail before any
nnU-Net work (no training needed), so the table runs in seconds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from analysis.cohort.splits import write_splits
from analysis.imaging.io import write_array
from tests.badinput import assert_clean_error, invoke, snapshot
from tests.conftest import make_geometry, write_tiny_cohort

CASE = "case_001"


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    ds = write_tiny_cohort(tmp_path / "ds", n_cases=4)
    write_splits(ds, test_fraction=0.25, folds=2)
    work = tmp_path / "work"
    work.mkdir()
    return {"tmp": tmp_path, "ds": ds, "work": work, "out": tmp_path / "PRED" / "nnunet"}


ARGS = {
    "train": lambda w: ["nnunet", "train", "--dataset", w["ds"], "--work", w["work"], "--folds", "0",
                        "--device", "cpu", "--epochs", "1"],
    "train-fold": lambda w: ["nnunet", "train", "--dataset", w["ds"], "--work", w["work"], "--folds", "0,4",
                             "--device", "cpu"],
    "predict": lambda w: ["nnunet", "predict", "--dataset", w["ds"], "--work", w["work"], "--out", w["out"],
                          "--device", "cpu", "--cases", "all"],
}


def splits(w, content):
    (w["ds"] / "splits.json").write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")


def multilabel(w):
    arr = np.zeros((6, 16, 20), np.uint8)
    arr[1:3, 2:6, 2:6] = 3
    write_array(arr, make_geometry((6, 16, 20)), w["ds"] / "labelsTr" / f"{CASE}.nii.gz")


I, L = f"imagesTr/{CASE}_0000.nii.gz", f"labelsTr/{CASE}.nii.gz"
CASES = [
    ("train", "missing splits.json", lambda w: (w["ds"] / "splits.json").unlink(), ["splits.json", "not found"]),
    ("train", "malformed splits.json", lambda w: splits(w, "{"), ["splits.json", "malformed"]),
    ("train", "splits.json unknown cases", lambda w: splits(w, {"test": [], "folds": [{"train": ["zz"], "val": []}]}),
     ["splits.json", "unknown case(s) zz"]),
    ("train", "image without label", lambda w: (w["ds"] / L).unlink(), [I, "image without a label"]),
    ("train", "missing dataset.json", lambda w: (w["ds"] / "dataset.json").unlink(), ["dataset.json", "not found"]),
    ("train-fold", "fold out of range", lambda w: None, ["--folds 0,4", "folds 0..1"]),
    ("predict", "work folder without a trained fold", lambda w: None, ["work", "no trained nnU-Net fold"]),
    ("predict", "label without image", lambda w: (w["ds"] / I).unlink(), [L, "label without an image"]),
    ("predict", "malformed dataset.json", lambda w: (w["ds"] / "dataset.json").write_text("{", encoding="utf-8"), ["dataset.json", "malformed"]),
]


@pytest.mark.parametrize("command,kind,damage,needles", CASES, ids=[f"{c}-{k}" for c, k, _, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, command, kind, damage, needles):
    damage(world)
    before = snapshot(world["tmp"])
    assert_clean_error(invoke(ARGS[command](world)), needles)
    assert snapshot(world["tmp"]) == before, "a file was written or modified"


def test_train_refuses_a_multilabel_mask_before_training(world):
    multilabel(world)
    r = invoke(ARGS["train"](world))
    assert_clean_error(r, [L, "3"])
    assert not list((world["work"]).rglob("*.pth")), "nnU-Net trained on a bad mask"
