"""Benchmark suite: speed and memory of bonemets measured against peers and limits.

Usage::

    python benchmarks/run.py [--quick] [--only NAME[,NAME]] [--json OUT] [--rounds N]

Prints a table whose rows name a comparison and its ratio, and writes every measurement
as JSON (``benchmarks/results/latest.json`` unless ``--json``; written atomically).

Method: every comparison runs both sides in this run, each side in its own process
(TensorFlow and torch never share a process: TF before triton segfaults), alternating
A, B, A, B, ... for ``--rounds`` rounds; every side also alternates its own variants in
rounds inside its process after a warm-up. Reported values are medians. This file imports
neither framework. Cases (``--only``):

* ``pipeline``  tf.data slices/s from the slice cache vs the UNet train step and vs raw reads
* ``train``     Keras UNet (f32, XLA, mixed) vs the same network in PyTorch (eager, compile), MFU
* ``infer``     each Keras segmenter and the cascade vs nnU-Net's predictor (mirroring on/off)
* ``analysis``  clinical metrics vs a scipy baseline; radiomics s/lesion with jobs 1 vs 2
* ``memory``    peak RSS of phantom, slice cache, predict and analyze at 1 vs more cases (not in --quick)

Inputs are generated once into ``benchmarks/.cache`` (git-ignored): a paper-sized phantom
(385 x 512 x 512), slabs of it, random-init RUN folders and a tiny nnU-Net (1 epoch of
1 iteration on two 8-slice 512 x 512 phantoms: plans decide the network, weights do not
matter for speed).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from study.wings import wing_python  # noqa: E402
from unet_flops import unet_forward_flops  # noqa: E402

CACHE = HERE / ".cache"
RESULTS = HERE / "results" / "latest.json"
PY = sys.executable
CASES = ("pipeline", "train", "infer", "newpatients", "analysis", "memory")
#: Slices of the paper volume in the new-patients case (full 512 x 512; s/volume = x385/slices).
NEW_PATIENT_SLAB = 32
#: Keras segmenters of the new-patients case (full width, random init).
NEW_PATIENT_MODELS = ("unet", "resunet", "resattunet")
log = logging.getLogger("bench")


@dataclass(frozen=True)
class Settings:
    """Sizes of one run mode."""

    name: str
    rounds: int            # process-level alternations A,B,A,B
    inner_rounds: int      # alternations inside each side's process
    size: int              # crop / training input side
    batch: int
    steps: int
    batches: int           # pipeline batches per timing
    slab: int              # slices of the paper volume through inference (0: all 385)
    infer_batch: int
    lesions: int
    radiomics_lesions: int
    infer_rounds: int = 1        # alternations Keras/nnU-Net (a 512^2 slice takes seconds on a CPU)
    analysis_slices: int = 385   # slices of the 512 x 512 analysis case pair
    analysis_rounds: int = 1     # alternations project/baseline (each is slow on a CPU)
    memory_cases: tuple[int, int] = (1, 2)
    phantom_cases: tuple[int, int] = (1, 2)
    torch_modes: str = "torch_eager,torch_compile"
    keras_modes: str = "keras_f32,keras_xla,keras_mixed"


QUICK = Settings("quick", rounds=2, inner_rounds=2, size=64, batch=2, steps=2, batches=8, slab=1, infer_batch=1,
                 torch_modes="torch_eager", keras_modes="keras_f32,keras_mixed",
                 lesions=20, radiomics_lesions=4, analysis_slices=96)
FULL = Settings("full", rounds=2, inner_rounds=2, size=128, batch=4, steps=2, batches=8, slab=1, infer_batch=1,
                lesions=30, radiomics_lesions=6, memory_cases=(1, 3), phantom_cases=(1, 3))
GPU = Settings("gpu", rounds=2, inner_rounds=3, size=256, batch=16, steps=10, batches=20, slab=0, infer_batch=16, infer_rounds=2,
               lesions=30, radiomics_lesions=8, keras_modes="keras_f32,keras_xla,keras_mixed,keras_xla_mixed",
               torch_modes="torch_eager,torch_compile,torch_eager_amp,torch_compile_amp")
TINY = Settings("tiny", rounds=2, inner_rounds=1, size=32, batch=1, steps=1, batches=2, slab=1, infer_batch=1,
                lesions=5, radiomics_lesions=2, analysis_slices=16, keras_modes="keras_f32,keras_xla,keras_mixed,keras_xla_mixed",
                torch_modes="torch_eager,torch_compile,torch_eager_amp")


# --- running sides ---------------------------------------------------------------------


def run_side(cmd: list[str], timeout: float = 1800) -> dict[str, Any]:
    """Run one side's process; return its last JSON line (``metrics``, ``info``)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, encoding="utf-8", errors="replace")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[1:4])} failed (exit {proc.returncode}):\n{tail}")
    out = json.loads(lines[-1])
    log.info("  %s: %.0f s %s", " ".join(a for a in cmd[1:4] if not a.startswith("/")), time.perf_counter() - t,
             json.dumps(out["metrics"]))
    return out


def alternate(sides: dict[str, list[str]], rounds: int) -> dict[str, dict[str, Any]]:
    """Run every side once per round in a fixed order (A, B, A, B, ...); medians per metric."""
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in sides}
    info: dict[str, dict[str, Any]] = {}
    for r in range(rounds):
        for name, cmd in sides.items():
            log.info("round %d/%d: %s", r + 1, rounds, name)
            out = run_side(cmd)
            for k, v in out["metrics"].items():
                samples[name].setdefault(k, []).append(float(v))
            info[name] = out["info"]
    return {name: {"metrics": {k: statistics.median(v) for k, v in m.items()}, "samples": m, "info": info[name]}
            for name, m in samples.items()}


def time_rss(cmd: list[str], timeout: float = 3600) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one command, via ``/usr/bin/time -f %M``."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss", encoding="utf-8") as f:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        t = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", f.name, *cmd], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=ROOT, encoding="utf-8", errors="replace")
        seconds = time.perf_counter() - t
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
            raise RuntimeError(f"{' '.join(cmd[:5])} failed (exit {proc.returncode}):\n{tail}")
        rss = int(f.read().strip().splitlines()[-1]) / 1024.0
        log.info("  peak RSS %.0f MiB in %.0f s: %s", rss, seconds, " ".join(Path(a).name for a in cmd[1:4]))
        return rss, seconds


# --- inputs (generated once into benchmarks/.cache) --------------------------------------


def cli(*args: str) -> list[str]:
    return [PY, str(ROOT / "cli.py"), *args]


def ensure_paper() -> Path:
    """One paper-sized phantom case (385 x 512 x 512) in ``.cache/paper1``."""
    out = CACHE / "paper1"
    if not (out / "dataset.json").is_file():
        log.info("setup: paper-sized phantom (about a minute)")
        subprocess.run(cli("phantom", "--out", str(out), "--cases", "1", "--scale", "paper", "--overwrite"),
                       check=True, cwd=ROOT, capture_output=True)
    return out


def ensure_slab(n: int) -> Path:
    """A cohort holding ``n`` consecutive slices (full 512 x 512) from the middle of the
    paper case's lesion-bearing slices (``n`` = 0: the whole volume)."""
    paper = ensure_paper()
    if n == 0:
        return paper
    out = CACHE / f"slab{n}"
    if (out / "dataset.json").is_file():
        return out
    import numpy as np

    from analysis.cohort.layout import Cohort, write_dataset_json
    from analysis.imaging.io import Geometry, read_array, write_array, write_mask

    cohort = Cohort(paper)
    case = cohort.cases()[0]
    ct, geo = read_array(cohort.image_path(case))
    label, _ = read_array(cohort.label_path(case))
    zs = np.flatnonzero(label.any(axis=(1, 2)))
    mid = int(zs[len(zs) // 2]) if len(zs) else ct.shape[0] // 2
    lo = max(0, min(mid - n // 2, ct.shape[0] - n))
    sub = Geometry(size=(geo.size[0], geo.size[1], n), spacing=geo.spacing, origin=geo.origin, direction=geo.direction)
    tmp = Path(tempfile.mkdtemp(dir=CACHE))
    for d in ("imagesTr", "labelsTr"):
        (tmp / d).mkdir()
    write_array(ct[lo:lo + n], sub, tmp / "imagesTr" / f"{case}_0000.nii.gz")
    write_mask(label[lo:lo + n], sub, tmp / "labelsTr" / f"{case}.nii.gz")
    write_dataset_json(tmp, 1, description="synthetic phantom slab (benchmark)")
    os.replace(tmp, out)
    return out


def ensure_runs() -> Path:
    out = CACHE / "runs"
    if all((out / n / "config.json").is_file() for n in ("unet", "resunet", "resattunet", "resnet34", "unet_tiny")):
        return out
    run_side(tf_side("--case", "make-runs", "--out", out))
    return out


def ensure_nnunet() -> Path:
    """A tiny trained nnU-Net 2d (fold 0, 1 epoch x 1 iteration) on paper-spacing phantoms."""
    work = CACHE / "nnunet_work"
    from nnunet_bridge.env import WorkLayout  # paths only: imports no torch

    if (WorkLayout(work).model_folder / "fold_0" / "checkpoint_final.pth").is_file():
        return work
    ds = CACHE / "nnunet_ds"
    log.info("setup: tiny nnU-Net training (a few minutes on a CPU)")
    if not (ds / "splits.json").is_file():
        shutil.rmtree(ds, ignore_errors=True)
        subprocess.run(cli("phantom", "--out", str(ds), "--cases", "2", "--shape", "8,512,512",
                           "--spacing", "0.8203125,0.8203125,2.5"), check=True, cwd=ROOT, capture_output=True)
        from analysis.cohort.splits import write_splits

        write_splits(ds, test_fraction=0.0, folds=2)
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run(cli("nnunet", "train", "--dataset", str(ds), "--work", str(work), "--folds", "0", "--epochs", "1",
                       "--iterations", "1", "--val-iterations", "1"), check=True, cwd=ROOT, capture_output=True)
    return work


# --- cases ------------------------------------------------------------------------------


def tf_side(*args: Any) -> list[str]:
    """A Keras side's command, with the tf wing's interpreter (study.wings: .venv-tf after make setup GPU=1)."""
    return [wing_python("tf"), str(HERE / "_tf_side.py"), *map(str, args)]


def torch_side(*args: Any) -> list[str]:
    return [wing_python("torch"), str(HERE / "_torch_side.py"), *map(str, args)]


def case_pipeline(s: Settings) -> dict[str, Any]:
    paper = ensure_paper()
    common = ("--size", s.size, "--batch", s.batch, "--rounds", s.inner_rounds)
    return alternate({
        "tf_pipeline": tf_side("--case", "pipeline", "--dataset", paper, "--cache", CACHE / "slices",
                               "--batches", s.batches, *common),
        "keras_train_f32": tf_side("--case", "train", "--modes", "keras_f32", "--steps", s.steps, *common),
    }, s.rounds)


def case_train(s: Settings) -> dict[str, Any]:
    common = ("--size", s.size, "--batch", s.batch, "--steps", s.steps, "--rounds", s.inner_rounds)
    return alternate({"keras": tf_side("--case", "train", "--modes", s.keras_modes, *common),
                      "torch": torch_side("--case", "train", "--modes", s.torch_modes, *common)}, s.rounds)


def case_infer(s: Settings) -> dict[str, Any]:
    slab = ensure_slab(s.slab)
    runs = ensure_runs()
    work = ensure_nnunet()
    res = alternate({"keras": tf_side("--case", "infer", "--dataset", slab, "--runs", runs, "--batch", s.infer_batch),
                     "nnunet": torch_side("--case", "nnunet", "--dataset", slab, "--work", work, "--rounds", 1)},
                    s.infer_rounds)
    res["slices"] = s.slab or 385
    return res


def case_newpatients(s: Settings) -> dict[str, Any]:
    """predict on new-patient CT: body crop and bf16 vs today's whole-slice float32, full-width UNet
    and ResAttUNet, the cascade, and nnU-Net's predictor (mirroring off / on, and cropped)."""
    n = {"tiny": 2, "quick": 8}.get(s.name, NEW_PATIENT_SLAB)
    slab = ensure_slab(n)
    runs = ensure_runs()
    work = ensure_nnunet()
    res = alternate({"keras": tf_side("--case", "newpatients", "--dataset", slab, "--runs", runs, "--batch", 4,
                                      "--models", ",".join((*NEW_PATIENT_MODELS, "cascade"))),
                     "nnunet": torch_side("--case", "nnunet", "--dataset", slab, "--work", work, "--rounds", 1)}, 1)
    res["slices"] = n
    return res


def case_analysis(s: Settings) -> dict[str, Any]:
    an = [PY, str(HERE / "_analysis_side.py"), "--lesions", str(s.lesions), "--slices", str(s.analysis_slices)]
    res = alternate({"metrics": [*an, "--case", "metrics", "--rounds", str(s.analysis_rounds)]}, 1)
    res.update(alternate({"radiomics": [*an, "--case", "radiomics", "--rounds", "1",
                                         "--radiomics-lesions", str(s.radiomics_lesions)]},
                         1))
    return res


def case_memory(s: Settings) -> dict[str, Any]:
    """Peak RSS of each command at a small and a larger number of paper-sized cases."""
    runs = ensure_runs()
    few, many = s.phantom_cases
    res: dict[str, Any] = {"phantom": {}, "cache": {}, "predict": {}, "analyze": {}}
    mem = CACHE / f"paper{many}"
    for n in (few, many):
        out = mem if n == many else Path(tempfile.mkdtemp(dir=CACHE)) / "ds"
        rss, sec = time_rss(cli("phantom", "--out", str(out), "--cases", str(n), "--scale", "paper", "--overwrite"))
        res["phantom"][n] = {"rss_mib": rss, "s": sec}
        if n != many:
            shutil.rmtree(out.parent)
    from analysis.cohort.layout import Cohort

    cases = Cohort(mem).cases()
    pred = CACHE / "mem_pred"
    for n in s.memory_cases:
        sel = ",".join(cases[:n])
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            code = ("import sys; from analysis.cohort.layout import Cohort; from bonemets_tf.cache import ensure_cached; "
                    f"c = Cohort(sys.argv[1]); ensure_cached(c, c.cases()[:{n}], sys.argv[2])")
            rss, sec = time_rss([PY, "-c", code, str(mem), tmp])
            res["cache"][n] = {"rss_mib": rss, "s": sec}
            out = Path(tmp) / "pred" / "unet_tiny"
            rss, sec = time_rss(cli("predict", "--model", str(runs / "unet_tiny"), "--dataset", str(mem), "--out",
                                    str(out), "--cases", sel, "--batch-size", "8"))
            res["predict"][n] = {"rss_mib": rss, "s": sec}
            shutil.rmtree(pred, ignore_errors=True)
            (pred / "gt").mkdir(parents=True)
            for c in cases[:n]:  # the reference labels as one model's predictions: any masks do
                os.link(Cohort(mem).label_path(c), pred / "gt" / Cohort(mem).label_path(c).name)
            rss, sec = time_rss(cli("analyze", "--dataset", str(mem), "--predictions", str(pred), "--out",
                                    str(Path(tmp) / "an"), "--cases", sel, "--no-radiomics"))
            res["analyze"][n] = {"rss_mib": rss, "s": sec}
    shutil.rmtree(pred, ignore_errors=True)
    return res


RUNNERS: dict[str, Callable[[Settings], dict[str, Any]]] = {
    "pipeline": case_pipeline, "train": case_train, "infer": case_infer, "newpatients": case_newpatients,
    "analysis": case_analysis,
    "memory": case_memory}


# --- rows -------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: a comparison, its two values and their ratio."""

    name: str
    a: float | None
    b: float | None
    unit: str
    note: str = ""
    ratio: float | None = field(default=None)

    def __post_init__(self) -> None:
        if self.ratio is None and self.a is not None and self.b:
            self.ratio = self.a / self.b


def _m(res: dict[str, Any], case: str, side: str, key: str) -> float | None:
    try:
        return float(res[case][side]["metrics"][key])
    except (KeyError, TypeError):
        return None


def build_rows(res: dict[str, Any], s: Settings) -> list[Row]:
    """Turn measurements into comparison rows (missing measurements are skipped)."""
    rows: list[Row] = []
    if "pipeline" in res:
        pipe = _m(res, "pipeline", "tf_pipeline", "pipeline_slices_s")
        raw = _m(res, "pipeline", "tf_pipeline", "raw_read_slices_s")
        model = _m(res, "pipeline", "keras_train_f32", "keras_f32_img_s")
        rows.append(Row("pipeline: tf.data slices/s vs UNet train step slices/s (need >= 5)", pipe, model,
                        "slices/s", f"{s.size}^2 crops, batch {s.batch}"))
        rows.append(Row("pipeline: tf.data slices/s vs raw memmap read (limit)", pipe, raw, "slices/s"))
    if "train" in res:
        k, t = res["train"]["keras"], res["train"]["torch"]
        kp, tp = k["info"].get("params"), t["info"].get("params")
        same = "equal params" if kp == tp else "PARAMS DIFFER"
        note = f"{s.size}^2, batch {s.batch}; params keras {kp:,} / torch {tp:,} ({same})"
        f32 = _m(res, "train", "keras", "keras_f32_img_s")
        for mode in s.torch_modes.split(","):
            rows.append(Row(f"train: keras f32 vs {mode.replace('_', ' ')} (images/s)", f32,
                            _m(res, "train", "torch", f"{mode}_img_s"), "img/s", note))
        for mode in s.keras_modes.split(",")[1:]:
            rows.append(Row(f"train: {mode.replace('_', ' ')} vs keras f32 (images/s)",
                            _m(res, "train", "keras", f"{mode}_img_s"), f32, "img/s",
                            k["info"].get("mixed", "") if "mixed" in mode else ""))
        peak = _m(res, "train", "torch", "matmul_f32_flops")
        flops = 3 * unet_forward_flops(s.size)
        for side, mode in (("keras", "keras_f32"), ("keras", "keras_xla"), ("torch", "torch_eager"),
                           ("torch", "torch_compile")):
            rate = _m(res, "train", side, f"{mode}_img_s")
            if rate is not None and peak:
                rows.append(Row(f"MFU: {mode.replace('_', ' ')} FLOP/s vs f32 matmul peak", rate * flops, peak,
                                "FLOP/s", f"{flops / 1e9:.1f} GFLOP/img (3x fwd)"))
        bf16 = _m(res, "train", "torch", "matmul_bf16_flops")
        mixed = _m(res, "train", "keras", "keras_mixed_img_s")
        if bf16 and mixed:
            rows.append(Row("MFU: keras mixed FLOP/s vs bf16 matmul peak", mixed * flops, bf16, "FLOP/s"))
    if "infer" in res:
        n = res["infer"]["slices"]
        nn = _m(res, "infer", "nnunet", "nnunet_nomirror_s")
        nm = _m(res, "infer", "nnunet", "nnunet_mirror_s")
        note = (f"{n} slices of 512x512" + ("" if n == 385 else " (slab; s/volume = x385/slices)")
                + "; keras: network time of predict(), nnU-Net: predict_volume()")
        for arch in ("unet", "resunet", "resattunet"):
            sec = _m(res, "infer", "keras", f"{arch}_network_s")
            rows.append(Row(f"infer: keras {arch} slices/s vs nnU-Net no mirroring", n / sec if sec else None,
                            n / nn if nn else None, "slices/s", note))
        unet = _m(res, "infer", "keras", "unet_network_s")
        rows.append(Row("infer: keras unet slices/s vs nnU-Net mirroring", n / unet if unet else None,
                        n / nm if nm else None, "slices/s"))
        rows.append(Row("infer: nnU-Net mirroring vs no mirroring (s/volume)", nm * 385 / n if nm else None,
                        nn * 385 / n if nn else None, "s/vol"))
        casc = _m(res, "infer", "keras", "cascade_network_s")
        timing = res["infer"]["keras"]["info"].get("cascade_timing", {})
        rows.append(Row("infer: cascade (detector-gated unet) vs plain unet (s/volume)",
                        casc * 385 / n if casc else None, unet * 385 / n if unet else None, "s/vol",
                        f"random-init detector; timing {json.dumps(timing)[:80]}"))
    if "newpatients" in res:
        n = res["newpatients"]["slices"]
        per_vol = 385 / n
        note = f"{n} slices of the paper phantom at 512x512 (s/volume = x{per_vol:.1f}); random-init full width"
        # the machine's f32 peak: the best matmul either framework reached here (TensorFlow's
        # 2048^2 matmul alone read 190 GFLOP/s where torch's read 333 on the same 2 cores)
        peaks = [_m(res, "newpatients", side, "matmul_f32_flops") for side in ("keras", "nnunet")]
        peak = max((v for v in peaks if v), default=None)
        skipped = res["newpatients"]["keras"].get("info", {}).get("bf16_skipped")
        for arch in NEW_PATIENT_MODELS:
            base = _m(res, "newpatients", "keras", f"{arch}_nocrop_f32_s")
            for name, label in (("crop_f32", "exact body crop"), ("mirror_f32", "mirroring (4 passes)"),
                                ("nocrop_bf16", "bf16, whole slices"), ("crop_bf16", "exact crop + bf16")):
                sec = _m(res, "newpatients", "keras", f"{arch}_{name}_s")
                if sec is None and "bf16" in name and skipped:
                    rows.append(Row(f"new patients: {arch} {label}: skipped", None, None, "s/vol", skipped))
                    continue
                dice = _m(res, "newpatients", "keras", f"{arch}_{name}_dice")
                rows.append(Row(f"new patients: {arch} {label} vs whole-slice float32 (s/volume, speed-up)",
                                base * per_vol if base else None, sec * per_vol if sec else None, "s/vol",
                                f"{note}; mask Dice vs whole-slice f32 {dice:.4f}" if dice is not None else note))
            flops = _m(res, "newpatients", "keras", f"{arch}_flops_per_slice")
            for name, label, passes in (("nocrop_f32", "whole slices", 1), ("mirror_f32", "mirroring", 4),
                                        ("crop_f32", "exact crop", None)):
                sec = _m(res, "newpatients", "keras", f"{arch}_{name}_network_s")
                frac = _m(res, "newpatients", "keras", f"{arch}_{name}_pixel_fraction") if passes is None else passes
                if flops and sec and peak and frac:
                    rows.append(Row(f"MFU: {arch} inference, {label} (network FLOP/s vs f32 matmul peak)",
                                    flops * frac * n / sec, peak, "FLOP/s",
                                    f"{flops / 1e9:.1f} GFLOP per 512^2 slice x {frac:g} (passes or pixel share)"))
        casc = _m(res, "newpatients", "keras", "cascade_crop_f32_s")
        unet = _m(res, "newpatients", "keras", "unet_crop_f32_s")
        rows.append(Row("new patients: unet cropped vs cascade cropped (s/volume)", unet * per_vol if unet else None,
                        casc * per_vol if casc else None, "s/vol", "random-init detector gates the slices"))
        nn = _m(res, "newpatients", "nnunet", "nnunet_nomirror_s")
        nm = _m(res, "newpatients", "nnunet", "nnunet_mirror_s")
        nc = _m(res, "newpatients", "nnunet", "nnunet_crop_nomirror_s")
        nflops = _m(res, "newpatients", "nnunet", "nnunet_flops_per_slice")
        npeak = peak
        for sec, label, passes in ((nn, "no mirroring", 1), (nm, "mirroring", 4)):
            if nflops and sec and npeak:
                rows.append(Row(f"MFU: nnU-Net inference, {label} (network FLOP/s vs f32 matmul peak, torch)",
                                nflops * passes * n / sec, npeak, "FLOP/s",
                                f"{nflops / 1e9:.1f} GFLOP per slice through its sliding window; tiny trained plan"))
        rows.append(Row("new patients: nnU-Net mirroring vs no mirroring (s/volume)", nm * per_vol if nm else None,
                        nn * per_vol if nn else None, "s/vol", "tiny trained 2d plan; whole slices"))
        rows.append(Row("new patients: nnU-Net whole slices vs body crop, no mirroring (s/volume)",
                        nn * per_vol if nn else None, nc * per_vol if nc else None, "s/vol"))
    if "analysis" in res:
        p = _m(res, "analysis", "metrics", "project_s")
        b = _m(res, "analysis", "metrics", "scipy_baseline_s")
        rows.append(Row("analysis: scipy baseline s vs project s (speed-up)", b, p, "s",
                        f"{s.analysis_slices}x512x512 case pair, GT + prediction"))
        j1 = _m(res, "analysis", "radiomics", "radiomics_jobs1_s_per_lesion")
        j2 = _m(res, "analysis", "radiomics", "radiomics_jobs2_s_per_lesion")
        rows.append(Row("radiomics: s/lesion jobs 1 vs jobs 2 (speed-up)", j1, j2, "s/lesion",
                        f"{os.cpu_count()} CPUs"))
    if "memory" in res:
        for what, per in res["memory"].items():
            ns = sorted(per, key=int)
            if len(ns) >= 2:
                lo, hi = per[ns[0]], per[ns[-1]]
                rows.append(Row(f"memory: {what} peak RSS {ns[-1]} vs {ns[0]} case(s) (want ~1)", hi["rss_mib"],
                                lo["rss_mib"], "MiB", f"{hi['s']:.0f} s vs {lo['s']:.0f} s"))
    return rows


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1e9:
        return f"{v / 1e9:.1f}G"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def format_table(rows: list[Row]) -> str:
    """Fixed-width table: comparison, A, B, unit, ratio A/B, note."""
    head = ("comparison", "A", "B", "unit", "ratio A/B", "note")
    body = [(r.name, _fmt(r.a), _fmt(r.b), r.unit, "ratio " + (f"{r.ratio:.3g}" if r.ratio is not None else "-"),
             r.note) for r in rows]
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line[:5], widths)) + "  " + line[5] for line in (head, *body)]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


# --- main -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = next((int(ln.split()[1]) // 1024 for ln in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines()
                if ln.startswith("MemTotal")), None) if Path("/proc/meminfo").exists() else None
    from importlib import metadata

    versions = {}
    for pkg in ("tensorflow", "keras", "torch", "nnunetv2", "numpy", "scipy", "pyradiomics-bhklab"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "ram_mib": mem, "python": platform.python_version(),
            "load_avg": os.getloadavg(), "versions": versions}


def save(path: Path, mode: str, s: Settings, results: dict[str, Any], errors: dict[str, str],
         start: float) -> list[Row]:
    """Write the results file atomically; return the table rows."""
    from analysis.imaging.io import atomic_write_json

    rows = build_rows(results, s)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"mode": mode, "settings": s.__dict__, "machine": machine(),
                             "seconds": round(time.perf_counter() - start, 1),
                             "rows": [r.__dict__ for r in rows], "results": results, "errors": errors})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="bonemets benchmark suite (ratios measured side by side in one run)")
    p.add_argument("--quick", action="store_true", help="reduced sizes of pipeline/train/infer/analysis (< 5 min)")
    p.add_argument("--mode", choices=("quick", "full", "gpu", "tiny"), default=None,
                   help="size preset (default: full, or quick with --quick; gpu.sh uses gpu, its dry run tiny)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(CASES)}")
    p.add_argument("--rounds", type=int, default=None, help="process-level alternations (default per mode)")
    p.add_argument("--table-from", type=Path, nargs="+", default=None, metavar="JSON",
                   help="print the table of earlier results files (merged) instead of running")
    p.add_argument("--json", type=Path, default=RESULTS, help=f"results file (default {RESULTS.relative_to(ROOT)})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.table_from:
        rows = []
        for f in args.table_from:  # each file's rows with that file's own settings
            saved = json.loads(f.read_text(encoding="utf-8"))
            fs = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["settings"].items()})
            rows += build_rows(saved["results"], fs)
        print(format_table(rows))
        return 0
    mode = args.mode or ("quick" if args.quick else "full")
    s = {"quick": QUICK, "full": FULL, "gpu": GPU, "tiny": TINY}[mode]
    if args.rounds:
        s = Settings(**{**s.__dict__, "rounds": args.rounds})
    cases = args.only.split(",") if args.only else [c for c in CASES if not (mode in ("quick", "gpu", "tiny")
                                                                             and c == "memory")]
    bad = [c for c in cases if c not in CASES]
    if bad:
        p.error(f"--only {bad[0]}: expected one of {', '.join(CASES)}")
    CACHE.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    rows: list[Row] = []
    start = time.perf_counter()
    for case in cases:
        t = time.perf_counter()
        log.info("== %s (%s)", case, mode)
        try:
            results[case] = RUNNERS[case](s)
        except Exception as exc:  # one broken case must not lose the others' numbers
            errors[case] = f"{type(exc).__name__}: {exc}"
            log.error("%s failed: %s", case, errors[case])
        log.info("== %s done in %.0f s", case, time.perf_counter() - t)
        rows = save(args.json, mode, s, results, errors, start)  # after every case: a killed run keeps its numbers
    print(format_table(rows))
    for case, err in errors.items():
        print(f"FAILED {case}: {err.splitlines()[0]}")
    print(f"wrote {args.json} ({time.perf_counter() - start:.0f} s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
