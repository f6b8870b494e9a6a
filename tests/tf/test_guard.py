"""The collapse guard, the robust defaults and training_status (issue #16)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from click.testing import CliRunner  # noqa: E402

import cli  # noqa: E402
from analysis.evaluation import learned as learned_mod  # noqa: E402
from analysis.imaging.orientation import CANONICAL  # noqa: E402
from bonemets_tf import guard as guard_mod  # noqa: E402
from bonemets_tf import run as run_mod  # noqa: E402
from bonemets_tf.checkpoint import CheckpointRule, RunCheckpoint, RunState  # noqa: E402
from bonemets_tf.guard import CollapseGuard  # noqa: E402
from bonemets_tf.losses import DiceBCELoss, PositiveFraction, WarmupSchedule, WeightedBCELoss  # noqa: E402
from bonemets_tf.run import learned, read_run, training_status  # noqa: E402
from bonemets_tf.train import TrainConfig, train  # noqa: E402


def _config(dataset: Path, **kw) -> TrainConfig:
    base = dict(dataset=str(dataset), task="segment", arch="unet", epochs=3, steps_per_epoch=2, batch_size=2,
                image_size=32, width=0.25, seed=3, deterministic=True)
    return TrainConfig(**{**base, **kw})


def _history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _guard(run: Path) -> dict:
    return json.loads((run / "config.json").read_text(encoding="utf-8"))["guard"]


def test_huge_learning_rate_ends_in_one_clear_failure_without_a_model(cohort_dir, tmp_path):
    run = tmp_path / "RUN"
    args = ["train", "--dataset", str(cohort_dir), "--task", "segment", "--arch", "unet", "--out", str(run),
            "--epochs", "6", "--steps-per-epoch", "2", "--batch-size", "2", "--image-size", "32",
            "--width", "0.25", "--lr", "1000", "--cache", str(tmp_path / "cache")]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 3, result.output
    message = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "did not learn" in message[0] and "--lr" in message[0]
    assert not (run / "model.keras").exists()  # no model that predicts nothing is left to predict
    guard = _guard(run)
    assert guard["outcome"] == "failed" and guard["events"]
    for event in guard["events"]:
        assert set(event) == {"epoch", "reason", "restored_epoch", "lr_scale"}
    # each event halves the rate and is a history row
    assert [e["lr_scale"] for e in guard["events"]] == [0.5 ** (i + 1) for i in range(len(guard["events"]))]
    rows = _history(run)
    assert sum(float(r["guard_event"]) for r in rows) == len(guard["events"])


def test_guard_restores_the_last_good_epoch_and_lowers_the_rate(cohort_dir, tmp_path, monkeypatch):
    """A collapse forced at epoch 2 (rule patched): epoch 3 starts from epoch 1's weights at half the rate."""
    seen = {}

    def check(self, logs, empty_run, varied=True, good=True):
        return "forced" if logs.get("epoch_marker") == 2 else None

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        logs["epoch_marker"] = epoch + 1
        seen[epoch + 1] = [w.copy() for w in self.model.get_weights()]
        return checkpoint(self, epoch, logs)

    checkpoint = RunCheckpoint.on_epoch_end
    monkeypatch.setattr(CollapseGuard, "check", check)
    monkeypatch.setattr(RunCheckpoint, "on_epoch_end", on_epoch_end)
    restored = {}
    restore_good = RunState.restore_good

    def spy(self, model):
        restore_good(self, model)
        restored["weights"] = [w.copy() for w in model.get_weights()]

    monkeypatch.setattr(RunState, "restore_good", spy)
    for module in (guard_mod, run_mod, learned_mod):  # every epoch is "good", and the model learned
        monkeypatch.setattr(module, "EMPTY_LEVEL", {"segment": -1.0, "detect": -1.0})
    run = train(_config(cohort_dir, epochs=3, lr=1e-3), tmp_path / "RUN", cache_dir=tmp_path / "cache")
    guard = _guard(run)
    assert guard["outcome"] == "recovered" and guard["lr_scale"] == 0.5
    assert guard["events"] == [{"epoch": 2, "reason": "forced", "restored_epoch": 1, "lr_scale": 0.5}]
    for a, b in zip(restored["weights"], seen[1]):
        np.testing.assert_array_equal(a, b)  # epoch 1's weights, not epoch 2's
    rows = _history(run)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert [float(r["lr_scale"]) for r in rows] == [1.0, 1.0, 0.5]
    assert [float(r["guard_event"]) for r in rows] == [0.0, 1.0, 0.0]
    assert training_status(read_run(run))["guard_events"] == 1


def test_guard_rule_golden():
    g = CollapseGuard("segment", "val_dice")
    assert g.check({"pos_frac": 0.0, "val_dice": 0.5}, 0) == "training calls all background"
    assert g.check({"pos_frac": 1.0, "val_dice": 0.5}, 0) == "training calls all lesion"
    assert g.check({"pos_frac": 0.0, "val_dice": 0.0}, 1, varied=False) is None  # still at the prior
    assert g.check({"pos_frac": 0.01, "val_dice": 0.0}, 1) is None  # one empty validation epoch is allowed
    assert "back at its empty level for 2 epochs" in g.check({"pos_frac": 0.01, "val_dice": 0.0}, 2)
    assert g.check({"pos_frac": 0.01, "val_dice": 0.0}, 2, good=False) is None  # not learning yet: left alone
    assert g.val_empty({"val_dice": 0.005}) and not g.val_empty({"val_dice": 0.02})
    assert g.val_empty({"val_dice": float("nan")})
    d = CollapseGuard("detect", "val_auc")
    assert d.val_empty({"val_auc": 0.51}) and not d.val_empty({"val_auc": 0.6})
    # validation without lesion (issue #31): no empty level; only the constant-calls rule acts
    n = CollapseGuard("segment", None)
    assert not n.val_empty({"val_dice": 1.0}) and not n.val_empty({"val_dice": 0.0}) and not n.val_empty({})
    assert n.check({"pos_frac": 0.0, "val_dice": 1.0}, 0) == "training calls all background"
    assert n.check({"pos_frac": 0.01, "val_dice": 0.0}, 0) is None


def test_checkpoint_rule_golden():
    best = CheckpointRule.for_validation("segment", True)
    assert (best.monitor, best.record()["mode"]) == ("val_dice", "max")
    assert CheckpointRule.for_validation("detect", True).monitor == "val_auc"
    assert best.improved(0.1, None, None, guard_event=False)  # the first epoch
    assert best.improved(float("nan"), None, None, guard_event=False)
    assert best.improved(0.3, 0.2, 1, guard_event=True) and not best.improved(0.2, 0.2, 1, guard_event=False)
    assert not best.improved(float("nan"), 0.2, 1, guard_event=False)
    assert best.improved(0.0, float("-inf"), 1, guard_event=False)
    last = CheckpointRule.for_validation("detect", False)
    assert last.record() == {"monitor": None, "mode": "last", "reason": last.reason} and "no lesion" in last.reason
    assert last.improved(float("nan"), None, None, guard_event=False)
    assert last.improved(float("nan"), None, 5, guard_event=False)  # every later epoch replaces it
    assert not last.improved(float("nan"), None, 5, guard_event=True)  # but never one where the guard acted


def test_learned_is_the_one_rule_golden():
    assert not learned("segment", None) and not learned("detect", None)  # nothing recorded
    assert not learned("segment", 0.05) and learned("segment", 0.0501)  # Dice 0 + 0.05
    assert not learned("detect", 0.55) and learned("detect", 0.5501)  # AUC 0.5 + 0.05
    assert not learned("segment", float("-inf")) and not learned("segment", float("nan"))
    from benchmarks.robustness import collapsed

    # the benchmark's "collapsed" is the same rule (it once used a Dice floor of 0.01)
    assert collapsed({"arch": "unet", "best_val": 0.03}) and not collapsed({"arch": "unet", "best_val": 0.06})
    assert collapsed({"arch": "resnet34", "best_val": 0.55}) and collapsed({"arch": "unet", "best_val": 0.9,
                                                                              "failure": "TrainingFailed: ..."})


def test_logit_losses_equal_probability_losses_where_both_are_defined_and_keep_a_gradient():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (3, 4, 4, 1)).astype(np.float32)
    t = (rng.random((3, 4, 4, 1)) < 0.3).astype(np.float32)
    p = 1 / (1 + np.exp(-z))
    for batch_dice in (False, True):
        a = float(DiceBCELoss(from_logits=True, batch_dice=batch_dice)(t, z))
        b = float(DiceBCELoss(batch_dice=batch_dice)(t, p))
        assert a == pytest.approx(b, rel=1e-4)
    assert float(WeightedBCELoss(3.0, from_logits=True)(t[:, 0, 0], z[:, 0, 0])) == \
        pytest.approx(float(WeightedBCELoss(3.0)(t[:, 0, 0], p[:, 0, 0])), rel=1e-4)
    # a model that predicts nothing with certainty (logit -30 at a lesion pixel): the clipped
    # probability loss has no gradient left, the logit loss still pulls the logit up
    dead = tf.Variable(np.full((1, 2, 2, 1), -30.0, np.float32))
    lesion = np.ones((1, 2, 2, 1), np.float32)
    for from_logits, alive in ((False, False), (True, True)):
        with tf.GradientTape() as tape:
            out = dead if from_logits else tf.sigmoid(dead)
            loss = DiceBCELoss(from_logits=from_logits)(lesion, out)
        grad = float(tf.reduce_sum(tf.abs(tape.gradient(loss, dead))))
        assert (grad > 1e-3) == alive, (from_logits, grad)


def test_batch_dice_does_not_reward_empty_predictions_of_empty_crops():
    t = np.zeros((2, 8, 8, 1), np.float32)
    t[0, 2:6, 2:6] = 1  # one crop with lesion, one without
    empty = np.full_like(t, -20.0)
    per_sample = float(DiceBCELoss(from_logits=True)(t, empty))
    batch = float(DiceBCELoss(from_logits=True, batch_dice=True)(t, empty))
    bce = 16 / 64 * 20 / 2  # mean over the batch of each crop's mean pixel BCE
    assert per_sample == pytest.approx(bce + (1 - 1 / 17) / 2, rel=1e-4)  # the empty crop scores Dice 1
    assert batch == pytest.approx(bce + 1 - 1 / 17, rel=1e-4)  # smooth 1 over 16 lesion pixels


def test_positive_fraction_and_warmup_schedule_golden():
    m = PositiveFraction(from_logits=True)
    m.update_state(None, np.array([[-1.0], [0.0], [2.0], [-3.0]], np.float32))
    assert float(m.result()) == pytest.approx(0.5)
    s = WarmupSchedule(1e-3, decay_steps=10, alpha=0.01, warmup_steps=4, scale=0.5)
    assert float(s(0)) == pytest.approx(0.5 * 1e-3 * (0.01 + 0.99 * 0.5 * (1 + 1)) / 4, rel=1e-5)
    assert float(s(5)) == pytest.approx(0.5 * 1e-3 * (0.01 + 0.99 * 0.5), rel=1e-5)
    assert float(s(10)) == pytest.approx(0.5 * 1e-5, rel=1e-4)
    again = WarmupSchedule.from_config(s.get_config())
    assert float(again(7)) == pytest.approx(float(s(7)))


def test_prior_bias_starts_the_segmenter_at_the_lesion_prior(cohort_dir, tmp_path):
    run = train(_config(cohort_dir, epochs=1, steps_per_epoch=1, lr=1e-12, guard=False), tmp_path / "RUN",
                cache_dir=tmp_path / "cache")
    bias = float(keras.models.load_model(run / "model.keras").get_layer("logit").get_weights()[1][0])
    prior = 1 / (1 + math.exp(-bias))
    # lesions cover 30 of 32x32 crop pixels where the crop holds them; the prior is the
    # share over the first training batches, a few percent
    assert 0.001 < prior < 0.1
    saved = json.loads((run / "config.json").read_text(encoding="utf-8"))["settings"]
    assert saved["prior_bias"] and saved["logit_loss"] and saved["batch_dice"] and saved["clip_norm"] == 1.0


def test_training_status_flags_a_model_that_did_not_learn(tmp_path):
    run = tmp_path / "RUN"
    run.mkdir()
    (run / "model.keras").write_bytes(b"")
    (run / "config.json").write_text(json.dumps({"settings": {"arch": "resunet", "task": "segment", "context": 1,
                                                              "image_size": 64}, "orientation": CANONICAL}),
                                     encoding="utf-8")
    assert training_status(read_run(run)) == {"learned": None, "reason": training_status(read_run(run))["reason"],
                                              "best_val": None, "empty_level": 0.0, "guard_events": 0}
    (run / "history.csv").write_text("epoch,dice,val_dice\n1,0.18,0.0\n2,0.49,0.0\n3,0.0,0.004\n", encoding="utf-8")
    status = training_status(read_run(run))
    assert status["learned"] is False and status["best_val"] == pytest.approx(0.004)
    assert status["reason"].startswith("did not learn")
    (run / "history.csv").write_text("epoch,val_dice\n1,0.0\n2,0.35\n", encoding="utf-8")
    assert training_status(read_run(run))["learned"] is True
    # validation without lesion: Dice 1 of an empty prediction says nothing (issue #31)
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    config["checkpoint"] = {"monitor": None, "mode": "last", "reason": "...", "epoch": 2, "value": None}
    (run / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (run / "history.csv").write_text("epoch,val_dice\n1,1.0\n2,1.0\n", encoding="utf-8")
    status = training_status(read_run(run))
    assert status["learned"] is None and status["best_val"] is None and "epoch 2" in status["reason"]


def test_rank_auc_matches_the_rank_formula_where_keras_auc_reads_one_half():
    from analysis.evaluation.metrics.detection import roc_auc
    from bonemets_tf.losses import RankAUC

    rng = np.random.default_rng(1)
    y = rng.random(60) < 0.3
    p = (0.303 + 0.001 * rng.random(60) + 0.0005 * y).astype(np.float32)  # between two of its thresholds
    m = RankAUC(capacity=100)
    for part in (slice(0, 25), slice(25, 60)):
        m.update_state(y[part, None].astype(np.float32), p[part, None])
    assert float(m.result()) == pytest.approx(roc_auc(y, p), abs=1e-6)
    k = keras.metrics.AUC()
    k.update_state(y[:, None].astype(np.float32), p[:, None])
    assert float(k.result()) == pytest.approx(0.5)  # what the monitor read before
    m.reset_state()
    m.update_state(y[:, None].astype(np.float32), np.full((60, 1), 0.3, np.float32))
    assert float(m.result()) == pytest.approx(0.5)  # constant output: ties count one half
    small = RankAUC(capacity=30)
    small.update_state(y[:, None].astype(np.float32), p[:, None])
    assert float(small.result()) == pytest.approx(roc_auc(y[:30], p[:30]), abs=1e-6)  # the first 30 kept
