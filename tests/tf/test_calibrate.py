"""Validation-calibrated thresholds: the curve, the choice, calibration.json and --threshold auto."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis.cohort.layout import Cohort
from analysis.errors import InputError
from analysis.evaluation.metrics.overlap import slice_overlap
from analysis.imaging.io import read_array
from bonemets_tf.calibrate import THRESHOLDS, choose_threshold, dice_curve
from bonemets_tf.inference import Predictor, context_batch
from bonemets_tf.predict import PredictOptions, predict
from bonemets_tf.run import calibrated_threshold, read_run
from tests.tf.infer_runs import shared_runs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


def test_dice_curve_scores_only_lesion_slices_golden():
    prob = np.array([[[0.9, 0.4], [0.6, 0.1]], [[0.8, 0.8], [0.8, 0.8]]], np.float32)
    truth = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], np.uint8)  # slice 1 has no lesion: not scored
    sums, n = dice_curve(prob, truth, (0.3, 0.5, 0.95))
    assert n == 1
    # t=0.3: P = 3 pixels, 2 true -> 4/5; t=0.5: P = 2 pixels, 1 true -> 2/4; t=0.95: empty -> 0
    np.testing.assert_allclose(sums, [0.8, 0.5, 0.0])


def test_choose_threshold_prefers_the_best_then_the_nearest_to_half():
    assert choose_threshold((0.1, 0.3, 0.5, 0.7), (0.2, 0.6, 0.5, 0.1)) == 0.3
    assert choose_threshold((0.1, 0.3, 0.5, 0.7), (0.6, 0.6, 0.6, 0.2)) == 0.5
    assert choose_threshold((0.3, 0.7), (0.4, 0.4)) == 0.3


def test_train_writes_a_calibration_that_recomputes_from_the_validation_case(runs):
    record = json.loads((runs.segmenter / "calibration.json").read_text(encoding="utf-8"))
    config = json.loads((runs.segmenter / "config.json").read_text(encoding="utf-8"))
    assert record["cases"] == config["split"]["val"] == ["case_00"]
    assert record["thresholds"] == list(THRESHOLDS)
    # recompute independently: whole validation volume through the model, analysis's per-slice Dice
    cohort = Cohort(runs.train_dataset)
    ct = read_array(cohort.image_path("case_00"))[0].astype(np.float32)
    gt = read_array(cohort.label_path("case_00"))[0]
    probs = Predictor(read_run(runs.segmenter))(context_batch(ct, range(ct.shape[0]), 3))
    expected = [slice_overlap((probs >= t).astype(np.uint8), gt)[1].mean() for t in THRESHOLDS]
    np.testing.assert_allclose(record["dice"], expected, atol=1e-5)
    assert record["n_slices"] == int(gt.any(axis=(1, 2)).sum())
    assert record["threshold"] == choose_threshold(THRESHOLDS, record["dice"])
    assert record["dice_at_threshold"] == pytest.approx(max(expected), abs=1e-5)


def test_predict_threshold_auto_uses_the_calibrated_threshold(runs, tmp_path):
    t = calibrated_threshold(runs.segmenter)
    auto = predict(runs.segmenter, runs.oblique_dataset, tmp_path / "auto", options=PredictOptions(cases="all", threshold="auto"))
    fixed = predict(runs.segmenter, runs.oblique_dataset, tmp_path / "fixed", options=PredictOptions(cases="all", threshold=t))
    for case in Cohort(runs.oblique_dataset).cases():
        np.testing.assert_array_equal(read_array(auto / f"{case}.nii.gz")[0], read_array(fixed / f"{case}.nii.gz")[0])
    record = json.loads((auto / "predict.json").read_text(encoding="utf-8"))
    assert record["threshold"] == t and record["threshold_source"].startswith("auto")
    assert json.loads((fixed / "predict.json").read_text(encoding="utf-8"))["threshold_source"] == "option"


def test_threshold_auto_without_calibration_is_refused_before_writing(runs, tmp_path):
    import shutil

    run = tmp_path / "run_without_calibration"
    shutil.copytree(runs.segmenter, run)
    (run / "calibration.json").unlink()
    with pytest.raises(InputError, match="calibration.json: not found"):
        predict(run, runs.oblique_dataset, tmp_path / "out", options=PredictOptions(cases="all", threshold="auto"))
    assert not (tmp_path / "out").exists()
    (run / "calibration.json").write_text('{"threshold": 1.5}', encoding="utf-8")
    with pytest.raises(InputError, match="expected a 'threshold' in"):
        calibrated_threshold(run)


def test_cli_threshold_must_be_a_number_or_auto(runs, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "predict", "--model", str(runs.segmenter), "--dataset",
                           str(runs.oblique_dataset), "--out", str(tmp_path / "o"), "--threshold", "half"],
                          capture_output=True, text=True, encoding="utf-8", cwd=ROOT)
    assert proc.returncode == 2 and "expected a probability in [0, 1] or 'auto'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_detector_curves_golden_and_f1_threshold_in_calibration_json(tmp_path):
    from bonemets_tf.calibrate import DETECTOR_THRESHOLDS, calibrate_detector, detection_curves

    labels = np.array([1, 1, 0, 0, 0], bool)
    probs = np.array([0.31, 0.30, 0.305, 0.2, 0.1])  # all below 0.5 and within 0.01 at the top
    c = detection_curves(labels, probs, (0.3, 0.31, 0.5))
    # t=0.3: calls 0,1,2 -> tp 2, fp 1: P 2/3, R 1, F1 0.8, J 1 - 1/3; t=0.31: P 1, R 1/2, F1 2/3; t=0.5: none
    np.testing.assert_allclose(c["precision"], [2 / 3, 1, 0])
    np.testing.assert_allclose(c["recall"], [1, 0.5, 0])
    np.testing.assert_allclose(c["f1"], [0.8, 2 / 3, 0])
    np.testing.assert_allclose(c["youden_j"], [2 / 3, 0.5, 0])
    np.testing.assert_array_equal(c["positive_calls"], [3, 1, 0])
    run = tmp_path / "RUN"
    run.mkdir()
    record = calibrate_detector(run, ["case_00"], labels, probs)
    saved = json.loads((run / "calibration.json").read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(record))
    assert saved["task"] == "detect" and saved["thresholds"] == list(DETECTOR_THRESHOLDS)
    assert saved["threshold"] == 0.3 and saved["f1_at_threshold"] == pytest.approx(0.8)  # a distinct probability
    assert saved["f1_at_0.5"] == 0 and saved["positive_calls_at_0.5"] == 0 and saved["positive_calls_at_threshold"] == 3
    assert saved["auc"] == pytest.approx(5 / 6)
    assert calibrated_threshold(run) == 0.3
