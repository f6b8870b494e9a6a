"""Inference throughput of the six Keras models, and SavedModel vs Keras agreement.

Not a test: a measurement for the closing note of the inference issue. Each registered
model is built at full width (random init; speed does not depend on the weights), warmed
up, then timed through the project's inference engine (:mod:`bonemets_tf.inference`, the
batching loop ``predict`` uses) over a volume of ``--slices`` slices of 128 x 128 in batches
of ``--batch``. Detectors are built with ``image_size`` 128, so they see 128 x 128 too.
With ``--savedmodel`` each model is also exported through :func:`bonemets_tf.export`
(from a RUN-like folder) and the maximum absolute difference between the SavedModel's
``serving_default`` and the Keras model on random HU slices is reported.

Usage: python benchmarks/bench_infer_tf.py [--slices 64] [--batch 16] [--size 128] [--savedmodel]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--savedmodel", action="store_true")
    parser.add_argument("--models", default=None, help="comma-separated subset")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from bonemets_tf.export import export_savedmodel
    from bonemets_tf.inference import Predictor, slice_probabilities
    from bonemets_tf.models.registry import REGISTRY, build_model
    from bonemets_tf.run import read_run
    from bonemets_tf.train import TrainConfig

    rng = np.random.default_rng(0)
    volume = rng.uniform(-1000, 1500, (args.slices, args.size, args.size)).astype(np.float32)
    names = args.models.split(",") if args.models else list(REGISTRY)
    results = []
    for name in names:
        keras.utils.set_random_seed(0)
        model = build_model(name, width=1.0, image_size=args.size)
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            run.mkdir()
            model.save(run / "model.keras")
            config = TrainConfig(dataset=tmp, task=REGISTRY[name].task, arch=name, image_size=args.size)
            (run / "config.json").write_text(json.dumps({"settings": asdict(config), "orientation": "LPS"}), encoding="utf-8")
            predictor = Predictor(read_run(run), model=model)
            slice_probabilities(predictor, volume, np.arange(args.batch), args.batch)  # warm-up (tracing)
            start = time.perf_counter()
            slice_probabilities(predictor, volume, np.arange(args.slices), args.batch)
            seconds = time.perf_counter() - start
            row = {"model": name, "task": REGISTRY[name].task, "params": model.count_params(),
                   "slices_per_s": round(args.slices / seconds, 2)}
            if args.savedmodel:
                sm = export_savedmodel(run, Path(tmp) / "sm")
                fn = tf.saved_model.load(str(sm)).signatures["serving_default"]
                probe = rng.uniform(-1000, 1500, (4, 100, 116, 1)).astype(np.float32)
                got = fn(ct_hu=tf.constant(probe))["lesion_probability"].numpy()
                want = model(probe, training=False).numpy()
                want = want[:, 0] if REGISTRY[name].task == "detect" else want[..., 0]
                row["savedmodel_max_abs_diff"] = float(np.abs(got - want).max())
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"tensorflow {tf.__version__}, keras {keras.__version__}, {args.slices} slices "
          f"{args.size}x{args.size}, batch {args.batch}, CPU threads {tf.config.threading.get_intra_op_parallelism_threads() or 'default'}")


if __name__ == "__main__":
    main()
