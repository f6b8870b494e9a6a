"""Reliability of the Keras commands (train, predict, gradcam, export, models).

* bad input: exit 2, one `error:` line naming the file, no traceback, nothing written or modified;
* an existing output folder is never clobbered without --overwrite;
* predict never modifies its inputs, and a SIGKILLed predict leaves no output; rerun is identical;
* train killed with SIGKILL mid-run resumes with --resume after its last committed epoch,
  with every epoch in history.csv exactly once;
* --deterministic training on the CPU is reproducible (identical history and weights).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from analysis.imaging.io import write_array
from tests.badinput import assert_clean_error, empty, invoke, snapshot, truncate, write_with
from tests.tf.conftest import make_cohort
from tests.tf.infer_runs import shared_runs

REPO = Path(__file__).resolve().parents[2]
CASE = "case_04"  # the test case of make_cohort's splits.json


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


@pytest.fixture
def world(tmp_path, runs):
    ds = make_cohort(tmp_path / "ds")
    return {"tmp": tmp_path, "ds": ds, "out": tmp_path / "OUT", "seg": runs.segmenter, "det": runs.detector,
            "notrun": tmp_path / "notrun", "cache": tmp_path / "cache"}


def image(w, case=CASE):
    return w["ds"] / "imagesTr" / f"{case}_0000.nii.gz"


def label(w, case=CASE):
    return w["ds"] / "labelsTr" / f"{case}.nii.gz"


def _geometry(w):
    from analysis.imaging.io import read_header

    return read_header(image(w))


ARGS = {
    "predict": lambda w: ["predict", "--model", w["seg"], "--dataset", w["ds"], "--out", w["out"]],
    "predict-notrun": lambda w: ["predict", "--model", w["notrun"], "--dataset", w["ds"], "--out", w["out"]],
    "predict-detector-as-cascade": lambda w: ["predict", "--model", w["seg"], "--detector", w["seg"],
                                              "--dataset", w["ds"], "--out", w["out"]],
    "gradcam": lambda w: ["gradcam", "--model", w["det"], "--dataset", w["ds"], "--out", w["out"]],
    "gradcam-segmenter": lambda w: ["gradcam", "--model", w["seg"], "--dataset", w["ds"], "--out", w["out"]],
    "export": lambda w: ["export", "--model", w["seg"], "--out", w["out"]],
    "export-notrun": lambda w: ["export", "--model", w["notrun"], "--out", w["out"]],
    "train": lambda w: ["train", "--dataset", w["ds"], "--task", "segment", "--arch", "unet", "--out", w["out"],
                        "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--image-size", "32",
                        "--width", "0.25", "--cache", w["cache"]],
    "train-fold": lambda w: [*ARGS["train"](w), "--fold", "7"],
    "models": lambda w: ["models", "--bogus"],
}


def notrun_empty(w):
    w["notrun"].mkdir()


def notrun_config(w):
    w["notrun"].mkdir()
    (w["notrun"] / "model.keras").write_bytes(b"PK\x03\x04 not really a keras file")
    (w["notrun"] / "config.json").write_text("{\"settings\": ", encoding="utf-8")


def nan_ct(w):
    ct = np.zeros(_geometry(w).shape, np.float32)
    ct[1, 2, 3] = np.nan
    write_array(ct, _geometry(w), image(w))


def multilabel(w):
    g = _geometry(w)
    arr = np.zeros(g.shape, np.uint8)
    arr[1, 5:9, 5:9] = 2
    write_array(arr, g, label(w))


def two_d(path: Path) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((40, 48), np.int16)), str(path))


def splits(w, content):
    (w["ds"] / "splits.json").write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")


I, L = f"imagesTr/{CASE}_0000.nii.gz", f"labelsTr/{CASE}.nii.gz"
TRAIN_CASE = "case_01"
CASES = [
    ("predict-notrun", "model folder not a RUN", notrun_empty, ["notrun", "not a RUN folder"]),
    ("predict-notrun", "RUN with malformed config", notrun_config, ["notrun/config.json", "malformed"]),
    ("predict-detector-as-cascade", "segmenter given as detector", lambda w: None, ["--detector", "expected a detector"]),
    ("predict", "NaN HU", nan_ct, [I, "NaN or infinite"]),
    ("predict", "truncated image", lambda w: truncate(image(w)), [I, "truncated"]),
    ("predict", "empty image", lambda w: empty(image(w)), [I, "file is empty"]),
    ("predict", "image without label", lambda w: label(w).unlink(), [I, "image without a label"]),
    ("predict", "missing dataset.json", lambda w: (w["ds"] / "dataset.json").unlink(), ["dataset.json", "not found"]),
    ("predict", "malformed splits.json", lambda w: splits(w, "{"), ["splits.json", "malformed"]),
    ("predict", "splits.json unknown cases", lambda w: splits(w, {"test": ["case_99"], "folds": [{"train": [], "val": []}]}),
     ["splits.json", "unknown case(s) case_99"]),
    ("gradcam-segmenter", "segmenter where a detector is needed", lambda w: None, ["expected a detector"]),
    ("gradcam", "truncated image", lambda w: truncate(image(w)), [I, "truncated"]),
    ("gradcam", "2D image", lambda w: two_d(image(w)), [I, "2D"]),
    ("export-notrun", "model folder not a RUN", notrun_empty, ["notrun", "not a RUN folder"]),
    ("export-notrun", "RUN with malformed config", notrun_config, ["notrun/config.json", "malformed"]),
    ("train", "label spacing", lambda w: write_with(label(w, TRAIN_CASE), _geometry(w), spacing=(1.0, 1.0, 2.0)),
     [f"labelsTr/{TRAIN_CASE}.nii.gz", "spacing"]),
    ("train", "label multi-label", lambda w: multilabel(w) or shutil.copy(label(w), label(w, TRAIN_CASE)),
     [f"labelsTr/{TRAIN_CASE}.nii.gz", "label values {2} found; expected only 0 and 1", "binarise"]),
    ("train", "NaN HU", lambda w: nan_ct(w) or shutil.copy(image(w), image(w, TRAIN_CASE)),
     [f"imagesTr/{TRAIN_CASE}_0000.nii.gz", "NaN or infinite"]),
    ("train", "label without image", lambda w: image(w, TRAIN_CASE).unlink(), [f"labelsTr/{TRAIN_CASE}.nii.gz", "label without an image"]),
    ("train", "malformed splits.json", lambda w: splits(w, "[1,"), ["splits.json", "malformed"]),
    ("train", "splits.json unknown cases", lambda w: splits(w, {"test": ["x9"], "folds": [{"train": ["x9"], "val": []}]}),
     ["splits.json", "unknown case(s) x9"]),
    ("train-fold", "fold out of range", lambda w: None, ["--fold 7", "folds 0..1"]),
    ("models", "unknown option", lambda w: None, ["--bogus"]),
]


def _outside_cache(root: Path) -> dict[str, str]:
    """Snapshot without train's slice cache: a content-keyed cache (not an output) whose entries
    are each written atomically, so cases cached before a bad one stay valid for the next run."""
    return {k: v for k, v in snapshot(root).items() if not (k == "cache" or k.startswith("cache/"))}


@pytest.mark.parametrize("command,kind,damage,needles", CASES, ids=[f"{c}-{k}" for c, k, _, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, command, kind, damage, needles):
    damage(world)
    before, run_before = _outside_cache(world["tmp"]), snapshot(world["seg"])
    assert_clean_error(invoke(ARGS[command](world)), needles)
    assert _outside_cache(world["tmp"]) == before, "a file was written or modified"
    assert snapshot(world["seg"]) == run_before, "the RUN folder was modified"


def test_predict_refuses_a_volume_too_large_for_memory(world, monkeypatch):
    import analysis.resources

    monkeypatch.setattr(analysis.resources, "available_memory", lambda: 1000)
    before = snapshot(world["tmp"])
    assert_clean_error(invoke(ARGS["predict"](world)), [CASE, "(6, 40, 48)", "needs about", "GiB of memory",
                                                        "--batch-size"])
    assert snapshot(world["tmp"]) == before


@pytest.mark.parametrize("command", ["predict", "export", "gradcam"])
def test_existing_output_is_not_clobbered(world, command):
    world["out"].mkdir()
    (world["out"] / "keep.txt").write_text("mine", encoding="utf-8")
    before = snapshot(world["tmp"])
    assert_clean_error(invoke(ARGS[command](world)), ["OUT", "exists", "--overwrite"])
    assert snapshot(world["tmp"]) == before


def test_predict_never_modifies_inputs_and_a_killed_predict_resumes(world):
    args = [str(a) for a in ARGS["predict"](world)] + ["--cases", "all"]
    before_ds, before_run = snapshot(world["ds"]), snapshot(world["seg"])
    reference = world["tmp"] / "REF"
    r = invoke([*args[:-4], "--out", reference, "--cases", "all"])
    assert r.exit_code == 0, r.output
    assert snapshot(world["ds"]) == before_ds and snapshot(world["seg"]) == before_run

    def started() -> bool:
        return (world["out"] / ".parts").is_dir()

    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not started() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "predict finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    # what a killed run leaves is finished cases only: every visible mask is complete
    for mask in world["out"].glob("*.nii.gz"):
        assert mask.read_bytes() == (reference / mask.name).read_bytes(), mask.name
    assert not (world["out"] / "predict.json").exists() or list(world["out"].glob("*.nii.gz"))
    r = invoke(args)  # the same command resumes: the finished cases are skipped, the rest done
    assert r.exit_code == 0, r.output
    masks = sorted(p.name for p in world["out"].glob("*.nii.gz"))
    assert masks and masks == sorted(p.name for p in reference.glob("*.nii.gz"))
    for name in masks:  # identical predictions (the mask files themselves)
        assert (world["out"] / name).read_bytes() == (reference / name).read_bytes(), name
    assert not [p for p in world["out"].iterdir() if p.name.startswith(".staging")], "a staging folder was left"
    assert snapshot(world["ds"]) == before_ds and snapshot(world["seg"]) == before_run


# --- training: SIGKILL and --resume; determinism ---------------------------------------------

def _history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _train_cmd(ds: Path, run: Path, cache: Path, epochs: int) -> list[str]:
    return [sys.executable, str(REPO / "cli.py"), "train", "--dataset", str(ds), "--task", "segment",
            "--arch", "unet", "--out", str(run), "--epochs", str(epochs), "--steps-per-epoch", "2",
            "--batch-size", "2", "--image-size", "32", "--width", "0.25", "--seed", "1", "--cache", str(cache)]


@pytest.mark.slow
def test_train_killed_mid_run_resumes_after_the_last_completed_epoch(tmp_path):
    ds = make_cohort(tmp_path / "ds")
    run, cache, epochs = tmp_path / "RUN", tmp_path / "cache", 3
    state = run / "checkpoints" / "state.json"
    proc = subprocess.Popen(_train_cmd(ds, run, cache, epochs), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if state.is_file() and json.loads(state.read_text(encoding="utf-8"))["epoch"] >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training finished (or failed) before it could be killed"
    time.sleep(0.3)  # into the next epoch
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    committed = json.loads(state.read_text(encoding="utf-8"))["epoch"]
    assert 1 <= committed < epochs
    before = _history(run)
    # state.json is the commit point; history.csv is rewritten from it just after (bonemets_tf.checkpoint),
    # so a kill between the two leaves history.csv one epoch behind, never ahead, and resume rewrites it
    assert [int(r["epoch"]) for r in before] in (list(range(1, committed + 1)), list(range(1, committed)))

    resumed = subprocess.run([*_train_cmd(ds, run, cache, epochs), "--resume"], cwd=REPO, capture_output=True,
                             text=True, timeout=300, encoding="utf-8", errors="replace")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"epoch {committed})" in resumed.stderr  # "resumed from ...epoch-000k.weights.h5 (epoch k)"
    after = _history(run)
    assert [int(r["epoch"]) for r in after] == list(range(1, epochs + 1))  # every epoch exactly once
    assert after[:len(before)] == before  # the completed epochs were kept, not retrained
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    # the last epoch's weights, the collapse guard's last good epoch (bonemets_tf.train), the commit point
    assert ckpts == ["epoch-%04d.weights.h5" % epochs, "good.weights.h5", "state.json"]
    assert (run / "model.keras").is_file()


@pytest.mark.slow
def test_deterministic_cpu_training_is_reproducible(tmp_path):
    from bonemets_tf.train import TrainConfig, train

    ds = make_cohort(tmp_path / "ds")
    config = TrainConfig(dataset=str(ds), task="segment", arch="unet", epochs=1, steps_per_epoch=2, batch_size=2,
                         image_size=32, width=0.25, seed=11, deterministic=True)
    a = train(config, tmp_path / "A", cache_dir=tmp_path / "cache")
    b = train(config, tmp_path / "B", cache_dir=tmp_path / "cache")
    assert _history(a) == _history(b)
    wa = Path(a) / "checkpoints" / "epoch-0001.weights.h5"
    wb = Path(b) / "checkpoints" / "epoch-0001.weights.h5"
    import keras

    ma, mb = keras.models.load_model(Path(a) / "model.keras"), keras.models.load_model(Path(b) / "model.keras")
    for x, y in zip(ma.get_weights(), mb.get_weights()):
        assert np.array_equal(x, y)
    assert wa.is_file() and wb.is_file()
    assert hashlib.sha256(b"".join(w.tobytes() for w in ma.get_weights())).hexdigest() == \
        hashlib.sha256(b"".join(w.tobytes() for w in mb.get_weights())).hexdigest()


def test_predict_refuses_what_is_not_ct_and_accepts_a_real_ct(world):
    """An MR-like volume (no air at -1000 HU) is refused with one line naming it; --no-ct-check lets it
    through; the real head CT of Debian's invesalius-examples is accepted (and resampled to the RUN's
    1 mm pixels from its 0.957 mm)."""
    from analysis.imaging.io import read_array
    from tests.real_ct import head_ct

    ct, geometry = read_array(image(world))
    mr = world["tmp"] / "mr" / "mr.nii.gz"
    write_array(np.clip(ct.astype(np.float32) + 1000.0, 0, None), geometry, mr)
    r = invoke(["predict", "--model", world["seg"], "--images", mr, "--out", world["out"]])
    assert_clean_error(r, [str(mr), "with nothing below 0: not CT in Hounsfield units", "--no-ct-check"])
    assert not (world["out"] / "mr.nii.gz").exists()
    r = invoke(["predict", "--model", world["seg"], "--images", mr, "--out", world["tmp"] / "forced", "--no-ct-check"])
    assert r.exit_code == 0, r.output
    assert (world["tmp"] / "forced" / "mr.nii.gz").is_file()
    head, head_geometry = head_ct()
    real = world["tmp"] / "real" / "head.nii.gz"
    from analysis.imaging.io import Geometry

    slab = Geometry(size=(256, 256, 8), spacing=head_geometry.spacing, origin=head_geometry.origin,
                    direction=head_geometry.direction)
    write_array(head[40:48], slab, real)  # 8 slices through the skull keep the test short
    r = invoke(["predict", "--model", world["seg"], "--images", real, "--out", world["tmp"] / "head", "--no-preview"])
    assert r.exit_code == 0, r.output
    record = json.loads((world["tmp"] / "head" / "predict.json").read_text(encoding="utf-8"))
    spacing = record["per_case"]["head"]["spacing"]
    assert spacing["resampled"] is True and spacing["model_xy_mm"] == [1.0, 1.0]
    assert spacing["input_xy_mm"] == pytest.approx([0.957031, 0.957031]) and spacing["network_shape_rc"] == [245, 245]
