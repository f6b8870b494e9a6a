"""TensorFlow side of the benchmarks: one case per process, one JSON line on stdout.

Run by ``benchmarks/run.py`` (never imports torch). Cases:

* ``pipeline``: slices/s of the real training pipeline (``bonemets_tf.data.training_dataset``,
  lesion-biased crops and augmentation on) from a slice cache, alternated in rounds with a
  raw ``np.memmap`` read of the same kind of samples (3 context slices + mask) from the same
  cache files: the read limit.
* ``train``: images/s of a ``train_on_batch`` step of the registry UNet (full width) on one
  fixed batch, for float32, float32 + XLA and mixed precision (bfloat16 on CPU, float16 on
  GPU), modes alternated in rounds; also the parameter counts.
* ``make-runs``: RUN folders (random init, ``model.keras`` + ``config.json``) for the
  segmenters and one detector, so inference goes through the real ``predict`` path.
* ``infer``: seconds of :func:`bonemets_tf.predict.predict` (NIfTI in, masks out) over a
  cohort, for each segmenter and for the detector-gated cascade.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SEGMENTERS = ("unet", "resunet", "resattunet")
DETECTOR = "resnet34"


def _emit(metrics: dict, **info) -> None:
    print(json.dumps({"metrics": metrics, "info": info}), flush=True)


def _gpu(tf) -> bool:
    return bool(tf.config.list_physical_devices("GPU"))


def pipeline(args) -> None:
    import tensorflow as tf

    from analysis.cohort.layout import Cohort
    from bonemets_tf import data
    from bonemets_tf.cache import ensure_cached

    cohort = Cohort(args.dataset)
    cached = ensure_cached(cohort, cohort.cases(), args.cache)
    store = data.SliceStore(cached, context=args.context)
    sampling = data.Sampling("segment", image_size=args.size)
    it = iter(data.training_dataset(store, sampling, batch_size=args.batch, seed=0))
    for _ in range(3):
        next(it)  # warm-up: tracing and autotune
    arrays = [(c.ct(), c.mask()) for c in cached]
    rng = np.random.default_rng(0)
    half = args.context // 2

    def raw_batch() -> float:
        total = 0.0
        for _ in range(args.batch):
            ct, mask = arrays[rng.integers(len(arrays))]
            z = int(rng.integers(half, ct.shape[0] - half))
            image = np.array(ct[z - half:z + half + 1], dtype=np.float32)  # copy out of the page cache
            m = np.array(mask[z], dtype=np.float32)
            total += float(image[0, 0, 0]) + float(m[0, 0])
        return total

    raw_batch()
    pipe, raw = [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        pipe.append(args.batches * args.batch / (time.perf_counter() - t))
        t = time.perf_counter()
        for _ in range(args.batches * 4):
            raw_batch()
        raw.append(args.batches * 4 * args.batch / (time.perf_counter() - t))
    _emit({"pipeline_slices_s": statistics.median(pipe), "raw_read_slices_s": statistics.median(raw)},
          store=store.mode, slices=store.num_slices, crop=args.size, batch=args.batch, context=args.context,
          threads=os.cpu_count(), tensorflow=tf.__version__)


def train(args) -> None:
    import keras
    import tensorflow as tf
    from unet_flops import FILTERS

    from bonemets_tf.losses import DiceBCELoss
    from bonemets_tf.models import unet as unet_module
    from bonemets_tf.models.registry import build_model

    if tuple(unet_module.FILTERS) != tuple(FILTERS):
        raise SystemExit(f"benchmarks/unet_flops.py FILTERS {FILTERS} != bonemets_tf UNet {unet_module.FILTERS}")
    gpu = _gpu(tf)
    mixed = "mixed_float16" if gpu else "mixed_bfloat16"
    modes = {"keras_f32": ("float32", False), "keras_xla": ("float32", True), "keras_mixed": (mixed, False),
             "keras_xla_mixed": (mixed, True)}
    wanted = args.modes.split(",")
    rng = np.random.default_rng(0)
    x = rng.uniform(-1000, 1500, (args.batch, args.size, args.size, 1)).astype(np.float32)
    y = (rng.uniform(size=(args.batch, args.size, args.size, 1)) > 0.9).astype(np.float32)
    models, info = {}, {}
    for name in wanted:
        policy, jit = modes[name]
        keras.mixed_precision.set_global_policy(policy)
        keras.utils.set_random_seed(0)
        model = build_model("unet")
        model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=DiceBCELoss(), jit_compile=jit)
        t = time.perf_counter()
        for _ in range(2):
            model.train_on_batch(x, y)  # trace / compile
        info[f"{name}_warmup_s"] = round(time.perf_counter() - t, 2)
        info["params"] = model.count_params()
        info["trainable_params"] = int(sum(np.prod(w.shape) for w in model.trainable_weights))
        models[name] = model
    keras.mixed_precision.set_global_policy("float32")
    rates: dict[str, list[float]] = {n: [] for n in wanted}
    for _ in range(args.rounds):
        for name in wanted:
            t = time.perf_counter()
            for _ in range(args.steps):
                loss = models[name].train_on_batch(x, y)
            rates[name].append(args.steps * args.batch / (time.perf_counter() - t))
            info[f"{name}_loss"] = round(float(np.asarray(loss).ravel()[0]), 4)
    _emit({f"{n}_img_s": statistics.median(r) for n, r in rates.items()}, size=args.size, batch=args.batch,
          device="gpu" if gpu else "cpu", mixed=mixed, tensorflow=tf.__version__, keras=keras.__version__, **info)


def make_runs(args) -> None:
    import keras

    from bonemets_tf.models.registry import build_model
    from bonemets_tf.train import TrainConfig

    out = Path(args.out)
    # unet_tiny: UNet at 1/16 width, for the memory benchmark (volume handling, not the network)
    for name, arch, width in (*((a, a, 1.0) for a in (*SEGMENTERS, DETECTOR)), ("unet_tiny", "unet", 0.0625)):
        run = out / name
        if (run / "config.json").is_file():
            continue
        keras.utils.set_random_seed(0)
        task = "detect" if arch == DETECTOR else "segment"
        size = 256
        model = build_model(arch, width=width, image_size=size)
        tmp = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None))
        model.save(tmp / "model.keras")
        config = TrainConfig(dataset=str(out), task=task, arch=arch, image_size=size, width=width)
        (tmp / "config.json").write_text(json.dumps({"settings": asdict(config), "orientation": "LPS", "note": "random init (benchmark)"}), encoding="utf-8")
        run.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, run)
    _emit({}, runs=str(out))


def infer(args) -> None:
    import tensorflow as tf

    from analysis.prediction.folder import read_record
    from bonemets_tf.predict import PredictOptions, predict

    runs = Path(args.runs)
    # whole slices, no extras: the network path the earlier rows measured (newpatients times the rest)
    options = PredictOptions(cases="all", batch_size=args.batch, crop=False, preview=False)
    metrics, info = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(arch, runs / arch, None) for arch in args.models.split(",") if arch != "cascade"]
        if "cascade" in args.models.split(","):
            jobs.append(("cascade", runs / "unet", runs / DETECTOR))
        for name, model, detector in jobs:
            out = Path(tmp) / name
            # warm-up run: Predictor.warm_up traces at 32^2; the first 512^2 call still pays
            # oneDNN set-up (~20 s here), which a 1-slice slab would otherwise count as inference
            predict(model, args.dataset, out, options=options, detector=detector, overwrite=True)
            t = time.perf_counter()
            predict(model, args.dataset, out, options=options, detector=detector, overwrite=True)
            seconds = time.perf_counter() - t
            timing = read_record(out).get("timing", {})
            metrics[f"{name}_s"] = seconds
            metrics[f"{name}_network_s"] = float(timing.get("seconds_network", float("nan")))
            info[f"{name}_timing"] = timing
    _emit(metrics, device="gpu" if _gpu(tf) else "cpu", tensorflow=tf.__version__, **info)


def _agreement(a, b) -> float:
    """The project's Dice of two variants' masks; 1.0 where both are empty (the metric's NaN): two
    variants that both find nothing agree."""
    from analysis.lesions.overlap import dice

    value = dice(a, b)
    return 1.0 if np.isnan(value) else value


def bf16_units(tf) -> str | None:
    """Why mixed_bfloat16 cannot help here (None when it can): a GPU, or a CPU with bf16 units
    (avx512_bf16 or AMX), computes in bfloat16; elsewhere TensorFlow emulates it (0.11-0.14x
    float32 measured on an AVX2 CPU), so timing it only makes a run slow."""
    if _gpu(tf):
        return None
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
                     if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return "no /proc/cpuinfo to tell whether the CPU has bf16 units"
    if {"avx512_bf16", "amx_bf16"} & set(flags):
        return None
    return "this CPU has no bf16 units (no avx512_bf16 or amx_bf16 flag): bfloat16 is emulated, 0.11-0.14x float32"


def forward_flops(model, size: int) -> int:
    """FLOPs of one ``size x size`` slice through a Keras model, counted by TensorFlow's profiler
    on the frozen graph (2 per multiply-add of every convolution and matmul)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = tf.TensorSpec([1, size, size, model.inputs[0].shape[-1]], tf.float32)
    frozen = convert_variables_to_constants_v2(tf.function(lambda x: model(x, training=False)).get_concrete_function(spec))
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return int(tf.compat.v1.profiler.profile(graph=frozen.graph, options=options).total_float_ops)


def matmul_peak(tf, n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matmul FLOP/s of this machine through TensorFlow (the best of ``repeats``)."""
    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    mm = tf.function(lambda x, y: tf.matmul(x, y))
    mm(a, b).numpy()
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a, b).numpy()
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


def newpatients(args) -> None:
    """Seconds per volume of ``predict`` on new-patient CT: whole slices vs the exact body crop vs
    mirroring, float32 vs mixed_bfloat16 (where the CPU has bf16 units), the masks' agreement
    (Dice) with the float32 whole-slice result, and the inference MFU: network FLOPs per slice
    (TensorFlow's profiler) x slices/s over the measured float32 matmul peak."""
    import tensorflow as tf

    from analysis.imaging.io import read_array
    from analysis.prediction.folder import read_record
    from bonemets_tf.predict import PredictOptions, predict
    from bonemets_tf.run import read_run

    runs = Path(args.runs)
    variants = {"nocrop_f32": dict(crop=False), "crop_f32": dict(crop=True), "mirror_f32": dict(crop=False, mirror=True),
                "crop_bf16": dict(crop=True, precision="mixed_bfloat16"),
                "nocrop_bf16": dict(crop=False, precision="mixed_bfloat16")}
    no_bf16 = bf16_units(tf)
    metrics, info = {"matmul_f32_flops": matmul_peak(tf)}, {"bf16_skipped": no_bf16}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models.split(","):
            detector = runs / DETECTOR if arch == "cascade" else None
            model = runs / ("unet" if arch == "cascade" else arch)
            if arch != "cascade":
                size = max(read_array(p)[0].shape[1] for p in sorted(Path(args.dataset, "imagesTr").glob("*.nii.gz")))
                metrics[f"{arch}_flops_per_slice"] = forward_flops(read_run(model).load_model(), size)
            masks = {}
            for name, extra in variants.items():
                if (arch == "cascade" and name != "crop_f32") or (no_bf16 and "bf16" in name):
                    continue
                options = PredictOptions(cases="all", batch_size=args.batch, detector_threshold=0.5, **extra)
                out = Path(tmp) / f"{arch}_{name}"
                predict(model, args.dataset, out, options=options, detector=detector, overwrite=True)  # warm-up
                t = time.perf_counter()
                predict(model, args.dataset, out, options=options, detector=detector, overwrite=True)
                metrics[f"{arch}_{name}_s"] = time.perf_counter() - t
                record = read_record(out)
                metrics[f"{arch}_{name}_network_s"] = float(record["timing"]["seconds_network"])
                crops = [p.get("crop") for p in record["per_case"].values()]
                info[f"{arch}_{name}_crop"] = crops
                if extra.get("crop"):
                    metrics[f"{arch}_{name}_pixel_fraction"] = float(np.mean([c["pixel_fraction"] for c in crops]))
                masks[name] = [read_array(m)[0] for m in sorted(out.glob("*.nii.gz"))]
            for name in masks:
                if name != "nocrop_f32" and "nocrop_f32" in masks:
                    metrics[f"{arch}_{name}_dice"] = min(_agreement(a, b) for a, b in zip(masks[name], masks["nocrop_f32"]))
    _emit(metrics, device="gpu" if _gpu(tf) else "cpu", tensorflow=tf.__version__, **info)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", required=True, choices=("pipeline", "train", "make-runs", "infer", "newpatients"))
    p.add_argument("--dataset")
    p.add_argument("--cache")
    p.add_argument("--runs")
    p.add_argument("--out")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=3)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modes", default="keras_f32,keras_xla,keras_mixed")
    p.add_argument("--models", default="unet,resunet,resattunet,cascade")
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    {"pipeline": pipeline, "train": train, "make-runs": make_runs, "infer": infer,
     "newpatients": newpatients}[args.case](args)


if __name__ == "__main__":
    main()
