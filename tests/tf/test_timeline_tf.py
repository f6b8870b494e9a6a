"""`timeline --model`: every CT predicted through the Keras wing's one prediction path, then tracked (a tiny
one-step UNet RUN; its masks are whatever it predicts, so the check is that the timeline sees exactly the
masks `predict --images` writes for each CT)."""
from __future__ import annotations

import json

import pytest

from analysis.cohort.phantom import generate_cohort
from analysis.imaging.records import read_csv
from analysis.monitoring.timeline_phantom import SCANS_CSV, Timelines, scan_folder
from analysis.prediction.tables import read_lesions
from bonemets_tf.predict import PredictOptions, predict
from tests.badinput import invoke
from tests.tf.infer_runs import shared_runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


def test_timeline_with_a_keras_model_runs_end_to_end(runs, tmp_path):
    ds = generate_cohort(tmp_path / "DS", cases=2, seed=0, companion=Timelines(3))
    cts = [scan_folder(ds, k) / "imagesTr" / "case_001_0000.nii.gz" for k in range(3)]
    dates = [r["date"] for r in read_csv(ds / SCANS_CSV) if r["case"] == "case_001"]
    out = tmp_path / "out"
    result = invoke(["timeline", *cts, "--model", runs.segmenter, "--dates", ",".join(dates), "--out", out])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "timeline.json").read_text(encoding="utf-8"))
    assert record["model"]["model"] == str(runs.segmenter)
    assert record["model"]["predict"]["model"]["arch"] == "unet"
    assert [r["mask"] for r in record["inputs"]] == ["predicted"] * 3
    rows = read_csv(out / "timeline.csv")
    for k, ct in enumerate(cts):
        pred = tmp_path / f"pred_t{k}"
        predict(str(runs.segmenter), None, str(pred), options=PredictOptions(cases="all", preview=False),
                images=str(ct))
        lesions = read_lesions(pred)
        assert int(rows[k]["lesions"]) == len(lesions)
        assert float(rows[k]["total_ml"]) == pytest.approx(sum(float(r["volume_ml"]) for r in lesions), rel=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DS", "out", "pred_t0", "pred_t1", "pred_t2"]
