"""Sharded `predict` into ONE folder: three shards of a cohort, run one after another or at the
same time into the same OUT, give exactly the folder of one unsharded run: the same masks byte
for byte, one slices.csv row for row, one predict.json listing every case. Uses the shared tiny
RUNs of the inference tests."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli
from tests.tf.infer_runs import shared_runs

N = 3
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


def _args(model: Path, dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "--model", str(model), "--dataset", str(dataset), "--out", str(out), "--cases", "all", *extra]


def _predict(*args) -> Path:
    result = CliRunner().invoke(cli.main, _args(*args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return Path(args[2])


def _visible(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def test_segmenter_shards_fill_one_folder_exactly_like_an_unsharded_run(runs, tmp_path):
    whole = _predict(runs.segmenter, runs.train_dataset, tmp_path / "whole")
    for i in range(N):
        _predict(runs.segmenter, runs.train_dataset, tmp_path / "sharded", "--shard", f"{i}/{N}")
    got, ref = _visible(tmp_path / "sharded"), _visible(whole)
    masks = sorted(k for k in ref if k.endswith(".nii.gz"))
    assert len(masks) == 5 and sorted(k for k in got if k.endswith(".nii.gz")) == masks
    assert all(got[k] == ref[k] for k in masks)  # byte for byte
    record = json.loads(got["predict.json"])
    assert record["cases"] == json.loads(ref["predict.json"])["cases"] == [m[:-7] for m in masks]
    assert sorted(c for r in record["runs"] for c in r["cases_run"]) == record["cases"] and len(record["runs"]) == N
    assert record["slices"] == json.loads(ref["predict.json"])["slices"]


def test_detector_shards_at_the_same_time_give_one_slices_csv(runs, tmp_path):
    whole = _predict(runs.detector, runs.train_dataset, tmp_path / "whole")
    out = tmp_path / "together"
    procs = [subprocess.Popen([sys.executable, str(ROOT / "cli.py"),
                               *_args(runs.detector, runs.train_dataset, out, "--shard", f"{i}/{N}")],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8")
             for i in range(N)]
    for p in procs:
        output, _ = p.communicate(timeout=600)
        assert p.returncode == 0, output
    assert (out / "slices.csv").read_bytes() == (whole / "slices.csv").read_bytes()  # row for row
    assert len((out / "slices.csv").read_text(encoding="utf-8").splitlines()) == 1 + 5 * 6
    assert json.loads((out / "predict.json").read_text(encoding="utf-8"))["cases"] == \
        json.loads((whole / "predict.json").read_text(encoding="utf-8"))["cases"]


def test_rerun_skips_finished_cases_and_other_settings_are_refused(runs, tmp_path):
    out = _predict(runs.segmenter, runs.train_dataset, tmp_path / "p", "--shard", f"0/{N}")
    before = _visible(out)
    again = CliRunner().invoke(cli.main, _args(runs.segmenter, runs.train_dataset, out, "--shard", f"0/{N}"),
                               catch_exceptions=False)
    assert again.exit_code == 0, again.output
    record = json.loads((out / "predict.json").read_text(encoding="utf-8"))
    assert [r["cases_run"] for r in record["runs"]] == [["case_00", "case_03"], []]  # the rerun did nothing
    assert _visible(out)["case_00.nii.gz"] == before["case_00.nii.gz"]
    other = CliRunner().invoke(cli.main, _args(runs.segmenter, runs.train_dataset, out, "--threshold", "0.3"))
    assert other.exit_code == 2 and "other settings (threshold)" in other.output and "--overwrite" in other.output
