"""RUN folders and cohorts shared by the inference tests (predict, gradcam, export).

Building a RUN costs tens of seconds on a small CPU, so :func:`shared_runs` builds them
once per pytest process under the session's base temp folder and every test module reuses
them (read-only: tests write their outputs elsewhere).

* the segmenter RUN comes from the real :func:`bonemets_tf.train.train` (UNet, width 0.25,
  one step), so the RUN format is exactly what ``train`` writes;
* the detector RUN is an untrained registry ResNet34 (width 0.25, image size 96, so the
  last feature map is 3 x 3 and Grad-CAM maps are not trivially constant) saved the way
  ``train`` saves it: ``model.keras`` plus ``config.json`` whose ``settings`` are a real
  :class:`~bonemets_tf.train.TrainConfig`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from analysis.cohort.layout import Cohort, write_dataset_json
from analysis.imaging.io import Geometry, write_array, write_mask
from tests.tf.conftest import make_cohort


@dataclass(frozen=True)
class Runs:
    train_dataset: Path
    oblique_dataset: Path
    segmenter: Path
    detector: Path


def oblique_geometry(shape_zyx=(5, 21, 27)) -> Geometry:
    """Anisotropic spacing, non-zero origin and a direction rotated 30 degrees about z with
    the z axis flipped (a non-identity, non-diagonal direction)."""
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    z, y, x = shape_zyx
    return Geometry(size=(x, y, z), spacing=(0.7, 0.9, 2.5), origin=(-12.5, 30.0, 101.0),
                    direction=(c, -s, 0.0, s, c, 0.0, 0.0, 0.0, -1.0))


def write_oblique_cohort(root: Path, *, cases: int = 2, shape=(5, 21, 27), seed: int = 3) -> Path:
    """Cases with :func:`oblique_geometry` and rows/cols that are not multiples of 8."""
    rng = np.random.default_rng(seed)
    geometry = oblique_geometry(shape)
    cohort = Cohort(root)
    for i in range(cases):
        ct = rng.integers(-1000, 1500, shape).astype(np.int16)
        mask = np.zeros(shape, np.uint8)
        mask[1:3, 5:10, 6:12] = 1
        ct[mask > 0] = 900
        write_array(ct, geometry, cohort.image_path(f"obl_{i:02d}"))
        write_mask(mask, geometry, cohort.label_path(f"obl_{i:02d}"))
    write_dataset_json(root, cases)
    return root


def _detector_run(path: Path, dataset: Path) -> Path:
    import keras

    from bonemets_tf.models.registry import build_model
    from bonemets_tf.train import TrainConfig

    config = TrainConfig(dataset=str(dataset), task="detect", arch="resnet34", width=0.25, image_size=96,
                         epochs=1, steps_per_epoch=1)
    keras.utils.set_random_seed(0)
    model = build_model(config.arch, context=config.context, width=config.width, image_size=config.image_size)
    path.mkdir(parents=True)
    model.save(path / "model.keras")
    (path / "config.json").write_text(json.dumps({"settings": asdict(config), "orientation": "LPS"}, indent=2), encoding="utf-8")
    return path


def _segmenter_run(path: Path, dataset: Path, cache: Path) -> Path:
    from bonemets_tf.train import TrainConfig, train

    # one step is not meant to learn: the inference tests need a RUN, not a trained model
    config = TrainConfig(dataset=str(dataset), task="segment", arch="unet", width=0.25, image_size=32, epochs=1,
                         steps_per_epoch=1, batch_size=2, val_max_slices=2, context=3, guard=False)
    return train(config, path, cache_dir=cache)


def shared_runs(tmp_path_factory) -> Runs:
    """Build (once per process) and return the shared cohorts and RUN folders."""
    base = tmp_path_factory.getbasetemp() / "infer_runs"
    runs = Runs(train_dataset=base / "train_ds", oblique_dataset=base / "oblique_ds",
                segmenter=base / "run_unet", detector=base / "run_resnet34")
    if (base / "done").is_file():
        return runs
    base.mkdir(exist_ok=True)
    make_cohort(runs.train_dataset)
    write_oblique_cohort(runs.oblique_dataset)
    _segmenter_run(runs.segmenter, runs.train_dataset, base / "cache")
    _detector_run(runs.detector, runs.train_dataset)
    (base / "done").write_text("ok", encoding="utf-8")
    return runs
