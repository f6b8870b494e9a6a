"""The learning loop, measured (issue #35): does a model fine-tuned on its readers' reviews,
with their rejections as hard negatives, make fewer false positives?

On the phantom (:mod:`analysis.cohort.phantom`, default shape, seed 0) of :data:`PATIENTS`
patients, three disjoint groups:

* development (``DEV``): a UNet trains on them at the demo's budget
  (:data:`study.demo.DEFAULT`'s segmenter budget, fold 0 of a fixed split): model **A**;
* clinical (``CLINICAL``): written as DICOM series, predicted by A (``predict --images
  --dicom-seg --sr``), then reviewed by a simulated reader through the review application's
  JSON API (:mod:`analysis.review.app`, Flask's test client, signed in, with the CSRF token):
  a predicted lesion that shares a voxel with a true lesion is accepted, every other one is
  rejected with reason "other", each true lesion no prediction touches is added by a click
  (``point_mm``) at its centre voxel, and the study is signed; ``import-reviews`` makes each
  signed study a case (label = accepted + added lesions; ``negativesTr`` = rejected ones) in a
  copy of the development cohort, on the training side of its folds;
* test (``TEST``): held out; every model predicts them with probability maps.

A is fine-tuned from its own weights (``train --init-from A``) on the development cohort plus
the reviewed cases, once with hard negatives (**B+hn**, ``--hard-negative-fraction``
:data:`HARD_FRACTION`) and once without (**B**), same budget and seed (and again with the other
seeds of :data:`FINE_TUNE_SEEDS`). An ablation separates the reader's labels from the hard
negatives: the same two fine-tunes (**T**, **T+hn**, seed 0) on a copy of that cohort whose reviewed
cases carry their true lesion masks (a perfect reader; the hard negatives are kept where they miss
the truth, which on this phantom is everywhere). Each model is scored on
the test patients: lesion sensitivity and false positives per case at the masks' threshold
0.5 (a predicted lesion is a false positive when it shares no voxel with a true lesion), the
FROC (:mod:`analysis.evaluation.metrics.froc`) and its CPM, per-slice Dice (mean over the test
slices with lesion), each with a patient-level bootstrap 95 % interval
(:mod:`analysis.evaluation.bootstrap`, the same draws for every model: paired).

**The target** (issue #35): fewer false positives per case at the same lesion sensitivity. It
is read off the FROC curves: each fine-tune's FP per case at the sensitivity A reaches at 0.5
(the lowest FP per case of its operating points with at least that sensitivity), minus A's;
met when the difference's paired bootstrap interval lies below zero.

Usage::

    python -m benchmarks.review_loop                 # every stage (resumes: finished stages are kept)
    python -m benchmarks.review_loop --table         # the Markdown table of the last run

Stages keep their outputs under ``--out`` (default ``benchmarks/.cache/review_loop``); each
TensorFlow stage runs as a ``cli.py`` subprocess, the review and the scores in this process
(no TensorFlow). This is a benchmark, not a test: about 10-30 minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.robustness import cpu_info  # noqa: E402  (no TensorFlow)
from study.demo import DEFAULT  # noqa: E402  (no TensorFlow)

log = logging.getLogger("bonemets.review_loop")

OUT = ROOT / "benchmarks" / ".cache" / "review_loop"
PATIENTS = 30
DEV = tuple(f"case_{i:03d}" for i in range(0, 10))
CLINICAL = tuple(f"case_{i:03d}" for i in range(10, 20))
TEST = tuple(f"case_{i:03d}" for i in range(20, 30))
#: Validation patients of the development group (fold 0); the rest of DEV trains.
VAL = DEV[:2]
#: Share of fine-tuning crops centred on a rejected lesion.
HARD_FRACTION = 0.3
#: The fine-tune's budget: a third of the demo's steps at a quarter of its peak rate.
FINE_TUNE = {"epochs": 2, "steps_per_epoch": 40, "lr": 5e-4}
SEED = 0
#: Training seeds of the fine-tunes: seed 0 is the main comparison, the others show how much of
#: it is the seed's (the patients' bootstrap intervals do not include training variation).
FINE_TUNE_SEEDS = (0, 1, 2)
BOOT = 1000
READER = "simulated"


def _cli(*args: Any, log_to: Path) -> None:
    """``python cli.py ARGS`` in a subprocess (TensorFlow stays out of this process); its output
    goes to ``log_to``."""
    cmd = [sys.executable, str(ROOT / "cli.py"), *[str(a) for a in args]]
    log.info("running %s", " ".join(cmd[1:]))
    with open(log_to, "w", encoding="utf-8") as fh:
        done = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:4])} failed ({done.returncode}); see {log_to}")


def _timed(record: dict[str, Any], name: str, out: Path):
    """A stage runner: skip when ``out`` exists, else run and time ``fn`` (the seconds of every
    stage run so far are kept in ``record["seconds"]``, saved as ``timings.json`` beside the stages)."""

    def run(fn, work: Path, *args, **kwargs):
        if out.exists():
            log.info("stage %s: kept (%s exists)", name, out)
            return
        t0 = time.perf_counter()
        fn(work, *args, **kwargs)
        record.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
        (work / "timings.json").write_text(json.dumps(record["seconds"], indent=1), encoding="utf-8")
        log.info("stage %s: %.0f s", name, record["seconds"][name])

    return run


def _name(hard: bool, seed: int, truth: bool = False) -> str:
    """A fine-tune's name: ``B`` (no hard negatives) or ``B+hn`` (``T``, ``T+hn`` on the true labels),
    with ``-seedK`` after seed 0."""
    return ("T" if truth else "B") + ("+hn" if hard else "") + (f"-seed{seed}" if seed else "")


# --- stages ---------------------------------------------------------------------------------


def make_data(work: Path) -> None:
    """The phantom, the development+test cohort ``base/`` with its split, and the clinical
    patients as DICOM series under ``clinical/<case>/``."""
    from analysis.cohort.examples import write_dicom_series
    from analysis.cohort.layout import Cohort, write_dataset_json
    from analysis.cohort.phantom import generate_cohort
    from analysis.imaging.io import read_array

    phantom = work / "phantom"
    if not (phantom / "dataset.json").is_file():
        generate_cohort(phantom, cases=PATIENTS, seed=SEED, shape=DEFAULT.shape, spacing=DEFAULT.spacing,
                        overwrite=True)
    source, base = Cohort(phantom), Cohort(work / "base.tmp")
    shutil.rmtree(base.root, ignore_errors=True)
    for folder in (base.images_dir, base.labels_dir, base.bones_dir):
        folder.mkdir(parents=True)
    for case in DEV + TEST:
        for src, dst in ((source.image_path, base.image_path), (source.label_path, base.label_path),
                         (source.bones_path, base.bones_path)):
            shutil.copy2(src(case), dst(case))
    write_dataset_json(base.root, len(DEV + TEST), description="synthetic CT phantom generated by bonemets "
                                                               "(not patient data): development and test patients")
    splits = {"seed": SEED, "test": list(TEST), "folds": [{"train": sorted(set(DEV) - set(VAL)), "val": list(VAL)}]}
    (base.root / "splits.json").write_text(json.dumps(splits, indent=1), encoding="utf-8")
    clinical = work / "clinical.tmp"
    shutil.rmtree(clinical, ignore_errors=True)
    for i, case in enumerate(CLINICAL):
        ct, geometry = read_array(source.image_path(case))
        write_dicom_series(ct, geometry, clinical / case, patient_id=case.upper().replace("_", ""),
                           localizer=False, seed=i)
    base.root.rename(work / "base")
    clinical.rename(work / "clinical")


def train_parent(work: Path) -> None:
    """Model A: UNet at the demo's segmenter budget on the development patients (fold 0)."""
    t = DEFAULT.segmenter
    _cli("train", "--dataset", work / "base", "--task", "segment", "--arch", "unet", "--out", work / "runs" / "A",
         "--epochs", t.epochs, "--steps-per-epoch", t.steps_per_epoch, "--batch-size", t.batch_size,
         "--image-size", t.image_size, "--width", t.width, "--lr", t.lr, "--lr-schedule", t.lr_schedule,
         "--seed", SEED, "--cache", work / "slices", log_to=work / "logs" / "train_A.log")


def predict_clinical(work: Path) -> None:
    """A on the clinical patients' DICOM series: masks, lesion tables, SEG and report."""
    _cli("predict", "--model", work / "runs" / "A", "--images", work / "clinical", "--out", work / "reviewed" / "A",
         "--dicom-seg", "--sr", "--no-preview", "--cases", "all", log_to=work / "logs" / "predict_clinical.log")


def _index_to_mm(index_kji: np.ndarray, geometry) -> list[float]:
    """LPS mm of a ``(slices, rows, cols)`` voxel index (ITK: origin + direction @ (spacing * index))."""
    d = np.asarray(geometry.direction, np.float64).reshape(3, 3)
    xyz = np.asarray(index_kji, np.float64)[::-1] * np.asarray(geometry.spacing)
    return [float(v) for v in np.asarray(geometry.origin) + d @ xyz]


def _centre_voxel(mask: np.ndarray) -> np.ndarray:
    """The lesion voxel nearest the lesion's centroid (a click inside it, whatever its shape)."""
    voxels = np.argwhere(mask)
    return voxels[np.argmin(((voxels - voxels.mean(axis=0)) ** 2).sum(axis=1))]


def review_all(work: Path) -> None:
    """The simulated reader reviews every clinical study through the review application's JSON API
    (signed in, with the CSRF token): accept a predicted lesion that shares a voxel with a true
    one, reject the others (reason "other"), add each true lesion no prediction touches by a click
    at its centre voxel, sign."""
    from analysis.cohort.layout import Cohort
    from analysis.imaging.io import read_array
    from analysis.lesions import lesion_instances
    from analysis.prediction.folder import mask_path
    from analysis.review import auth
    from analysis.review.app import create_app
    from analysis.review.service import ReviewService
    from analysis.review.store import Source, StudyStore

    pred = work / "reviewed" / "A"
    users = work / "users.txt"
    password = "simulated-reader-password"
    if not users.is_file() or READER not in auth.read_users(users):
        auth.add_user(users, READER, password)
    service = ReviewService(StudyStore([Source.pred(pred)]))
    app = create_app(service, auth.UsersFile(users))
    client = app.test_client()
    assert client.post("/login", data={"user": READER, "password": password}).status_code == 302
    csrf = client.get("/").get_data(as_text=True).split('name="csrf-token" content="')[1].split('"')[0]
    headers = {"X-CSRF-Token": csrf}
    cases = _clinical_cases(pred)
    truth = Cohort(work / "phantom")
    counts = {"accept": 0, "reject": 0, "add": 0, "add_refused": 0, "studies": 0}
    for listed in client.get("/api/studies").get_json()["studies"]:
        uid = listed["uid"]
        case = cases[uid]
        gt, geometry = read_array(truth.label_path(case))
        predicted, predicted_geometry = read_array(mask_path(pred, case))
        assert not geometry.mismatch(predicted_geometry), case
        labels, _ = lesion_instances(predicted, 26)
        for lesion in client.get(f"/api/studies/{uid}").get_json()["lesions"]:
            hit = bool((gt[labels == lesion["id"]] > 0).any())
            body = {"decision": "accept"} if hit else {"decision": "reject", "reason": "other"}
            r = client.post(f"/api/studies/{uid}/lesions/{lesion['id']}", json=body, headers=headers)
            assert r.status_code == 200, r.get_json()
            counts[body["decision"]] += 1
        gt_ids, n_gt = lesion_instances(gt, 26)
        for g in range(1, n_gt + 1):
            lesion = gt_ids == g
            if (labels[lesion] > 0).any():
                continue
            point = _index_to_mm(_centre_voxel(lesion), geometry)
            r = client.post(f"/api/studies/{uid}/lesions", json={"point_mm": point}, headers=headers)
            if r.status_code == 201:
                counts["add"] += 1
            else:  # 409: an earlier addition grew into it; 422: nothing at 400 HU there to grow
                counts["add_refused"] += 1
                log.info("study %s: adding true lesion %d refused: %s", case, g, r.get_json()["error"])
        r = client.post(f"/api/studies/{uid}/sign", headers=headers)
        assert r.status_code == 200, r.get_json()
        counts["studies"] += 1
    (work / "reader.json").write_text(json.dumps(counts, indent=1), encoding="utf-8")


def import_reviews(work: Path) -> None:
    """``import-reviews`` of the reviewed PRED folder into a copy of the development cohort."""
    tuned = work / "tuned"
    shutil.rmtree(tuned, ignore_errors=True)
    shutil.copytree(work / "base", tuned)
    _cli("import-reviews", work / "reviewed" / "A", "--dataset", tuned, log_to=work / "logs" / "import_reviews.log")


def _clinical_cases(pred: Path) -> dict[str, str]:
    """StudyInstanceUID -> clinical case id (its DICOM folder's name), from ``predict.json``."""
    from analysis.prediction.folder import read_record

    return {str(part["input"]["dicom"]["study_uid"]): case for case, part in read_record(pred)["per_case"].items()}


def review_summary(work: Path) -> dict[str, Any]:
    """What the reviews gave: the reader's decisions, and the imported cases against the truth:
    each label's Dice, the pooled share of label voxels on a true lesion (precision) and of true
    lesion voxels in the label (recall), the share of the reader's added (grown) voxels on a true
    lesion, and the hard negatives (voxels; on a true lesion: 0 when no true lesion is rejected)."""
    from analysis.cohort.layout import Cohort
    from analysis.lesions.overlap import dice
    from analysis.imaging.io import read_array
    from analysis.review.growing import decode_voxels
    from analysis.review.journal import Journal

    journal = Journal(work / "reviewed" / "A")
    tuned, truth = Cohort(work / "tuned"), Cohort(work / "phantom")
    patients = _clinical_cases(work / "reviewed" / "A")
    out, pooled = {}, {"label": 0, "gt": 0, "both": 0, "added": 0, "added_on_truth": 0}
    for case, rec in json.loads(tuned.reviews_path.read_text(encoding="utf-8"))["cases"].items():
        label, _ = read_array(tuned.label_path(case))
        gt, _ = read_array(truth.label_path(patients[rec["study_uid"]]))
        negatives = read_array(tuned.negatives_path(case))[0] if tuned.has_negatives(case) else np.zeros_like(gt)
        for entry in journal.read(rec["study_uid"]):
            if entry.decision.decision == "add":
                voxels = decode_voxels(entry.detail["voxels"])
                pooled["added"] += int(voxels.size)
                pooled["added_on_truth"] += int((gt.flat[voxels] > 0).sum())
        pooled["label"] += int((label > 0).sum())
        pooled["gt"] += int((gt > 0).sum())
        pooled["both"] += int(((label > 0) & (gt > 0)).sum())
        out[case] = {"patient": patients[rec["study_uid"]], "label_dice_vs_truth": round(dice(label, gt), 4),
                     "hard_negative_voxels": int(negatives.sum()),
                     "hard_negatives_on_truth": int(((negatives > 0) & (gt > 0)).sum()), **rec["lesions"]}
    rows = journal.rows()
    return {"decisions": {d: sum(r["decision"] == d for r in rows) for d in ("accept", "reject", "add", "sign")},
            "reader": json.loads((work / "reader.json").read_text(encoding="utf-8")),
            "label_precision": round(pooled["both"] / max(pooled["label"], 1), 4),
            "label_recall": round(pooled["both"] / max(pooled["gt"], 1), 4),
            "added_voxels_on_truth": round(pooled["added_on_truth"] / max(pooled["added"], 1), 4),
            "cases": out}


def truth_cohort(work: Path) -> None:
    """The ablation's cohort ``tuned_truth/``: ``tuned/`` with each reviewed case's label replaced by
    the patient's true lesions (a perfect reader), its hard negatives kept where they miss them."""
    from analysis.cohort.layout import Cohort
    from analysis.imaging.io import read_array, write_mask

    tmp = work / "tuned_truth.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(work / "tuned", tmp)
    cohort, truth = Cohort(tmp), Cohort(work / "phantom")
    patients = _clinical_cases(work / "reviewed" / "A")
    for case, rec in json.loads(cohort.reviews_path.read_text(encoding="utf-8"))["cases"].items():
        gt, geometry = read_array(truth.label_path(patients[rec["study_uid"]]))
        write_mask((gt > 0).astype(np.uint8), geometry, cohort.label_path(case))
        if cohort.has_negatives(case):
            negatives, _ = read_array(cohort.negatives_path(case))
            write_mask(((negatives > 0) & (gt == 0)).astype(np.uint8), geometry, cohort.negatives_path(case))
    tmp.rename(work / "tuned_truth")


def fine_tune(work: Path, hard: bool, seed: int, truth: bool = False) -> None:
    """B / B+hn: ``train --init-from A`` on the development and reviewed patients (``truth``: the
    ablation's cohort with the true labels, models ``T`` / ``T+hn``)."""
    name = _name(hard, seed, truth)
    _cli("train", "--dataset", work / ("tuned_truth" if truth else "tuned"), "--init-from", work / "runs" / "A",
         "--out", work / "runs" / name,
         "--epochs", FINE_TUNE["epochs"], "--steps-per-epoch", FINE_TUNE["steps_per_epoch"],
         "--lr", FINE_TUNE["lr"], "--lr-schedule", "cosine", "--seed", seed,
         "--hard-negative-fraction", HARD_FRACTION if hard else 0.0, "--cache", work / "slices",
         log_to=work / "logs" / f"train_{name}.log")


def predict_test(work: Path, name: str) -> None:
    """A model on the test patients, with probability maps for the FROC."""
    _cli("predict", "--model", work / "runs" / name, "--dataset", work / "base", "--cases", "test", "--out",
         work / "test" / name, "--probabilities", "--no-preview", log_to=work / "logs" / f"predict_test_{name}.log")


# --- scores -----------------------------------------------------------------------------------


def _lesion_hits(gt_ids: np.ndarray, mask: np.ndarray) -> tuple[int, int, int]:
    """``(true lesions found, predicted lesions, false positives)`` of a mask (any shared voxel is a hit)."""
    from analysis.lesions.overlap import overlap_pairs
    from analysis.lesions import lesion_instances

    pred_ids, n_pred = lesion_instances(mask, 26)
    a, b, _ = overlap_pairs(gt_ids, pred_ids)
    return len(set(a.tolist())), n_pred, n_pred - len(set(b.tolist()))


def _case_stats(work: Path, name: str, case: str, calibrated: float) -> dict[str, Any]:
    """One test case's sufficient statistics for every score of one model."""
    from analysis.cohort.layout import Cohort
    from analysis.evaluation.metrics.froc import froc_case
    from analysis.evaluation.metrics.overlap import slice_overlap
    from analysis.imaging.io import read_array
    from analysis.lesions import lesion_instances
    from analysis.prediction.folder import mask_path
    from analysis.prediction.probabilities import read_probability

    cohort = Cohort(work / "base")
    gt, _ = read_array(cohort.label_path(case))
    pred, _ = read_array(mask_path(work / "test" / name, case))
    prob = read_probability(work / "test" / name / "probabilities" / f"{case}.nii.gz")
    gt_ids, n_gt = lesion_instances(gt, 26)
    found, n_pred, fp = _lesion_hits(gt_ids, pred > 0)
    found_t, _, fp_t = _lesion_hits(gt_ids, prob >= calibrated)
    _, dice, _, _ = slice_overlap(pred > 0, gt > 0)
    return {"n_gt": n_gt, "found": found, "n_pred": n_pred, "fp": fp, "found_calibrated": found_t,
            "fp_calibrated": fp_t, "slice_dice": dice, "froc": froc_case(prob, gt_ids, n_gt)}


def _fp_at(curve, sensitivity: float) -> float:
    """The lowest FP per case among the operating points reaching ``sensitivity`` (NaN: none does)."""
    ok = curve.sensitivity >= sensitivity - 1e-12
    return float(curve.fp_per_case[ok].min()) if ok.any() else float("nan")


def _threshold_at(curve, sensitivity: float) -> float:
    """The highest threshold whose operating point reaches ``sensitivity`` (NaN: none does)."""
    ok = np.flatnonzero(curve.sensitivity >= sensitivity - 1e-12)
    return float(curve.thresholds[ok[0]]) if ok.size else float("nan")


def score(work: Path, models: list[str]) -> dict[str, Any]:
    """Every score of every model on the test patients, with paired bootstrap intervals."""
    from analysis.evaluation.bootstrap import case_weights, percentile_interval, ratio_interval, resample_indices
    from analysis.evaluation.metrics.froc import froc_curve, froc_summary

    from bonemets_tf.run import calibrated_threshold  # no TensorFlow

    thresholds = {m: calibrated_threshold(work / "runs" / m) for m in models}
    stats = {m: [_case_stats(work, m, c, thresholds[m]) for c in TEST] for m in models}
    draws = resample_indices(len(TEST), BOOT, SEED)
    weights = case_weights(draws, len(TEST))
    out: dict[str, Any] = {}
    parent_sens = sum(s["found"] for s in stats[models[0]]) / sum(s["n_gt"] for s in stats[models[0]])

    def fp_at_parent(model: str, idx: np.ndarray) -> float:
        return _fp_at(froc_curve([stats[model][i]["froc"] for i in idx]), parent_sens)

    for m in models:
        s = stats[m]
        dices = [np.asarray(x["slice_dice"]) for x in s]

        def mean_dice(idx: np.ndarray, dices=dices) -> float:
            values = np.concatenate([dices[i] for i in idx])
            return float(values.mean()) if values.size else float("nan")

        def cpm(idx: np.ndarray, s=s) -> float:
            return froc_summary(froc_curve([s[i]["froc"] for i in idx]))[1]

        from analysis.evaluation.bootstrap import statistic_interval

        out[m] = {
            "sensitivity": ratio_interval([x["found"] for x in s], [x["n_gt"] for x in s], weights).__dict__,
            "fp_per_case": ratio_interval([x["fp"] for x in s], [1] * len(s), weights).__dict__,
            "calibrated_threshold": thresholds[m],
            "sensitivity_calibrated": ratio_interval([x["found_calibrated"] for x in s], [x["n_gt"] for x in s],
                                                     weights).__dict__,
            "fp_per_case_calibrated": ratio_interval([x["fp_calibrated"] for x in s], [1] * len(s), weights).__dict__,
            "slice_dice": statistic_interval(mean_dice, draws).__dict__,
            "cpm": statistic_interval(cpm, draws).__dict__,
            "fp_at_parent_sensitivity": statistic_interval(lambda idx, m=m: fp_at_parent(m, idx), draws).__dict__,
            "threshold_at_parent_sensitivity": _threshold_at(froc_curve([x["froc"] for x in s]), parent_sens),
            "lesions": {"gt": sum(x["n_gt"] for x in s), "found": sum(x["found"] for x in s),
                        "predicted": sum(x["n_pred"] for x in s), "false_positive": sum(x["fp"] for x in s)},
        }
    for m in models[1:]:
        diff = [fp_at_parent(m, row) - fp_at_parent(models[0], row) for row in draws]
        full = np.arange(len(TEST))
        est = fp_at_parent(m, full) - fp_at_parent(models[0], full)
        interval = percentile_interval(est, np.asarray(diff))
        out[m]["fp_difference_vs_parent"] = {**interval.__dict__,
                                             "target_met": bool(interval.high < 0)}
    out["parent_sensitivity"] = parent_sens
    return out


def _ci(x: dict[str, Any], fmt: str = "{:.2f}") -> str:
    """``estimate (low-high)``; ``(low to high)`` when the interval reaches below zero."""
    sep = " to " if x["low"] < 0 else "-"
    return f"{fmt.format(x['estimate'])} ({fmt.format(x['low'])}{sep}{fmt.format(x['high'])})"


def table(record: dict[str, Any]) -> str:
    """The Markdown table of a run's scores (BENCHMARKS.md)."""
    scores = record["scores"]
    lines = [f"Test patients: {len(record['patients']['test'])}; A's lesion sensitivity at 0.5: "
             f"{scores['parent_sensitivity']:.3f}. 95 % patient-level bootstrap intervals ({BOOT} draws, paired).", "",
             "| model | FP per case at A's sensitivity (FROC) | difference vs A | target met | FROC CPM "
             "| at 0.5: sensitivity | at 0.5: FP per case | at its calibrated threshold t: sensitivity, FP per case "
             "| per-slice Dice at 0.5 |", "|---|---|---|---|---|---|---|---|---|"]
    for m in ("A", "B", "B+hn", "T", "T+hn"):
        s = scores[m]
        diff = s.get("fp_difference_vs_parent")
        label = {"T": "T (true labels)", "T+hn": "T+hn (true labels)"}.get(m, m)
        lines.append(f"| {label} | {_ci(s['fp_at_parent_sensitivity'])}, p >= {s['threshold_at_parent_sensitivity']:.2f} | "
                     f"{_ci(diff) if diff else '-'} | "
                     f"{('yes' if diff['target_met'] else 'no') if diff else '-'} | {_ci(s['cpm'])} | "
                     f"{_ci(s['sensitivity'])} | {_ci(s['fp_per_case'])} | t = {s['calibrated_threshold']:.2f}: "
                     f"{_ci(s['sensitivity_calibrated'])}, {_ci(s['fp_per_case_calibrated'])} | "
                     f"{_ci(s['slice_dice'])} |")
    seeds = [k for k in record.get("seeds", [0]) if k]
    if seeds:
        lines += ["", "The same fine-tunes with other training seeds (FP per case at A's sensitivity, difference vs A):",
                  "", "| seed | B | B: difference vs A | B+hn | B+hn: difference vs A |", "|---|---|---|---|---|"]
        for k in [0, *seeds]:
            b, h = scores[_name(False, k)], scores[_name(True, k)]
            lines.append(f"| {k} | {_ci(b['fp_at_parent_sensitivity'])} | {_ci(b['fp_difference_vs_parent'])} | "
                         f"{_ci(h['fp_at_parent_sensitivity'])} | {_ci(h['fp_difference_vs_parent'])} |")
    return "\n".join(lines)


# --- the whole loop ----------------------------------------------------------------------------


def run(work: Path, seeds: tuple[int, ...] = FINE_TUNE_SEEDS) -> dict[str, Any]:
    """Every stage (finished ones kept) and the scores; writes ``work/result.json``."""
    (work / "logs").mkdir(parents=True, exist_ok=True)
    timings = work / "timings.json"
    record: dict[str, Any] = {"cpu": cpu_info(), "patients": {"dev": list(DEV), "clinical": list(CLINICAL),
                                                               "test": list(TEST)},
                              "hard_negative_fraction": HARD_FRACTION, "fine_tune": FINE_TUNE, "seeds": list(seeds),
                              "parent_budget": DEFAULT.segmenter.__dict__,
                              "seconds": json.loads(timings.read_text(encoding="utf-8")) if timings.is_file() else {}}
    _timed(record, "data", work / "base")(make_data, work)
    _timed(record, "train A", work / "runs" / "A" / "model.keras")(train_parent, work)
    _timed(record, "predict clinical", work / "reviewed" / "A" / "predict.json")(predict_clinical, work)
    _timed(record, "review", work / "reviewed" / "A" / "reviews.csv")(review_all, work)
    _timed(record, "import-reviews", work / "tuned" / "reviews.json")(import_reviews, work)
    models = ["A"]
    for seed in seeds:
        for hard in (False, True):
            name = _name(hard, seed)
            _timed(record, f"train {name}", work / "runs" / name / "model.keras")(fine_tune, work, hard, seed)
            models.append(name)
    _timed(record, "ablation cohort", work / "tuned_truth")(truth_cohort, work)
    for hard in (False, True):
        name = _name(hard, 0, truth=True)
        _timed(record, f"train {name}", work / "runs" / name / "model.keras")(fine_tune, work, hard, 0, True)
        models.append(name)
    for m in models:
        _timed(record, f"predict test {m}", work / "test" / m / "predict.json")(predict_test, work, m)
    record["review"] = review_summary(work)
    record["scores"] = score(work, models)
    (work / "result.json").write_text(json.dumps(record, indent=1, default=float), encoding="utf-8")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", action="store_true", help="Print the Markdown table of the last run.")
    parser.add_argument("--seeds", default=",".join(map(str, FINE_TUNE_SEEDS)),
                        help="Training seeds of the fine-tunes (0 is the main comparison).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    if not args.table:
        run(args.out, tuple(int(k) for k in args.seeds.split(",")))
    print(table(json.loads((args.out / "result.json").read_text(encoding="utf-8"))))


if __name__ == "__main__":
    main()
