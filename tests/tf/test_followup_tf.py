"""`followup --model`: both CTs predicted through the Keras wing's one prediction path, then
compared (a tiny one-step UNet RUN; its masks are whatever it predicts, so the check is that the
comparison sees exactly the masks `predict --images` writes for each CT)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis.cohort.followup_phantom import Followups
from analysis.cohort.phantom import generate_cohort
from analysis.monitoring.followup import read_summary
from analysis.prediction.tables import read_lesions
from bonemets_tf.predict import PredictOptions, predict
from tests.badinput import invoke
from tests.tf.infer_runs import shared_runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


def test_followup_with_a_keras_model_runs_end_to_end(runs, tmp_path):
    ds = generate_cohort(tmp_path / "DS", cases=2, seed=0, companion=Followups())
    baseline = ds / "imagesTr" / "case_001_0000.nii.gz"
    followup = ds / "followup" / "imagesTr" / "case_001_0000.nii.gz"
    out = tmp_path / "out"
    result = invoke(["followup", "--baseline", baseline, "--followup", followup, "--model", runs.segmenter,
                     "--out", out])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "followup.json").read_text(encoding="utf-8"))
    assert record["model"]["model"] == str(runs.segmenter)
    assert record["model"]["predict"]["baseline"]["model"]["arch"] == "unet"
    assert record["registration"]["bone_dice"] >= 0.7
    summary = read_summary(out)
    for name, ct in (("baseline", baseline), ("followup", followup)):
        pred = tmp_path / f"pred_{name}"
        predict(str(runs.segmenter), None, str(pred), options=PredictOptions(cases="all", preview=False),
                images=str(ct))
        lesions = read_lesions(pred)
        assert int(summary[f"{name}_lesions"]) == len(lesions)
        assert float(summary[f"{name}_ml"]) == pytest.approx(sum(float(r["volume_ml"]) for r in lesions), rel=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DS", "out", "pred_baseline", "pred_followup"]
    assert record["model"]["predict"]["baseline"]["inference"]["spacing"]["resample"] is True


def test_followup_no_resample_reaches_the_keras_prediction(runs, tmp_path):
    """followup --no-resample runs the model at each CT's own pixel spacing, as predict --no-resample."""
    ds = generate_cohort(tmp_path / "DS", cases=1, seed=3, companion=Followups())
    out = tmp_path / "out"
    result = invoke(["followup", "--baseline", ds / "imagesTr" / "case_000_0000.nii.gz",
                     "--followup", ds / "followup" / "imagesTr" / "case_000_0000.nii.gz",
                     "--model", runs.segmenter, "--no-resample", "--out", out])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "followup.json").read_text(encoding="utf-8"))
    for scan in ("baseline", "followup"):
        spacing = record["model"]["predict"][scan]["inference"]["spacing"]
        assert spacing["resample"] is False, spacing


def test_serve_no_resample_reaches_the_node_models_prediction(runs, tmp_path):
    """serve --no-resample: the node's Keras model predicts a series at its own pixel spacing (the
    loader serve builds, called as the node calls it)."""
    import cli
    from analysis.cohort.examples import write_example_patients

    examples = write_example_patients(tmp_path / "ex", shape=(12, 48, 48), spacing=(0.8, 0.8, 2.5))
    series = Path(examples["dicom"]) / "pt_dicom"
    for resample in (True, False):
        load = cli._node_model_loader(str(runs.segmenter), None, {"crop": False, "min_size": 0, "bones": None,
                                                                  "bones_from": "project", "resample": resample})
        out = tmp_path / f"pred_{resample}"
        load().predict_series(series, out)
        spacing = json.loads((out / "predict.json").read_text(encoding="utf-8"))["inference"]["spacing"]
        assert spacing["resample"] is resample, spacing
