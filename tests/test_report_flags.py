"""Training flags in analyze and the report: "did not learn", "not trained (N iterations)",
detectors whose calls are all one class, and not-trained nnU-Net left out of the comparisons;
the training budgets and the paper's order above the segmentation table."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from analysis.evaluation.analyze import run_analysis
from analysis.evaluation.settings import differences, model_rows
from nnunet_bridge.env import CHECKPOINT, WorkLayout
from nnunet_bridge.train import training_status
from tests.test_analyze import make_cohort


def _rows(out: Path, name: str) -> list[dict[str, str]]:
    with open(out / name, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _record(pred: Path, name: str, training: dict | None, **extra) -> None:
    record = {"cases": [], **extra}
    if training is not None:
        record["training"] = training
    (pred / name / "predict.json").write_text(json.dumps(record), encoding="utf-8")


def test_flags_exclusions_and_calibrated_detector_threshold(tmp_path):
    ds, pred = make_cohort(tmp_path)
    shutil.copytree(pred / "partial", pred / "nnunet", ignore=shutil.ignore_patterns("probabilities", "dicom_seg"))
    _record(pred, "nnunet", {"learned": False, "reason": "not trained: validation Dice 0.012 after 6 iterations ...",
                             "iterations": 6, "validation_dice": 0.012},
            budget={"width": 0.25, "steps": 6, "batch_size": 16, "samples": 96, "patch": [64, 64],
                    "plan": "nnUNetPlans_w0.25_b16_p64x64", "spacing_xy_mm": [1.0, 1.0]},
            inference={"spacing": {"resample": True,
                                   "model": {"xy_mm": [1.0, 1.0], "used": "model's (nnU-Net's ...)"}}})
    _record(pred, "perfect", {"learned": False, "reason": "did not learn: best validation dice 0.000",
                              "best_val": 0.0, "empty_level": 0.0, "guard_events": 0},
            budget={"width": 0.25, "steps": 240, "batch_size": 16, "samples": 3840, "patch": [64, 64], "plan": None,
                    "spacing_xy_mm": [1.0, 1.0]},
            inference={"spacing": {"resample": False, "model": {"xy_mm": [1.0, 1.0], "used": "input's own"}}})
    # "partial" has no predict.json: unknown, no flag
    rows = ["case,slice,probability"] + [f"case_{i:02d},{z},{0.1 + 0.04 * z}" for i in range(2) for z in range(8)]
    (pred / "detector" / "slices.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")  # all below 0.5
    run = tmp_path / "RUN"
    run.mkdir()
    (run / "calibration.json").write_text(json.dumps({"task": "detect", "threshold": 0.3}), encoding="utf-8")
    _record(pred, "detector", {"learned": True, "reason": "best validation auc 0.8", "best_val": 0.8,
                               "empty_level": 0.5, "guard_events": 1}, model={"run": str(run)})

    out = run_analysis(ds, pred, tmp_path / "OUT", cases="all", radiomics=True, jobs=1)

    flags = {r["model"]: r for r in _rows(out, "model_flags.csv")}
    assert flags["nnunet"]["flag"] == "not trained (6 iterations; validation Dice 0.012)"
    assert flags["nnunet"]["compared"] == "false"
    assert flags["perfect"]["flag"] == "did not learn" and flags["perfect"]["compared"] == "true"
    assert flags["partial"]["flag"] == "" and flags["partial"]["learned"] == ""
    assert flags["detector"]["flag"] == "all 16 slice calls negative at 0.5"
    pairs = {(r["model_a"], r["model_b"]) for r in _rows(out, "ttests.csv")}
    assert pairs == {("partial", "perfect")}  # nnunet left out
    assert {r["model"] for r in _rows(out, "radiomics_icc.csv")} <= {"partial", "perfect"}
    thresholds = {(r["model"], r["source"]): r for r in _rows(out, "detection_thresholds.csv")}
    assert float(thresholds["detector", "fixed"]["threshold"]) == 0.5
    assert thresholds["detector", "fixed"]["positive_calls"] == "0"
    calibrated = thresholds["detector", "calibrated"]
    # probabilities 0.1 + 0.04 z >= 0.3 for z >= 5: slices 5, 6, 7 (truth 5 and 6 positive) in each case
    assert float(calibrated["threshold"]) == 0.3 and calibrated["positive_calls"] == "6"
    assert float(calibrated["precision"]) == pytest.approx(4 / 6) and float(calibrated["recall"]) == pytest.approx(4 / 10)
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "## Model training status" in report
    assert "perfect (**did not learn**)" in report
    assert "nnunet (**not trained (6 iterations; validation Dice 0.012)**)" in report
    assert report.count("Left out (not trained): nnunet.") == 2  # t-tests and radiomics
    assert "validation-calibrated" in report
    start = report.index("## Segmentation\n")
    segmentation = report[start:report.index("| model | n slices", start)]
    assert ("nnunet: width 0.25, 96 samples seen (6 steps of 16 patches of 64×64), plan nnUNetPlans_w0.25_b16_p64x64, "
            "trained at 1×1 mm pixels;" in segmentation)
    assert ("perfect: width 0.25, 3,840 samples seen (240 steps of 16 crops of 64×64), trained at 1×1 mm pixels"
            in segmentation)
    assert "partial: training budget not recorded" in segmentation
    assert ("**Not comparable budgets**: width not recorded for every model; crop not recorded for every model; "
            "pixel spacing not recorded" in segmentation)
    models = {r["model"]: r for r in _rows(out, "models.csv")}
    assert (models["nnunet"]["train_spacing_mm"], models["nnunet"]["spacing_used"]) == ("1x1", "training")
    assert (models["perfect"]["train_spacing_mm"], models["perfect"]["spacing_used"]) == ("1x1", "input's own")
    assert models["partial"]["spacing_used"] == ""
    # perfect ran with --no-resample, nnU-Net at its plan's spacing: a difference when they are compared
    assert differences(model_rows(pred, ["perfect", "nnunet"], {}), ["perfect", "nnunet"]) == [
        "the pixel spacing run at differs: each input's own for perfect; each model's training spacing for nnunet"]
    assert "| training (1×1 mm) |" in report and "| input's own |" in report
    assert "samples seen not recorded for every model" in segmentation
    nnunet_dice = next(float(r["dice_mean"]) for r in _rows(out, "segmentation_summary.csv") if r["model"] == "nnunet")
    assert (f"Order by Dice: paper nnUNetv2 73.4 > ResAttUNet 61.6 > ResUNet 59.0 > UNet 55.9; here nnunet "
            f"{100 * nnunet_dice:.1f}.") in segmentation
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["not_compared"] == ["nnunet"]


def test_no_records_no_flags(tmp_path):
    ds, pred = make_cohort(tmp_path)
    out = run_analysis(ds, pred, tmp_path / "OUT", cases="all", radiomics=False, jobs=1)
    assert all(r["flag"] == "" for r in _rows(out, "model_flags.csv"))
    assert "## Model training status" not in (out / "report.md").read_text(encoding="utf-8")


def test_nnunet_training_status_from_work_records(tmp_path):
    layout = WorkLayout(tmp_path / "WORK")
    assert training_status(layout)["learned"] is None
    layout.work.mkdir(parents=True)
    settings = {"folds": [0, 1], "schedule": {"num_epochs": 1, "num_iterations_per_epoch": 6}}
    layout.train_settings_json.write_text(json.dumps(settings), encoding="utf-8")
    for fold in (0, 1):
        layout.fold_folder(fold).mkdir(parents=True)
    (layout.fold_folder(0) / CHECKPOINT).write_bytes(b"")
    # fold 1 is still training: its log reports two finished epochs
    (layout.fold_folder(1) / "training_log_2026_1_1.txt").write_text(
        "Epoch 0\nEpoch time: 1.0 s\nEpoch 1\nEpoch time: 1.1 s\nEpoch 2\n", encoding="utf-8")
    status = training_status(layout)
    assert (status["learned"], status["iterations"], status["validation_dice"]) == (False, 6, None)
    assert status["reason"] == "not trained (fold 1 unfinished: 6 iterations)"
    (layout.fold_folder(1) / CHECKPOINT).write_bytes(b"")
    # both final, no validation result: unknown
    assert training_status(layout)["learned"] is None and training_status(layout)["iterations"] == 6
    # nnU-Net's validation (summary.json): Dice pooled over the slices; the least good fold counts
    _summary(layout.fold_folder(0), [(9, 1, 2), (0, 0, 0)])  # 18 / 21
    _summary(layout.fold_folder(1), [(1, 30, 9), (0, 0, 0)])  # 2 / 41 = 0.049: at the empty level
    status = training_status(layout)
    assert status["learned"] is False and status["validation_dice"] == pytest.approx(2 / 41, abs=1e-4)
    assert status["reason"].startswith("not trained: validation Dice 0.049 after 6 iterations")
    _summary(layout.fold_folder(1), [(0, 3, 0), (0, 0, 0)])  # no lesion in its validation: unknown
    status = training_status(layout)
    assert status["learned"] is None and status["reason"].startswith("unknown: fold 1's validation slices hold no")
    _summary(layout.fold_folder(1), [(3, 1, 2), (0, 2, 0)])  # 6 / 11
    settings["schedule"] = {}  # nnU-Net's defaults: 1000 epochs of 250 iterations
    layout.train_settings_json.write_text(json.dumps(settings), encoding="utf-8")
    status = training_status(layout)
    assert status["learned"] is True and status["iterations"] == 250_000
    assert status["validation_dice"] == pytest.approx(6 / 11, abs=1e-4) and status["plans"] == "nnUNetPlans"


def _summary(fold: Path, cases: list[tuple[int, int, int]]) -> None:
    """nnU-Net's ``validation/summary.json`` with per-case (TP, FP, FN) of label 1 (the fields read)."""
    (fold / "validation").mkdir(exist_ok=True)
    per_case = [{"metrics": {"1": {"TP": tp, "FP": fp, "FN": fn, "Dice": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn
                                   else float("nan")}}} for tp, fp, fn in cases]
    (fold / "validation" / "summary.json").write_text(json.dumps({"metric_per_case": per_case}), encoding="utf-8")


def test_study_report_training_section(tmp_path):
    from analysis.imaging.orientation import CANONICAL
    from study.report import training_section

    def run(name: str, arch: str, history: str, guard: dict | None = None, model: bool = True) -> None:
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        config = {"settings": {"arch": arch, "task": "segment" if arch.endswith("unet") else "detect",
                               "context": 1, "image_size": 64}, "orientation": CANONICAL}
        if guard is not None:
            config["guard"] = guard
        (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
        (folder / "history.csv").write_text(history, encoding="utf-8")
        if model:
            (folder / "model.keras").write_bytes(b"")

    run("unet", "unet", "epoch,val_dice\n1,0.2\n2,0.7\n")
    run("resunet", "resunet", "epoch,val_dice\n1,0.0\n2,0.0\n",
        guard={"events": [{"epoch": 2}] * 4, "outcome": "failed"}, model=False)
    run("densenet", "densenet", "epoch,val_auc\n1,0.5\n")
    lines = "\n".join(training_section(tmp_path, ["unet", "resunet", "densenet"]))
    assert "| unet | 0.700 | 0 | learned |" in lines
    assert "| resunet | – | 4 | **did not learn** | training failed (guard outcome failed) |" in lines
    assert "| densenet | 0.500 | 0 | **did not learn** |" in lines


def test_study_report_model_table_names_width_samples_and_plan(tmp_path):
    from study.report import model_sizes

    run = tmp_path / "runs" / "unet"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {"params": 435_025}, "settings": {
        "task": "segment", "width": 0.25, "epochs": 6, "steps_per_epoch": 40, "batch_size": 16, "image_size": 64}}),
        encoding="utf-8")
    plan = "nnUNetPlans_w0.25_b16_p64x64"
    layout = WorkLayout(tmp_path / "nnunet_work", plan)
    layout.fold_folder(0).mkdir(parents=True)
    (layout.fold_folder(0) / CHECKPOINT).write_bytes(b"")
    layout.train_settings_json.write_text(json.dumps({"plans": plan, "folds": [0], "scale": {"width": 0.25},
                                                      "schedule": {"num_epochs": 24, "num_iterations_per_epoch": 40}}),
                                          encoding="utf-8")
    (layout.model_folder / "plans.json").write_text(json.dumps({"plans_name": plan, "configurations": {"2d": {
        "batch_size": 16, "patch_size": [64, 64],
        "architecture": {"arch_kwargs": {"features_per_stage": [8, 16, 32, 64, 128]}}}}}), encoding="utf-8")
    layout.params_json.write_text(json.dumps({"parameters": 487_384, "width": 0.25, "plans": plan,
                                              "features_per_stage": [8, 16, 32, 64, 128], "patch_size": [64, 64]}),
                                  encoding="utf-8")
    rows = model_sizes(tmp_path, ["unet", "nnunet"])
    assert rows[0] == ["unet", "0.44M", "0.25", "3,840 (240 × 16 crops of 64×64)", "–", "6.7M"]
    assert rows[1] == ["nnunet", "0.49M", "0.25", "15,360 (960 × 16 patches of 64×64)",
                       f"`{plan}` (features 8-16-32-64-128)", "30.6M"]
