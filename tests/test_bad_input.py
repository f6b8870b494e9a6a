"""Bad input, every data command: exit 2, one `error:` line naming the file and what was
expected vs found, no traceback, nothing written and nothing modified.

One table row per (command, kind of bad input). The framework commands have their own
tables in tests/tf/test_bad_input_tf.py and tests/nnunet/test_bad_input_nnunet.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from analysis.imaging.io import Geometry, read_header, write_array
from tests.badinput import assert_clean_error, empty, invoke, not_nifti, snapshot, truncate, write_with
from tests.conftest import make_geometry, write_tiny_cohort
from tests.test_imports import write_dicom_series

SHAPE = (6, 16, 20)
GEO = make_geometry(SHAPE)
CASE = "case_001"
RNG = np.random.default_rng(7)
HU = RNG.integers(-1000, 1500, size=(5, 12, 10)).astype(np.int16)


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    """A clean cohort (3 cases), perfect predictions PRED/m, and paths for other inputs."""
    ds = write_tiny_cohort(tmp_path / "ds", n_cases=3, shape=SHAPE)
    pred = tmp_path / "PRED"
    (pred / "m").mkdir(parents=True)
    for p in (ds / "labelsTr").iterdir():
        shutil.copy(p, pred / "m" / p.name)
    return {"tmp": tmp_path, "ds": ds, "pred": pred, "out": tmp_path / "OUT", "dicom": tmp_path / "dicom",
            "seg": tmp_path / "seg.nii.gz", "mask": tmp_path / "mask.nii.gz"}


def image(w, case=CASE):
    return w["ds"] / "imagesTr" / f"{case}_0000.nii.gz"


def label(w, case=CASE):
    return w["ds"] / "labelsTr" / f"{case}.nii.gz"


def pred(w, case=CASE):
    return w["pred"] / "m" / f"{case}.nii.gz"


def negatives(w, case=CASE):
    return w["ds"] / "negativesTr" / f"{case}.nii.gz"


def negatives_on_label(w):
    """A hard-negative map that marks the label's lesion voxels too."""
    from analysis.imaging.io import read_array

    lab, geometry = read_array(label(w))
    write_array((lab > 0).astype(np.uint8), geometry, negatives(w))


ARGS = {
    "validate": lambda w: ["validate", w["ds"]],
    "split": lambda w: ["split", w["ds"], "--folds", "2"],
    "analyze": lambda w: ["analyze", "--dataset", w["ds"], "--predictions", w["pred"], "--out", w["out"],
                          "--cases", "all", "--no-radiomics"],
    "analyze-test": lambda w: ["analyze", "--dataset", w["ds"], "--predictions", w["pred"], "--out", w["out"],
                               "--no-radiomics"],
    "import-bones": lambda w: ["import-bones", w["seg"], "--dataset", w["ds"], "--case", CASE],
    "import-reviews": lambda w: ["import-reviews", w["pred"] / "m", "--dataset", w["out"]],
    "import-dicom": lambda w: ["import-dicom", w["dicom"], "--dataset", w["ds"], "--case", "new"],
    "import-dicom-label": lambda w: ["import-dicom", w["dicom"], "--dataset", w["ds"], "--case", "new",
                                     "--label", w["mask"]],
    "phantom": lambda w: ["phantom", "--out", w["out"], "--cases", "1", "--shape", "8,32,32"],
    "phantom-paper": lambda w: ["phantom", "--out", w["out"], "--cases", "1", "--scale", "paper"],
    "phantom-small": lambda w: ["phantom", "--out", w["out"], "--shape", "4,32,32"],
}


# --- damage: each takes the world and breaks one thing ------------------------------------

def size(w, target=label):
    write_with(target(w), GEO, np.zeros((6, 16, 21), np.uint8), size=(21, 16, 6))


def spacing(w, target=label):
    write_with(target(w), GEO, spacing=(0.8, 0.9, 3.5))


def origin(w, target=label):
    write_with(target(w), GEO, origin=(-10.0, 5.0, 4.0))


def direction(w, target=label):
    write_with(target(w), GEO, direction=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))


def multilabel(w, target=label):
    arr = np.zeros(SHAPE, np.uint8)
    arr[1:3, 2:5, 2:5] = 2
    write_array(arr, GEO, target(w))


def nonfinite(value):
    def damage(w):
        ct = np.zeros(SHAPE, np.float32)
        ct[2, 3, 4] = value
        write_array(ct, GEO, image(w))
    return damage


def bone_maps(w):
    for p in (w["ds"] / "imagesTr").iterdir():
        write_array(np.full(SHAPE, 2, np.uint8), GEO, w["ds"] / "bonesTr" / p.name.replace("_0000", ""))


def dims(n):
    def damage(w, target=image):
        shape = {2: (16, 20), 4: (2, *SHAPE)}[n]
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros(shape, np.int16), isVector=False), str(target(w)))
    return damage


def dicom(w, **kw):
    write_dicom_series(w["dicom"], HU, **kw)


def two_series(w):
    dicom(w)
    other = w["tmp"] / "other"
    write_dicom_series(other, HU, series_uid="1.2.3.99")
    for f in other.iterdir():
        f.rename(w["dicom"] / f"b_{f.name}")
    other.rmdir()


def dicom_and_mask(w, values=(0, 1), shape=HU.shape):
    dicom(w)
    g = Geometry(size=tuple(reversed(shape)), spacing=(0.7, 0.7, 2.5), origin=(-50.0, -60.0, 100.0),
                 direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    arr = np.zeros(shape, np.uint8)
    arr.flat[: len(values)] = values
    write_array(arr, g, w["mask"])


def seg(w, array=None, geometry=GEO):
    write_array(np.zeros(geometry.shape, np.int16) + 27 if array is None else array, geometry, w["seg"])


def splits(w, content):
    (w["ds"] / "splits.json").write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")


def dataset_json(w, content):
    p = w["ds"] / "dataset.json"
    if content is None:
        p.unlink()
    else:
        p.write_text(content, encoding="utf-8")


def low_memory(monkeypatch, n_bytes):
    import analysis.resources

    monkeypatch.setattr(analysis.resources, "available_memory", lambda: n_bytes)


GOOD_SPLITS = {"seed": 0, "test": ["case_000"], "folds": [{"train": ["case_001"], "val": ["case_002"]}]}
L, I, P = "labelsTr/case_001.nii.gz", "imagesTr/case_001_0000.nii.gz", "m/case_001.nii.gz"
N = "negativesTr/case_001.nii.gz"

# (command, kind, damage, needles in the one error line)
CASES = [
    # image/label geometry (tolerances: analysis.imaging.io SPACING_RTOL, ORIGIN_ATOL_MM, DIRECTION_ATOL)
    ("validate", "label size", size, [L, "size (21, 16, 6) differs from (20, 16, 6)"]),
    ("validate", "label spacing", spacing, [L, "spacing (0.8, 0.9, 3.5) differs from (0.8, 0.9, 3)"]),
    ("validate", "label origin", origin, [L, "origin (-10, 5, 4) differs from (-10, 5, 2.5)"]),
    ("validate", "label direction", direction, [L, "direction (0, 1, 0"]),
    ("analyze", "label size", size, [L, "size (21, 16, 6) differs"]),
    ("analyze", "label spacing", spacing, [L, "spacing (0.8, 0.9, 3.5) differs"]),
    ("analyze", "label origin", origin, [L, "origin (-10, 5, 4) differs"]),
    ("analyze", "label direction", direction, [L, "direction"]),
    # prediction geometry, values, presence
    ("analyze", "prediction size", lambda w: size(w, pred), [P, "size (21, 16, 6) differs"]),
    ("analyze", "prediction spacing", lambda w: spacing(w, pred), [P, "spacing (0.8, 0.9, 3.5) differs"]),
    ("analyze", "prediction origin", lambda w: origin(w, pred), [P, "origin"]),
    ("analyze", "prediction direction", lambda w: direction(w, pred), [P, "direction"]),
    ("analyze", "prediction missing", lambda w: pred(w).unlink(), [P, "missing prediction of model m for case case_001"]),
    ("analyze", "prediction multi-label", lambda w: multilabel(w, pred), [P, "expected values 0 and 1, found 2", "binarise"]),
    ("analyze", "prediction truncated", lambda w: truncate(pred(w)), [P, "truncated"]),
    ("analyze", "prediction empty file", lambda w: empty(pred(w)), [P, "file is empty"]),
    # label values
    ("validate", "label multi-label", multilabel, [L, "label values {2} found; expected only 0 and 1", "binarise"]),
    ("analyze", "label multi-label", multilabel, [L, "expected values 0 and 1, found 2", "binarise"]),
    ("import-dicom-label", "label multi-label", lambda w: dicom_and_mask(w, values=(0, 1, 3)),
     ["mask.nii.gz", "label values {3} found; expected only 0 and 1", "binarise"]),
    ("import-dicom-label", "label size", lambda w: dicom_and_mask(w, shape=(5, 12, 11)),
     ["mask.nii.gz", "size (11, 12, 5) differs from (10, 12, 5)"]),
    # NaN / infinite HU
    ("validate", "NaN HU", nonfinite(np.nan), [I, "1 voxel(s) are NaN or infinite; expected finite values"]),
    ("validate", "infinite HU", nonfinite(np.inf), [I, "NaN or infinite"]),
    ("analyze", "NaN HU", nonfinite(np.nan), [I, "NaN or infinite"]),
    # with bone maps and --no-radiomics analyze never decodes the CT for its metrics; it still refuses it
    ("analyze", "NaN HU beside bone maps", lambda w: (bone_maps(w), nonfinite(np.nan)(w)), [I, "NaN or infinite"]),
    # truncated / not NIfTI / empty
    ("validate", "truncated image", lambda w: truncate(image(w)), [I, "truncated"]),
    ("validate", "not a NIfTI file", lambda w: not_nifti(image(w)), [I, "expected a NIfTI file"]),
    ("validate", "empty file", lambda w: empty(label(w)), [L, "file is empty, expected a NIfTI image"]),
    ("analyze", "truncated image", lambda w: truncate(image(w), 0.3), [I, "truncated"]),
    ("analyze", "not a NIfTI file", lambda w: not_nifti(label(w)), [L, "expected a NIfTI file"]),
    ("import-bones", "truncated map", lambda w: (seg(w), truncate(w["seg"])), ["seg.nii.gz", "truncated"]),
    ("import-bones", "not a NIfTI file", lambda w: not_nifti(w["seg"]), ["seg.nii.gz", "expected a NIfTI file"]),
    ("import-bones", "empty file", lambda w: empty(w["seg"]), ["seg.nii.gz", "file is empty"]),
    # 2D / 4D where 3D is needed
    ("validate", "2D image", dims(2), [I, "is a 2D image, expected 3D"]),
    ("validate", "4D image", dims(4), [I, "is a 4D image, expected 3D"]),
    ("analyze", "4D prediction", lambda w: dims(4)(w, pred), [P, "is a 4D image, expected 3D"]),
    ("import-bones", "2D map", lambda w: dims(2)(w, lambda _: w["seg"]), ["seg.nii.gz", "is a 2D image, expected 3D"]),
    ("import-bones", "map geometry", lambda w: seg(w, geometry=make_geometry((6, 16, 20), spacing=(1, 1, 3))),
     ["seg.nii.gz", "spacing (1, 1, 3) differs from (0.8, 0.9, 3)"]),
    ("import-bones", "non-integer map", lambda w: seg(w, np.full(SHAPE, 0.5, np.float32)), ["seg.nii.gz", "non-integer"]),
    # image without label, label without image
    ("validate", "image without label", lambda w: label(w).unlink(), [I, "image without a label; expected", L]),
    ("validate", "label without image", lambda w: image(w).unlink(), [L, "label without an image; expected", I]),
    ("split", "image without label", lambda w: label(w).unlink(), [I, "image without a label"]),
    ("split", "label without image", lambda w: image(w).unlink(), [L, "label without an image"]),
    ("analyze", "image without label", lambda w: label(w).unlink(), [I, "image without a label"]),
    ("analyze", "label without image", lambda w: image(w).unlink(), [L, "label without an image"]),
    # dataset.json
    ("validate", "missing dataset.json", lambda w: dataset_json(w, None), ["ds/dataset.json", "missing"]),
    ("validate", "malformed dataset.json", lambda w: dataset_json(w, "{oops"), ["ds/dataset.json", "malformed"]),
    ("validate", "dataset.json wrong labels", lambda w: dataset_json(w, json.dumps(
        {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1, "cyst": 2},
         "numTraining": 3, "file_ending": ".nii.gz"})), ["dataset.json", "'labels' must be", "found"]),
    ("split", "missing dataset.json", lambda w: dataset_json(w, None), ["ds/dataset.json", "not found"]),
    ("split", "malformed dataset.json", lambda w: dataset_json(w, "[1, 2"), ["ds/dataset.json", "malformed"]),
    ("analyze", "missing dataset.json", lambda w: dataset_json(w, None), ["ds/dataset.json", "not found"]),
    ("analyze", "malformed dataset.json", lambda w: dataset_json(w, "{oops"), ["ds/dataset.json", "malformed"]),
    # splits.json
    ("validate", "malformed splits.json", lambda w: splits(w, "{\"test\": ["), ["ds/splits.json", "malformed"]),
    ("validate", "splits.json unknown cases", lambda w: splits(w, {**GOOD_SPLITS, "test": ["case_999"]}),
     ["ds/splits.json", "unknown case(s) case_999"]),
    ("validate", "splits.json without folds", lambda w: splits(w, {"test": []}), ["ds/splits.json", "'folds' must be"]),
    ("analyze-test", "malformed splits.json", lambda w: splits(w, "not json"), ["ds/splits.json", "malformed"]),
    ("analyze-test", "splits.json unknown cases", lambda w: splits(w, {**GOOD_SPLITS, "test": ["case_999"]}),
     ["ds/splits.json", "unknown case(s) case_999"]),
    # DICOM
    ("import-dicom", "no series", lambda w: (w["dicom"].mkdir(), (w["dicom"] / "notes.txt").write_text("x", encoding="utf-8")),
     ["dicom", "no DICOM series found"]),
    ("import-dicom", "several series", lambda w: two_series(w),
     ["dicom", "holds 2 DICOM series", "1.2.3.99", "--series"]),
    ("import-dicom", "missing slice", lambda w: dicom(w, skip=(2,)), ["dicom", "uneven slice spacing", "expected 2.5 mm"]),
    # hard-negative maps (negativesTr): their image's geometry, 0/1, never on a lesion voxel
    ("validate", "hard negatives on the label", negatives_on_label, [N, "voxel(s) are also lesion in the label"]),
    ("validate", "hard-negative map size", lambda w: size(w, negatives), [N, "size (21, 16, 6) differs"]),
    ("validate", "hard-negative map values", lambda w: multilabel(w, negatives), [N, "values {2} found"]),
    ("import-reviews", "not a review root", lambda w: None, ["PRED/m", "neither a node's spool", "nor a PRED folder"]),
    # other
    ("validate", "dataset folder missing", lambda w: shutil.rmtree(w["ds"]), ["ds", "dataset folder not found"]),
    ("phantom-small", "grid too small", lambda w: None, ["shape (4, 32, 32)", "at least 8"]),
]


@pytest.mark.parametrize("command,kind,damage,needles", CASES, ids=[f"{c}-{k}" for c, k, _, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, command, kind, damage, needles):
    damage(world)
    before = snapshot(world["tmp"])
    result = invoke(ARGS[command](world))
    assert_clean_error(result, needles)
    assert snapshot(world["tmp"]) == before, "a file was written or modified"


# --- too large for memory: refused before allocating, saying how large -------------------

def test_phantom_paper_scale_refused_when_memory_is_short(world, monkeypatch):
    low_memory(monkeypatch, 500 * 2**20)
    line = assert_clean_error(invoke(ARGS["phantom-paper"](world)), ["OUT", "(385, 512, 512)", "needs about 1.5 GiB",
                                                                   "only 0.5 GiB is available", "--shape"])
    assert not world["out"].exists() and line
    assert not [p for p in world["tmp"].iterdir() if p.name.startswith(".OUT")]


def test_analyze_refused_when_memory_is_short(world, monkeypatch):
    low_memory(monkeypatch, 1000)
    before = snapshot(world["tmp"])
    assert_clean_error(invoke(ARGS["analyze"](world)), ["imagesTr/case_000_0000.nii.gz", "(6, 16, 20)",
                                                        "GiB of memory but only 0.0 GiB is available"])
    assert snapshot(world["tmp"]) == before


def test_require_memory_says_how_much():
    from analysis.errors import InputError
    from analysis.resources import require_memory

    require_memory(1, "tiny")
    with pytest.raises(InputError, match=r"^huge: needs about 9313225746\.2 GiB of memory but only .* GiB is "
                                         r"available; buy more$"):
        require_memory(10**19, "huge", hint="buy more")


# --- --debug shows the traceback ---------------------------------------------------------------

def test_debug_shows_a_traceback(world):
    label(world).unlink()
    import subprocess
    import sys

    cli = Path(__file__).resolve().parents[1] / "cli.py"
    plain = subprocess.run([sys.executable, str(cli), "split", str(world["ds"])], capture_output=True, text=True, encoding="utf-8", errors="replace")
    debug = subprocess.run([sys.executable, str(cli), "--debug", "split", str(world["ds"])], capture_output=True,
                           text=True, encoding="utf-8", errors="replace")
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "InputError" in debug.stderr


# --- an existing output folder is not clobbered without --overwrite -------------------------------

@pytest.mark.parametrize("command", ["phantom", "analyze"])
def test_existing_output_is_not_clobbered(world, command):
    world["out"].mkdir()
    (world["out"] / "keep.txt").write_text("mine", encoding="utf-8")
    before = snapshot(world["tmp"])
    assert_clean_error(invoke(ARGS[command](world)), ["OUT", "not empty", "--overwrite"])
    assert snapshot(world["tmp"]) == before
    assert invoke([*ARGS[command](world), "--overwrite"]).exit_code == 0
    assert not (world["out"] / "keep.txt").exists()


def test_import_does_not_replace_a_case_without_overwrite(world):
    dicom(world)
    ds = world["ds"]
    shutil.copy(image(world), ds / "imagesTr" / "new_0000.nii.gz")
    shutil.copy(label(world), ds / "labelsTr" / "new.nii.gz")
    before = snapshot(world["tmp"])
    assert_clean_error(invoke(ARGS["import-dicom"](world)), ["imagesTr/new_0000.nii.gz", "already exists", "--overwrite"])
    assert snapshot(world["tmp"]) == before
    assert read_header(image(world)) == read_header(ds / "imagesTr" / "new_0000.nii.gz")
