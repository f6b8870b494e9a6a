"""Nothing lost: inputs are never modified, and a command killed with SIGKILL leaves no
partial output; rerunning it removes the killed run's hidden temporary folder and gives
byte-identical results.

Outputs are built in a hidden sibling ``.OUT.<host>.<pid>.*.partial`` and renamed into
place when complete (:func:`analysis.imaging.io.atomic_directory`). SIGKILL cannot be caught, so
that folder stays behind; every reader ignores hidden entries and the next run for the
same output removes it (:func:`analysis.imaging.io.remove_stale_partials`).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from analysis.imaging.io import read_array, write_mask
from tests.badinput import invoke, snapshot

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict[str, Path]:
    """A small phantom (3 cases) and two prediction models: perfect and shifted by one voxel."""
    root = tmp_path_factory.mktemp("lost")
    ds = root / "ds"
    assert invoke(["phantom", "--out", ds, "--cases", "3", "--shape", "16,64,64", "--seed", "3"]).exit_code == 0
    pred = root / "PRED"
    for lab in sorted((ds / "labelsTr").glob("*.nii.gz")):
        arr, geom = read_array(lab)
        write_mask(arr, geom, pred / "perfect" / lab.name)
        write_mask(np.roll(arr, 1, axis=2), geom, pred / "shifted" / lab.name)
    return {"root": root, "ds": ds, "pred": pred}


def _analyze_args(study, out: Path) -> list[str]:
    return ["analyze", "--dataset", str(study["ds"]), "--predictions", str(study["pred"]), "--out", str(out),
            "--cases", "all"]


def _csvs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.csv"))}


def test_validate_split_analyze_never_modify_their_inputs(study, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(study["ds"], ds)
    before_ds, before_pred = snapshot(ds), snapshot(study["pred"])
    assert invoke(["validate", ds]).exit_code == 0
    assert snapshot(ds) == before_ds
    assert invoke(["split", ds, "--folds", "2"]).exit_code == 0
    after = snapshot(ds)
    assert after.pop("splits.json") and after == before_ds  # splits.json is split's output; the rest is untouched
    r = invoke([*_analyze_args({**study, "ds": ds}, tmp_path / "OUT"), "--no-radiomics"])
    assert r.exit_code == 0, r.output
    assert {k: v for k, v in snapshot(ds).items() if k != "splits.json"} == before_ds
    assert snapshot(study["pred"]) == before_pred


def _kill_when(cmd: list[str], ready, timeout: float = 60.0) -> int:
    """Start ``python cli.py CMD``, SIGKILL it as soon as ``ready()`` is true; return its exit status."""
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), *cmd], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"finished before it could be killed (exit {proc.returncode}): {cmd}")
            if time.monotonic() > deadline:
                pytest.fail(f"not ready after {timeout} s: {cmd}")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _partials(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".partial")]


@pytest.mark.slow
def test_killed_analyze_leaves_no_output_and_rerun_is_identical(study, tmp_path):
    reference = tmp_path / "REF"
    assert invoke(_analyze_args(study, reference)).exit_code == 0
    out = tmp_path / "OUT"

    def mid_run() -> bool:  # the run has started writing into its hidden partial folder
        return any(any(p.iterdir()) for p in _partials(tmp_path, "OUT"))

    status = _kill_when(_analyze_args(study, out), mid_run)
    assert status == -signal.SIGKILL
    assert not out.exists(), "a killed analyze left an OUT folder"
    assert len(_partials(tmp_path, "OUT")) == 1  # hidden, ignored, removed by the next run
    r = invoke(_analyze_args(study, out))
    assert r.exit_code == 0, r.output
    assert not _partials(tmp_path, "OUT"), "the rerun did not remove the killed run's partial folder"
    assert _csvs(out) == _csvs(reference) and len(_csvs(out)) == 17  # the paper's tables plus the lesion-level, flag and models tables


@pytest.mark.slow
def test_killed_phantom_leaves_no_dataset_and_rerun_is_identical(tmp_path):
    args = ["phantom", "--cases", "4", "--shape", "16,64,64", "--seed", "5"]
    assert invoke([*args, "--out", tmp_path / "REF"]).exit_code == 0
    out = tmp_path / "ds"

    def one_case_written() -> bool:
        return any((p / "labelsTr").is_dir() and any((p / "labelsTr").glob("*.nii.gz")) for p in _partials(tmp_path, "ds"))

    assert _kill_when([*args, "--out", str(out)], one_case_written) == -signal.SIGKILL
    assert not out.exists()
    assert invoke([*args, "--out", out]).exit_code == 0
    assert not _partials(tmp_path, "ds")
    assert snapshot(out) == snapshot(tmp_path / "REF")
