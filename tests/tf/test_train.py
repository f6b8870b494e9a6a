"""Training writes a complete RUN folder and resumes where it stopped."""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from click.testing import CliRunner  # noqa: E402

import cli  # noqa: E402
from analysis.cohort.layout import Cohort  # noqa: E402
from analysis.errors import InputError  # noqa: E402
from analysis.imaging.io import read_array, write_mask  # noqa: E402
from bonemets_tf.checkpoint import RunCheckpoint  # noqa: E402
from bonemets_tf.run import read_run, training_status  # noqa: E402
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


def test_config_round_trips_through_its_dict():
    config = TrainConfig(dataset="/data/cohort", task="detect", arch="resnet34", fold=2, epochs=7, steps_per_epoch=11,
                         batch_size=4, image_size=96, width=0.5, context=3, lr=3e-4, seed=5, jit=False,
                         precision="mixed_bfloat16", strategy="mirrored", deterministic=True, positive_fraction=0.3,
                         lesion_crop_p=0.2, val_max_slices=40, weights="w.h5", bn_momentum=None,
                         lr_schedule="cosine", run_eagerly=True, warmup_steps=0, clip_norm=None, prior_bias=False,
                         logit_loss=False, batch_dice=False, guard=False, rank_auc=False)
    saved = json.loads(json.dumps(config.get_config()))  # what config.json holds
    assert TrainConfig.from_config(saved) == config
    assert saved == {f: getattr(config, f) for f in TrainConfig.__dataclass_fields__}
    with pytest.raises(InputError, match=r"^old/config.json settings: lack rank_auc and have unknown store; "):
        TrainConfig.from_config({**{k: v for k, v in saved.items() if k != "rank_auc"}, "store": "auto"},
                                source="old/config.json settings")


def test_resume_refuses_changed_settings(cohort_dir, tmp_path):
    cache, run = tmp_path / "cache", tmp_path / "R"
    train(_config(cohort_dir), run, cache_dir=cache)
    with pytest.raises(InputError) as refused:
        train(replace(_config(cohort_dir, epochs=2), width=0.5, lr_schedule="cosine"), run, cache_dir=cache,
              resume=True)
    assert str(refused.value) == (f"--resume {run}: settings differ from the saved run: width, lr_schedule; "
                                  f"repeat the original command (only --epochs may change)")
    # settings written by another version (a field it lacks) are refused too, in one line
    config_path = run / "config.json"
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    del saved["settings"]["rank_auc"]
    config_path.write_text(json.dumps(saved), encoding="utf-8")
    with pytest.raises(InputError, match="settings: lack rank_auc;") as refused:
        train(_config(cohort_dir, epochs=2), run, cache_dir=cache, resume=True)
    assert "\n" not in str(refused.value) and str(refused.value).startswith(f"--resume {run}: {config_path}")
    assert [r["epoch"] for r in _history(run)] == ["1"]  # nothing was trained


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


def test_validation_without_lesion_keeps_the_last_epoch_and_says_so(cohort_dir, tmp_path, monkeypatch, caplog):
    """Issue #31: fold 0 validates on case_00 alone; without its lesions, validation Dice reads 1 for
    a model that predicts nothing, so the old rule kept epoch 1 (at the lesion prior) for good."""
    cohort = Cohort(cohort_dir)
    mask, geometry = read_array(cohort.label_path("case_00"))
    write_mask(np.zeros_like(mask), geometry, cohort.label_path("case_00"))
    seen = {}
    on_epoch_end = RunCheckpoint.on_epoch_end

    def spy(self, epoch, logs=None):
        on_epoch_end(self, epoch, logs)
        seen[epoch + 1] = [w.copy() for w in self.inference.get_weights()]

    monkeypatch.setattr(RunCheckpoint, "on_epoch_end", spy)
    with caplog.at_level(logging.WARNING, logger="bonemets_tf"):
        run = train(_config(cohort_dir, epochs=3, guard=True), tmp_path / "RUN", cache_dir=tmp_path / "cache")
    said = [r.getMessage() for r in caplog.records if "hold no lesion voxel" in r.getMessage()]
    assert len(said) == 1 and "validation case(s) case_00" in said[0] and "last epoch" in said[0]
    record = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert record["split"]["val"] == ["case_00"]
    checkpoint = record["checkpoint"]
    assert {k: checkpoint[k] for k in ("monitor", "mode", "epoch", "value")} == \
        {"monitor": None, "mode": "last", "epoch": 3, "value": None}
    assert "no lesion voxel" in checkpoint["reason"] and record["guard"]["outcome"] == "ok"
    assert [r["epoch"] for r in _history(run)] == ["1", "2", "3"]
    kept = keras.models.load_model(run / "model.keras").get_weights()
    for a, b in zip(kept, seen[3]):
        np.testing.assert_array_equal(a, b)  # the last epoch's model
    assert any(not np.array_equal(a, b) for a, b in zip(kept, seen[1]))  # not the first epoch's
    calibration = json.loads((run / "calibration.json").read_text(encoding="utf-8"))
    assert calibration["n_slices"] == 0 and calibration["threshold"] == 0.5 and calibration["dice"] is None
    status = training_status(read_run(run))
    assert status["learned"] is None and status["reason"].startswith("unknown")
