"""Training robustness of the six Keras models at the demo's default budget (issue #16).

Each run trains one model (:data:`study.demo.DEFAULT` budget, fold 0) on the default demo
phantom (20 patients, seed 0, split seed 0) with one training seed, then scores the best
model on the TEST patients: per-slice Dice at 0.5 and at the run's calibrated threshold for
segmenters (mean over test slices with lesion, as ``analyze`` reports it), slice ROC AUC and
F1 at 0.5 and at the calibrated threshold for detectors. One JSON per run lands in
``--out/<variant>/<arch>-seed<k>.json``; finished runs are skipped, so the grid runs in
parts and resumes. Each run trains in a process of its own (TensorFlow state never leaks
between runs; a run that ends with the collapse guard's failure is recorded, not fatal).

Variants: ``new`` = the current defaults of :class:`bonemets_tf.train.TrainConfig`;
``old`` = the defaults before issue #16 (no warm-up, no clipping, zero logit bias, no
guard), for the before/after comparison.

Usage::

    python -m benchmarks.robustness --seeds 0,1,2,3,4 --models all            # the whole grid
    python -m benchmarks.robustness --seeds 0 --models resunet --variant old  # one part
    python -m benchmarks.robustness --table                                   # Markdown table

This is a benchmark, not a test: it takes minutes per run (see BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bonemets_tf.models.catalog import DETECT, SEGMENT  # noqa: E402  (no TensorFlow)
from bonemets_tf.run import learned  # noqa: E402  (no TensorFlow)
from study.demo import DEFAULT, DETECTORS, SEGMENTERS  # noqa: E402  (no TensorFlow)

log = logging.getLogger("bonemets.robustness")

OUT = ROOT / "benchmarks" / ".cache" / "robustness"
MODELS = DETECTORS + SEGMENTERS
#: Settings that restore the training defaults before issue #16 (fields that the running
#: TrainConfig lacks are dropped, so this works on either side of the change).
OLD = {"warmup_steps": 0, "clip_norm": None, "prior_bias": False, "logit_loss": False, "batch_dice": False,
       "guard": False, "rank_auc": False}
#: Issue #16's targets on this phantom and budget.
TARGET_SEG_DICE, TARGET_DET_AUC, TARGET_BEST_SEG = 0.5, 0.75, 0.6


def cpu_info() -> dict[str, Any]:
    """CPU model name, core count and the SIMD flags that change Keras's numerics/speed."""
    name, flags = platform.processor() or "unknown", set()
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, encoding="utf-8", errors="replace",
                              check=True).stdout
        m = re.search(r"Model name:\s*(.+)", text)
        name = m.group(1).strip() if m else name
        m = re.search(r"Flags:\s*(.+)", text)
        flags = set(m.group(1).split()) if m else set()
    except (OSError, subprocess.CalledProcessError):
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
    return {"model_name": name, "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags]}


def ensure_phantom(out: Path) -> Path:
    """The demo's default phantom and split under ``out/dataset`` (made once)."""
    dataset = out / "dataset"
    if not (dataset / "splits.json").is_file():
        from analysis.cohort.phantom import generate_cohort
        from analysis.cohort.splits import write_splits

        if not (dataset / "dataset.json").is_file():
            generate_cohort(dataset, cases=DEFAULT.cases, seed=0, shape=DEFAULT.shape, spacing=DEFAULT.spacing)
        write_splits(dataset, test_fraction=DEFAULT.test_fraction, folds=5, seed=0)
    return dataset


def settings(arch: str, seed: int, variant: str, dataset: Path, overrides: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """TrainConfig keyword arguments of one run (the demo's train stage, the variant, then ``overrides``)."""
    from bonemets_tf.train import TrainConfig

    t = DEFAULT.train_budget(arch)
    config = {"dataset": str(dataset), "task": DETECT if arch in DETECTORS else SEGMENT, "arch": arch,
              "fold": 0, "epochs": t.epochs, "steps_per_epoch": t.steps_per_epoch, "batch_size": t.batch_size,
              "image_size": t.image_size, "width": t.width, "lr": t.lr, "lr_schedule": t.lr_schedule,
              "positive_fraction": t.positive_fraction, "seed": seed, "run_eagerly": t.run_eagerly}
    if variant == "old":
        known = {f.name for f in TrainConfig.__dataclass_fields__.values()}
        config.update({k: v for k, v in OLD.items() if k in known})
    return {**config, **(overrides or {})}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (values read as JSON when they parse, else as strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run_one(arch: str, seed: int, variant: str, out: Path, tag: str = "", overrides: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    """Train and score one run (in this process); returns the JSON record."""
    from bonemets_tf.train import TrainConfig, train

    dataset = ensure_phantom(out)
    run = out / (variant + tag) / "runs" / f"{arch}-seed{seed}"
    kwargs = settings(arch, seed, variant, dataset, overrides)
    start = time.perf_counter()
    failure = None
    try:
        train(TrainConfig(**kwargs), run, overwrite=True, cache_dir=out / "slices")
    except Exception as exc:  # noqa: BLE001  the guard's clean failure is a result here
        failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    seconds = time.perf_counter() - start
    record: dict[str, Any] = {"arch": arch, "seed": seed, "variant": variant + tag, "settings": kwargs,
                              "train_seconds": round(seconds, 1), "failure": failure, "cpu": cpu_info()}
    record.update(_history_summary(run, arch))
    if failure is None:
        record.update(score_test(run, dataset, out / "slices"))
    return record


def _history_summary(run: Path, arch: str) -> dict[str, Any]:
    import csv

    monitor = "val_auc" if arch in DETECTORS else "val_dice"
    rows = []
    if (run / "history.csv").is_file():
        with open(run / "history.csv", newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    vals = [float(r[monitor]) for r in rows if r.get(monitor) not in (None, "")]
    train_key = "auc" if arch in DETECTORS else "dice"
    config = json.loads((run / "config.json").read_text(encoding="utf-8")) if (run / "config.json").is_file() else {}
    events = config.get("guard", {}).get("events", [])
    status = None
    try:
        from bonemets_tf.run import read_run, training_status

        status = training_status(read_run(run))
    except Exception:  # noqa: BLE001  code before the change, or a failed run without model.keras
        status = None
    return {"val": vals, "best_val": max(vals) if vals else None,
            "train_metric": [float(r[train_key]) for r in rows if r.get(train_key) not in (None, "")],
            "guard_events": len(events), "status": status}


def score_test(run: Path, dataset: Path, cache_dir: Path) -> dict[str, Any]:
    """Test-patient scores of a RUN's best model (see the module docstring)."""
    import numpy as np

    from analysis.cohort.layout import Cohort
    from analysis.evaluation.metrics.detection import roc_auc, slice_detection
    from analysis.evaluation.metrics.overlap import slice_overlap
    from bonemets_tf import cache
    from bonemets_tf.inference import Predictor, detect_volume, slice_probabilities
    from bonemets_tf.run import calibrated_threshold, read_run

    info = read_run(run)
    cohort = Cohort(dataset)
    cases = cache.ensure_cached(cohort, sorted(cohort.splits()["test"]), cache_dir)
    predictor = Predictor(info)
    try:
        auto = calibrated_threshold(run)
    except Exception:  # noqa: BLE001  a detector RUN from before the change has no calibration
        auto = None
    if info.task == "detect":
        labels, probs = [], []
        for c in cases:
            probs.append(detect_volume(predictor, c.ct(), 16))
            labels.append(c.mask().any(axis=(1, 2)))
        y, p = np.concatenate(labels), np.concatenate(probs)
        at = {"0.5": slice_detection(y, p, 0.5)}
        if auto is not None:
            at["auto"] = slice_detection(y, p, auto)
        return {"test_auc": float(roc_auc(y, p)), "threshold_auto": auto,
                "test_at": {k: {m: float(v) for m, v in d.items()} for k, d in at.items()},
                "positive_calls_at_0.5": int((p >= 0.5).sum()), "n_slices": int(y.size)}
    dice = {"0.5": [], "auto": []}
    for c in cases:
        mask = c.mask()
        z = np.flatnonzero(mask.any(axis=(1, 2)))
        if z.size == 0:
            continue
        prob = slice_probabilities(predictor, c.ct(), z, 16)
        for key, t in (("0.5", 0.5), ("auto", auto)):
            if t is not None:
                dice[key].extend(slice_overlap((prob >= t).astype(np.uint8), mask[z])[1].tolist())
    return {"test_dice": float(np.mean(dice["0.5"])) if dice["0.5"] else None,
            "test_dice_auto": float(np.mean(dice["auto"])) if dice["auto"] else None,
            "threshold_auto": auto, "n_slices": len(dice["0.5"])}


def result_path(out: Path, variant: str, arch: str, seed: int) -> Path:
    """Where one run's record goes (``variant`` includes any ``--tag``)."""
    return out / variant / f"{arch}-seed{seed}.json"


def collapsed(record: dict[str, Any]) -> bool:
    """A run that ended without a usable model: the guard's failure, or a model that did not
    learn by :func:`bonemets_tf.run.learned` (best validation Dice <= 0.05, AUC <= 0.55)."""
    if record.get("failure"):
        return True
    return not learned(DETECT if record["arch"] in DETECTORS else SEGMENT, record.get("best_val"))


def table(out: Path) -> str:
    """Markdown table of every finished run under ``out`` (variant, model, seed)."""
    rows = []
    for path in sorted(out.glob("*/*-seed*.json")):
        r = json.loads(path.read_text(encoding="utf-8"))
        test = r.get("test_auc") if r["arch"] in DETECTORS else r.get("test_dice")
        auto = r.get("test_dice_auto") if r["arch"] in SEGMENTERS else \
            r.get("test_at", {}).get("auto", {}).get("f1")
        rows.append((r["variant"], MODELS.index(r["arch"]), r["seed"], r["arch"], r.get("best_val"), test, auto,
                     r.get("threshold_auto"), r.get("guard_events", 0), collapsed(r), r.get("train_seconds"),
                     r.get("failure")))
    rows.sort()
    lines = ["| variant | model | seed | best val (Dice/AUC) | test Dice@0.5 / AUC | test Dice@auto / F1@auto "
             "| auto thr | guard events | collapsed | train s |", "|" + "---|" * 10]
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    for v, _, seed, arch, best, test, auto, thr, ev, col, sec, fail in rows:
        lines.append(f"| {v} | {arch} | {seed} | {fmt(best)} | {fmt(test)} | {fmt(auto)} | {fmt(thr)} | {ev} | "
                     f"{'yes' if col else 'no'}{' (' + fail + ')' if fail else ''} | {fmt(sec)} |")
    return "\n".join(lines)


def summary(out: Path) -> str:
    """Per variant and model: seeds run, collapsed runs, runs the guard acted in, and the test
    score (Dice at 0.5 for segmenters, AUC for detectors) min / mean against issue #16's targets."""
    import statistics

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for path in sorted(out.glob("*/*-seed*.json")):
        r = json.loads(path.read_text(encoding="utf-8"))
        groups.setdefault((r["variant"], r["arch"]), []).append(r)
    lines = ["| variant | model | seeds | collapsed | guard acted | test min | test mean | target |",
             "|" + "---|" * 8]
    for (variant, arch), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], MODELS.index(kv[0][1]))):
        key = "test_auc" if arch in DETECTORS else "test_dice"
        scores = [r.get(key) if r.get(key) is not None else 0.0 for r in runs]
        target = TARGET_DET_AUC if arch in DETECTORS else TARGET_SEG_DICE
        ok = "met" if min(scores) >= target else "missed"
        lines.append(f"| {variant} | {arch} | {','.join(str(r['seed']) for r in sorted(runs, key=lambda r: r['seed']))} "
                     f"| {sum(collapsed(r) for r in runs)} | {sum(1 for r in runs if r.get('guard_events'))} "
                     f"| {min(scores):.3f} | {statistics.fmean(scores):.3f} | >= {target} {ok} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    parser.add_argument("--models", default="all", help=f"comma-separated models or 'all' ({', '.join(MODELS)})")
    parser.add_argument("--variant", default="new", choices=("new", "old"))
    parser.add_argument("--out", type=Path, default=OUT, help=f"results folder (default {OUT})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TrainConfig setting (e.g. epochs=8); use with --tag")
    parser.add_argument("--tag", default="", help="suffix of the results folder for --set runs (--tag=-e8)")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of finished runs and exit")
    parser.add_argument("--one", nargs=3, metavar=("ARCH", "SEED", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--overrides-json", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.table:
        cpu = cpu_info()
        sys.stdout.write(f"CPU: {cpu['model_name']}, {cpu['cores']} cores, flags {' '.join(cpu['flags'])}\n\n"
                         + summary(args.out) + "\n\n" + table(args.out) + "\n")
        return 0
    if args.one:
        arch, seed, variant = args.one[0], int(args.one[1]), args.one[2]
        record = run_one(arch, seed, variant, args.out, args.tag, json.loads(args.overrides_json))
        path = result_path(args.out, variant + args.tag, arch, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1), encoding="utf-8")
        return 0
    models = MODELS if args.models == "all" else tuple(args.models.split(","))
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; expected {', '.join(MODELS)} or all")
    seeds = [int(s) for s in args.seeds.split(",")]
    ensure_phantom(args.out)
    for seed in seeds:
        for arch in models:
            path = result_path(args.out, args.variant + args.tag, arch, seed)
            if path.is_file():
                log.info("%s seed %d (%s): done, skipped", arch, seed, args.variant)
                continue
            log.info("%s seed %d (%s): training", arch, seed, args.variant)
            proc = subprocess.run([sys.executable, "-m", "benchmarks.robustness", "--one", arch, str(seed),
                                   args.variant, "--out", str(args.out), f"--tag={args.tag}",
                                   "--overrides-json", json.dumps(parse_overrides(args.set))], cwd=ROOT)
            if proc.returncode != 0 or not path.is_file():
                log.error("%s seed %d (%s): the run's process failed (exit %d)", arch, seed, args.variant,
                          proc.returncode)
                continue
            r = json.loads(path.read_text(encoding="utf-8"))
            log.info("%s seed %d (%s): best val %s, test %s, %.0f s", arch, seed, args.variant, r.get("best_val"),
                     r.get("test_auc", r.get("test_dice")), r["train_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
