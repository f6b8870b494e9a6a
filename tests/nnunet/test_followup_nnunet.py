"""`followup --nnunet-work` and `timeline --nnunet-work`: the CTs predicted through `nnunet predict`'s one
path (a one-fold nnU-Net trained for two iterations; the check is that the comparison sees exactly the
masks `nnunet predict --images` writes for each CT, that a timeline of the same two CTs counts what
followup counts, and that this process never imports TensorFlow)."""
from __future__ import annotations

import json
import sys

import pytest

from analysis.cohort.followup_phantom import Followups
from analysis.cohort.phantom import generate_cohort
from analysis.cohort.splits import write_splits
from analysis.imaging.records import read_csv
from analysis.monitoring.followup import read_summary
from analysis.prediction.tables import read_lesions
from tests.badinput import invoke
from tests.conftest import write_tiny_cohort


def test_followup_with_nnunet_runs_end_to_end(tmp_path, one_thread):
    ds = write_tiny_cohort(tmp_path / "train", n_cases=4, shape=(4, 32, 32))
    write_splits(ds, test_fraction=0.25, folds=2, seed=0)
    work = tmp_path / "work"
    r = invoke(["nnunet", "train", "--dataset", ds, "--work", work, "--folds", "0", "--epochs", "1",
                "--iterations", "2", "--val-iterations", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    pair = generate_cohort(tmp_path / "DS", cases=2, seed=0, shape=(24, 64, 64), spacing=(2.0, 2.0, 6.0),
                           companion=Followups())
    baseline = pair / "imagesTr" / "case_001_0000.nii.gz"
    followup = pair / "followup" / "imagesTr" / "case_001_0000.nii.gz"
    out = tmp_path / "out"
    result = invoke(["followup", "--baseline", baseline, "--followup", followup, "--nnunet-work", work, "--out", out])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "followup.json").read_text(encoding="utf-8"))
    assert record["model"]["model"] == str(work)
    assert record["model"]["predict"]["followup"]["model"]["framework"] == "nnU-Net v2"
    summary = read_summary(out)
    pred = tmp_path / "pred"  # the baseline alone: each nnU-Net pass costs a minute on a small CPU
    r = invoke(["nnunet", "predict", "--images", baseline, "--work", work, "--out", pred, "--no-preview"])
    assert r.exit_code == 0, r.output
    lesions = read_lesions(pred)
    assert int(summary["baseline_lesions"]) == len(lesions)
    assert float(summary["baseline_ml"]) == pytest.approx(sum(float(x["volume_ml"]) for x in lesions), rel=1e-6)
    timeline = tmp_path / "timeline"
    result = invoke(["timeline", baseline, followup, "--nnunet-work", work, "--dates", "2025-01-06,2025-03-31",
                     "--out", timeline])
    assert result.exit_code == 0, result.output
    record = json.loads((timeline / "timeline.json").read_text(encoding="utf-8"))
    assert record["model"]["model"] == str(work)
    assert record["model"]["predict"]["model"]["framework"] == "nnU-Net v2"
    rows = read_csv(timeline / "timeline.csv")
    assert [int(r["lesions"]) for r in rows] == [int(summary["baseline_lesions"]), int(summary["followup_lesions"])]
    assert int(rows[1]["new"]) == int(summary["new"]) and int(rows[1]["resolved"]) == int(summary["resolved"])
    assert "tensorflow" not in sys.modules
