"""The collapse guard of training (``TrainConfig.guard``, on by default; issue #16).

At each epoch end an epoch is *collapsed* when the model's calls on that epoch's training
batches *became* constant (share of outputs >= 0.5, the ``pos_frac`` metric, <= 1e-6 or
>= 1 - 1e-6, after an earlier epoch where they were not: a segmenter started at the lesion
prior calls nothing at first), or when validation has fallen back to its empty-prediction
level (:data:`EMPTY_LEVEL` + :data:`EMPTY_MARGIN`) for :data:`GUARD_PATIENCE` epochs in a row
after a good epoch. A model whose validation has not yet left that level is left alone:
EfficientNet-B0 at the demo budget read validation AUC 0.486 and 0.502 in its first two epochs
while its training AUC rose, and restoring its initial weights there (the first version of
this rule) only threw away half of its four epochs. Then train restores the weights and
optimizer state of the last *good* epoch (not collapsed, validation above that level; the
initial weights when there is none), multiplies the learning-rate curve by
:data:`GUARD_LR_FACTOR` and goes on with the next epoch (the data stream continues, it is not
replayed). Each event is a row of ``config.json["guard"]["events"]`` (``epoch``, ``reason``,
``restored_epoch``, ``lr_scale``) and the ``guard_event``/``lr_scale`` columns of
``history.csv``. After :data:`GUARD_MAX_EVENTS` events, or when the guard acted and training
still ends with a model that did not learn (:func:`bonemets_tf.run.learned`: validation never
more than :data:`~bonemets_tf.run.LEARNED_MARGIN` above the empty level, Dice 0.05, AUC 0.55),
train raises :class:`bonemets_tf.train.TrainingFailed` (one line, exit code 3 from the CLI) and
removes ``model.keras``, so no model that predicts nothing is left to ``predict``;
``config.json["guard"]["outcome"]`` is ``"ok"``, ``"recovered"`` or ``"failed"``. A run too
short for the guard to act (one epoch: the patience is two) ends normally;
:func:`bonemets_tf.run.training_status` then says whether it learned. When the validation
cases hold no lesion (issue #31) there is no validation level to judge: only the
constant-calls rule acts, every other epoch is good, and nothing is judged learned or not.

This module holds the rule and its record; :class:`bonemets_tf.checkpoint.RunCheckpoint`
applies it at each epoch end and :mod:`bonemets_tf.train` restores and restarts. It imports
no TensorFlow.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from analysis.imaging.io import atomic_write_json, read_json
from bonemets_tf.run import CONFIG_FILE, EMPTY_LEVEL, EMPTY_MARGIN, LEARNED_MARGIN

#: A training epoch whose share of positive calls is within this of 0 or 1 is constant.
CONSTANT_EPS = 1e-6
#: Epochs in a row at the empty level before the guard acts.
GUARD_PATIENCE = 2
#: Factor on the learning rate at each guard event.
GUARD_LR_FACTOR = 0.5
#: Guard events after which training fails.
GUARD_MAX_EVENTS = 3


class CollapseGuard:
    """The collapse rule of the module docstring, applied to one epoch's logs.

    Args:
        task: ``"detect"`` or ``"segment"``.
        monitor: validation key (``val_dice``/``val_auc``), or None: validation holds no
            lesion, so it has no empty level (only the constant-calls rule acts).
    """

    def __init__(self, task: str, monitor: str | None) -> None:
        self.task, self.monitor = task, monitor
        self.empty = EMPTY_LEVEL[task] + EMPTY_MARGIN[task]

    def val_empty(self, logs: dict[str, float]) -> bool:
        """Validation at (or below) the empty-prediction level, or not finite (never without a monitor)."""
        if self.monitor is None:
            return False
        value = logs.get(self.monitor, float("nan"))
        return not (math.isfinite(value) and value > self.empty)

    def constant(self, logs: dict[str, float]) -> str | None:
        """How an epoch's training calls were constant, or None."""
        frac = logs.get("pos_frac", float("nan"))
        if math.isfinite(frac) and frac <= CONSTANT_EPS:
            return "training calls all background"
        if math.isfinite(frac) and frac >= 1.0 - CONSTANT_EPS:
            return "training calls all lesion"
        return None

    def check(self, logs: dict[str, float], empty_run: int, varied: bool = True, good: bool = True) -> str | None:
        """The reason for an event after an epoch with ``logs`` (``empty_run``: epochs in a
        row, this one included, with validation at the empty level; ``varied``: an earlier
        epoch's training calls were not constant; ``good``: an earlier epoch was good), or None."""
        constant = self.constant(logs)
        if constant is not None and varied:
            return constant
        if empty_run >= GUARD_PATIENCE and good:
            return f"validation {self.monitor[4:]} back at its empty level for {empty_run} epochs"
        return None


def write_guard(run: Path, events: list[dict[str, Any]], lr_scale: float, outcome: str) -> None:
    """Write the guard's record to ``config.json["guard"]``: the rule, the events, the final
    learning-rate factor and the outcome (``"ok"``, ``"recovered"`` or ``"failed"``).

    Args:
        run: RUN folder; a folder without ``config.json`` (a non-chief worker's scratch
            folder) is left alone.
        events: one dict per event (``epoch``, ``reason``, ``restored_epoch``, ``lr_scale``).
        lr_scale: the factor on the learning-rate curve at the end.
        outcome: how training ended.
    """
    config_path = run / CONFIG_FILE
    if not config_path.is_file():
        return
    saved = read_json(config_path, what="run config")
    guard = {"rule": {"constant_eps": CONSTANT_EPS, "empty_level": EMPTY_LEVEL, "empty_margin": EMPTY_MARGIN,
                      "learned_margin": LEARNED_MARGIN,
                      "patience": GUARD_PATIENCE, "lr_factor": GUARD_LR_FACTOR, "max_events": GUARD_MAX_EVENTS},
             "events": events, "lr_scale": lr_scale, "outcome": outcome}
    atomic_write_json(config_path, {**saved, "guard": guard})
