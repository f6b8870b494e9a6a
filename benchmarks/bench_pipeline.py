"""Benchmark (not a test): tf.data throughput from the slice cache and UNet train-step rate.

Run: ``python benchmarks/bench_pipeline.py [--cases 4] [--size 128] [--batch 8]``. Prints
slices/s of the segmentation pipeline alone, then batches/s of a full-width UNet train
step fed the same (cached in memory) batch, for float32, XLA and mixed_bfloat16.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", type=int, default=3)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    import keras
    import tensorflow as tf

    from analysis.cohort.layout import Cohort
    from analysis.cohort.phantom import generate_cohort
    from bonemets_tf import data
    from bonemets_tf.cache import ensure_cached
    from bonemets_tf.losses import DiceBCELoss
    from bonemets_tf.models.registry import build_model

    tmp = Path(tempfile.mkdtemp())
    root = generate_cohort(tmp / "DS", cases=args.cases, seed=0)
    cohort = Cohort(root)
    t = time.perf_counter()
    cached = ensure_cached(cohort, cohort.cases(), tmp / "cache")
    print(f"cache build: {time.perf_counter() - t:.1f} s for {sum(c.shape[0] for c in cached)} slices")
    for mode in ("memory", "memmap"):
        store = data.SliceStore(cached, context=3, store=mode)
        ds = data.training_dataset(store, data.Sampling("segment", image_size=args.size), batch_size=args.batch, seed=0)
        it = iter(ds)
        next(it)
        n, t = 20, time.perf_counter()
        for _ in range(n):
            next(it)
        print(f"tf.data {mode}: {n * args.batch / (time.perf_counter() - t):.0f} slices/s "
              f"({args.size}x{args.size}x3 crops, augmentation on)")
    store = data.SliceStore(cached, context=1)
    x, y = next(iter(data.training_dataset(store, data.Sampling("segment", image_size=args.size),
                                           batch_size=args.batch, seed=0)))
    for precision, jit in (("float32", False), ("float32", True), ("mixed_bfloat16", False)):
        keras.mixed_precision.set_global_policy(precision)
        model = build_model("unet")
        model.compile(optimizer="adam", loss=DiceBCELoss(), jit_compile=jit)
        try:
            model.train_on_batch(x, y)
            t = time.perf_counter()
            for _ in range(args.steps):
                loss = model.train_on_batch(x, y)
            rate = args.steps / (time.perf_counter() - t)
            print(f"unet train step {precision} jit={jit}: {rate:.2f} batches/s "
                  f"({rate * args.batch:.1f} slices/s), loss {float(loss):.3f}")
        except Exception as exc:  # report, keep measuring the others
            print(f"unet train step {precision} jit={jit}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
        keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("float32")
    del tf


if __name__ == "__main__":
    main()
