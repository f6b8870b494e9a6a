"""Training writes a complete RUN folder and resumes where it stopped."""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from click.testing import CliRunner  # noqa: E402

import cli  # noqa: E402
from analysis.errors import InputError  # noqa: E402
from bonemets_tf.train import TrainConfig, train  # noqa: E402


def _config(dataset: Path, **kw) -> TrainConfig:
    # two steps do not teach a model: these tests check the RUN mechanics, not learning (the
    # guard would rightly stop a two-epoch run whose validation stays empty; see test_guard.py)
    base = dict(dataset=str(dataset), task="segment", arch="unet", epochs=1, steps_per_epoch=2, batch_size=2,
                image_size=32, width=0.25, seed=3, deterministic=True, guard=False)
    return TrainConfig(**{**base, **kw})


def _history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_cli_one_epoch_writes_every_artefact(cohort_dir, tmp_path):
    run = tmp_path / "RUN"
    args = ["train", "--dataset", str(cohort_dir), "--task", "segment", "--arch", "unet", "--out", str(run),
            "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--image-size", "32",
            "--width", "0.25", "--cache", str(tmp_path / "cache")]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    assert (run / "model.keras").is_file() and (run / "checkpoints" / "epoch-0001.weights.h5").is_file()
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert config["settings"]["arch"] == "unet" and config["settings"]["seed"] == 0
    assert config["split"]["test"] == ["case_04"] and "case_04" not in config["split"]["train"] + config["split"]["val"]
    assert set(config["versions"]) >= {"tensorflow", "keras", "numpy"} and len(config["dataset_fingerprint"]) == 16
    rows = _history(run)
    assert [r["epoch"] for r in rows] == ["1"] and {"loss", "val_loss", "val_dice"} <= set(rows[0])
    model = keras.models.load_model(run / "model.keras")
    assert model(np.zeros((1, 40, 48, 1), np.float32)).shape == (1, 40, 48, 1)
    assert config["model"]["params"] == model.count_params()
    assert config["settings"]["bn_momentum"] == 0.9
    assert {layer.momentum for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)} == {0.9}
    # an existing run is never overwritten silently
    again = CliRunner().invoke(cli.main, args)
    assert again.exit_code == 2 and "--resume" in again.output


def test_resume_equals_uninterrupted_run(cohort_dir, tmp_path):
    cache = tmp_path / "cache"
    straight = train(_config(cohort_dir, epochs=2), tmp_path / "A", cache_dir=cache)
    first = train(_config(cohort_dir, epochs=1), tmp_path / "B", cache_dir=cache)
    saved_epoch1 = _history(first)
    train(_config(cohort_dir, epochs=2), tmp_path / "B", cache_dir=cache, resume=True)
    resumed = _history(tmp_path / "B")
    assert [r["epoch"] for r in resumed] == ["1", "2"]
    assert resumed[0] == saved_epoch1[0]  # epoch 1 kept, not retrained
    # epoch 2 started from the saved weights, optimizer state and data stream
    for key in ("loss", "val_loss"):
        assert float(resumed[1][key]) == pytest.approx(float(_history(straight)[1][key]), rel=1e-4)
    assert json.loads((tmp_path / "B" / "config.json").read_text(encoding="utf-8"))["settings"]["epochs"] == 2


def test_resume_refuses_changed_settings(cohort_dir, tmp_path):
    cache = tmp_path / "cache"
    train(_config(cohort_dir), tmp_path / "R", cache_dir=cache)
    with pytest.raises(InputError, match="width"):
        train(replace(_config(cohort_dir, epochs=2), width=0.5), tmp_path / "R", cache_dir=cache, resume=True)


def test_task_must_match_arch(cohort_dir, tmp_path):
    with pytest.raises(InputError, match="unet is a segment model"):
        train(_config(cohort_dir, task="detect"), tmp_path / "X")
    assert not (tmp_path / "X").exists()


def test_cosine_schedule_decays_to_one_percent_and_is_recorded(cohort_dir, tmp_path):
    from bonemets_tf.train import _learning_rate

    config = _config(cohort_dir, epochs=2, steps_per_epoch=5, lr=1e-3, lr_schedule="cosine", warmup_steps=0)
    schedule = _learning_rate(config)
    assert float(schedule(0)) == pytest.approx(1e-3)
    assert float(schedule(5)) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5), rel=1e-4)  # half-way
    assert float(schedule(10)) == pytest.approx(1e-5, rel=1e-4)  # the end of training: 1% of lr
    assert _learning_rate(replace(config, lr_schedule="constant")) == 1e-3
    # the default warm-up: 10% of all steps (at most one epoch), linear from lr / warm-up steps
    warm = replace(config, warmup_steps=None)
    assert warm.warmup == 1 and replace(config, epochs=50, warmup_steps=None).warmup == 5
    assert float(_learning_rate(replace(warm, epochs=20))(0)) == pytest.approx(1e-3 / 5 * (0.01 + 0.99), rel=1e-4)
    with pytest.raises(InputError, match="--lr-schedule step"):
        replace(config, lr_schedule="step").check()
    run = train(replace(config, epochs=1, steps_per_epoch=2), tmp_path / "RUN", cache_dir=tmp_path / "cache")
    saved = json.loads((run / "config.json").read_text(encoding="utf-8"))["settings"]
    assert saved["lr_schedule"] == "cosine"
    with pytest.raises(InputError, match="lr_schedule"):  # resuming under another schedule is refused
        train(replace(config, epochs=2, steps_per_epoch=2, lr_schedule="constant"), run,
              cache_dir=tmp_path / "cache", resume=True)


def test_eager_steps_compute_what_traced_steps_compute(cohort_dir, tmp_path):
    cache = tmp_path / "cache"
    traced = train(_config(cohort_dir), tmp_path / "G", cache_dir=cache)
    eager = train(_config(cohort_dir, run_eagerly=True), tmp_path / "E", cache_dir=cache)
    for key in ("loss", "val_loss", "val_dice"):
        assert float(_history(eager)[0][key]) == pytest.approx(float(_history(traced)[0][key]), rel=1e-3, abs=1e-6)
    saved = json.loads((eager / "config.json").read_text(encoding="utf-8"))
    assert saved["settings"]["run_eagerly"] is True and saved["runtime"]["jit_compile"] is False
    assert (eager / "calibration.json").is_file()
    with pytest.raises(InputError, match="--run-eagerly and --jit"):
        _config(cohort_dir, run_eagerly=True, jit=True).check()
