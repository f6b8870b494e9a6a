"""The whole study end to end: `demo --quick` on a small phantom (every stage runs: phantom,
split, six Keras trainings, nnU-Net training, every prediction, the cascade, Grad-CAM,
SavedModel export, analyze, report). Slow (minutes): it is the project's smoke test."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from study.demo import DETECTORS, SEGMENTERS, best_run

ROOT = Path(__file__).resolve().parents[1]

TABLE_HEADINGS = ("## Model sizes", "## Slice detection", "## Segmentation", "### Paired t-tests",
                  "## Radiomics agreement", "## Clinical lesion tasks", "## Grad-CAM")


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_reports_every_model(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "demo", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "report" / "report.md").read_text(encoding="utf-8")
    for heading in TABLE_HEADINGS:
        assert heading in report, heading
    cascade = next(p.name for p in (out / "predictions").iterdir() if p.name.startswith("cascade-"))
    for model in (*DETECTORS, *SEGMENTERS, "nnunet", cascade):
        assert re.search(rf"\|\s*{re.escape(model)}\s*\|", report), f"{model} missing from the report tables"
    assert "synthetic" in report.lower()
    html = (out / "report" / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") >= 3 and "<table>" in html
    for det in DETECTORS:
        assert (out / "savedmodels" / det / "saved_model.pb").is_file()
    assert list((out / "gradcam").glob("*.png"))
    for seg in SEGMENTERS:  # train calibrated a threshold on the validation patients; the report shows it
        t = json.loads((out / "runs" / seg / "calibration.json").read_text(encoding="utf-8"))["threshold"]
        assert re.search(rf"\|\s*{seg}\s*\|\s*0\.5\s*\|\s*{t:.2f}\s*\|", report), seg
    assert "## Segmentation thresholds" in report
    # like for like by construction (issue #23): every compared segmenter on whole slices with nnU-Net's mirroring
    assert "## How each model was run" in report and "were run alike in every setting" in report
    with open(out / "analysis" / "models.csv", encoding="utf-8", newline="") as fh:
        models = {r["model"]: r for r in csv.DictReader(fh)}
    for seg in (*SEGMENTERS, "nnunet", cascade):
        assert models[seg]["crop"] == "false" and models[seg]["mirroring"] == models["nnunet"]["mirroring"], seg
    # the Keras predictions shared one TensorFlow process; nnU-Net's shared one with its training
    shared = [json.loads(m.read_text(encoding="utf-8")).get("shared_process") for m in (out / ".stages").glob("predict-*.json")]
    assert len(shared) == 8 and all(shared)
    # rerunning skips every finished stage and leaves the results as they were
    before = (out / "analysis" / "segmentation_summary.csv").read_bytes()
    again = subprocess.run([sys.executable, str(ROOT / "cli.py"), "demo", "--quick", "--out", str(out)],
                           cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("skipped") >= 20
    assert (out / "analysis" / "segmentation_summary.csv").read_bytes() == before


def test_best_run_reads_the_monitor_from_history(tmp_path):
    for arch, values in {"unet": [0.1, 0.5], "resunet": [0.6, 0.2], "resattunet": []}.items():
        (tmp_path / arch).mkdir()
        rows = "".join(f"{i + 1},{v}\n" for i, v in enumerate(values))
        (tmp_path / arch / "history.csv").write_text("epoch,val_dice\n" + rows, encoding="utf-8")
    assert best_run(tmp_path, SEGMENTERS, "val_dice") == "resunet"
    # a RUN that validated on lesion-free cases (Dice 1.0 for an empty mask) cannot win
    (tmp_path / "resunet" / "config.json").write_text(json.dumps({"checkpoint": {"monitor": None, "epoch": 2}}),
                                                      encoding="utf-8")
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"checkpoint": {"monitor": "val_dice", "epoch": 2}}),
                                                   encoding="utf-8")
    assert best_run(tmp_path, SEGMENTERS, "val_dice") == "unet"


def test_demo_refuses_a_folder_made_with_other_settings(tmp_path):
    (tmp_path / "demo.json").write_text(json.dumps({"budget": {"name": "default"}, "seed": 3}), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "demo", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=120)
    assert proc.returncode == 2 and "other settings" in proc.stderr


def test_a_group_of_stages_shares_one_process_stops_at_a_failure_and_resumes(tmp_path):
    from study.demo import QUICK, Demo, Stage, StageFailed

    demo = Demo(tmp_path / "demo", QUICK)
    demo.stages_dir.mkdir(parents=True)
    good = demo.data_stages()  # phantom, split: no framework, seconds
    bad = Stage("split-again", "split", {"dataset": str(tmp_path / "missing"), "test_fraction": 0.2, "folds": 5,
                                         "seed": 0}, tmp_path / "nothing")
    with pytest.raises(StageFailed) as failure:
        demo.run_group([good[0], bad, good[1]], 1, 3)
    assert failure.value.stage == "split-again"
    assert demo.done("phantom") and not demo.done("split-again") and not demo.done("split")
    assert json.loads(demo._marker("phantom").read_text(encoding="utf-8"))["shared_process"] is True
    phantom_bytes = sorted(p.read_bytes() for p in (demo.dataset / "imagesTr").iterdir())
    demo.run_group(good, 1, 2)  # the phantom is skipped, the split runs
    assert demo.done("split") and (demo.dataset / "splits.json").is_file()
    assert sorted(p.read_bytes() for p in (demo.dataset / "imagesTr").iterdir()) == phantom_bytes
    assert not list(demo.stages_dir.glob("*.plan.json"))
