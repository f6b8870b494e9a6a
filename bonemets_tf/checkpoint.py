"""The checkpoint protocol of a RUN folder: what each epoch end writes, and in which order.

Each epoch end writes the weights file, then (if improved) ``best-NNNN.keras``, then
commits ``state.json`` atomically, then moves the best model to ``model.keras`` and
rewrites ``history.csv``. A process killed at any point (even SIGKILL) leaves a state
from which ``resume=True`` continues after the last committed epoch, with history and
best model consistent; the input pipeline continues its random stream (see
:mod:`bonemets_tf.data`) instead of replaying it.

Which epoch is "best" is a :class:`CheckpointRule`, recorded in ``config.json["checkpoint"]``
(issue #31): the highest validation Dice (segmenters) or AUC (detectors) when the validation
cases hold lesion, else the last epoch.

Importing this module imports Keras (:class:`RunCheckpoint` is a Keras callback).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import keras

from analysis.imaging.io import atomic_file, atomic_write_json, atomic_write_text, read_json
from analysis.imaging.records import csv_text
from bonemets_tf.guard import GUARD_LR_FACTOR, CollapseGuard
from bonemets_tf.run import CHECKPOINTS_DIR, CONFIG_FILE, HISTORY_FILE, MODEL_FILE, MONITOR, STATE_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointRule:
    """Which epoch's model becomes ``model.keras``.

    With lesion in the validation cases, the epoch of the highest ``monitor``
    (:data:`bonemets_tf.run.MONITOR`: ``val_dice``, ``val_auc``). Without any, neither is
    defined: Keras's pooled Dice reads 1 for a model that predicts nothing and 0 for any
    other, so the highest "Dice" is the emptiest model (the first epoch, at the lesion
    prior), and slice AUC needs a positive slice. Validation loss is no better: on slices
    without lesion it is lowest for the model that predicts least. Then the *last* epoch
    is kept (``monitor`` None), as nnU-Net predicts with its final checkpoint by default
    (Isensee et al., Nat. Methods 2021), except an epoch where the collapse guard acted,
    which is never kept.

    Attributes:
        monitor: the validation log key to maximise, or None: the last epoch.
        reason: why this rule, recorded beside it.
    """

    monitor: str | None
    reason: str

    @classmethod
    def for_validation(cls, task: str, val_lesion: bool) -> CheckpointRule:
        """The rule for a ``task`` whose validation cases hold lesion voxels (``val_lesion``) or not."""
        if val_lesion:
            return cls(MONITOR[task], f"highest validation {MONITOR[task][4:]}")
        return cls(None, f"the validation cases hold no lesion voxel: validation {MONITOR[task][4:]} is undefined there "
                         f"and validation loss is lowest for a model that predicts nothing, so the last epoch is kept")

    def improved(self, value: float, best: float | None, best_epoch: int | None, *, guard_event: bool) -> bool:
        """Whether an epoch with monitored ``value`` (and a guard event or not) replaces the
        kept one (``best``/``best_epoch``; None before the first)."""
        if self.monitor is None:
            return not guard_event
        if best_epoch is None:
            return True
        return math.isfinite(value) and (best is None or not math.isfinite(best) or value > best)

    def record(self) -> dict[str, Any]:
        """``config.json["checkpoint"]`` before training: the rule."""
        return {"monitor": self.monitor, "mode": "max" if self.monitor else "last", "reason": self.reason}


def write_checkpoint(run: Path, rule: CheckpointRule, state: RunState) -> None:
    """Record the rule and the kept epoch (``epoch``, its monitored ``value``) in
    ``config.json["checkpoint"]``; a folder without ``config.json`` (a non-chief worker's
    scratch folder) is left alone."""
    config_path = run / CONFIG_FILE
    if not config_path.is_file():
        return
    saved = read_json(config_path, what="run config")
    atomic_write_json(config_path, {**saved, "checkpoint": {**rule.record(), "epoch": state.best_epoch,
                                                            "value": state.best}})


@dataclass
class RunState:
    """Progress of a run, committed atomically to ``checkpoints/state.json`` each epoch.

    Attributes:
        run: RUN folder.
        epoch: completed epochs.
        best: best monitored value so far (None before the first epoch, and with the
            last-epoch rule).
        best_epoch: 1-based epoch of ``model.keras``.
        history: one dict per completed epoch (``epoch`` 1-based plus Keras logs).
        lr_scale: the collapse guard's factor on the learning-rate curve (1 before any event).
        guard_events: one dict per guard event (``epoch``, ``reason``, ``restored_epoch``,
            ``lr_scale``).
        good_epoch: the last good epoch (its weights are ``checkpoints/good.weights.h5``;
            0 = the initial weights), None without a guard.
        empty_run: epochs in a row, up to the last one, with validation at the empty level.
        varied: some training epoch so far had calls that were not all one class.
        pending_event: the guard event of the last epoch whose restore is still to do.
    """

    run: Path
    epoch: int = 0
    best: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, float]] | None = None
    lr_scale: float = 1.0
    guard_events: list[dict[str, Any]] = field(default_factory=list)
    good_epoch: int | None = None
    empty_run: int = 0
    varied: bool = False
    pending_event: dict[str, Any] | None = None

    @property
    def folder(self) -> Path:
        return self.run / CHECKPOINTS_DIR

    @property
    def state_path(self) -> Path:
        return self.folder / STATE_FILE

    def weights_path(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch:04d}.weights.h5"

    def best_path(self, epoch: int) -> Path:
        return self.folder / f"best-{epoch:04d}.keras"

    @property
    def good_path(self) -> Path:
        return self.folder / "good.weights.h5"

    @classmethod
    def load(cls, run: Path) -> RunState:
        """Read the committed state and tidy files written after it (by a killed process)."""
        state = cls(run=run, history=[])
        if state.state_path.is_file():
            saved = read_json(state.state_path, what="checkpoint state")
            state = cls(run=run, epoch=int(saved["epoch"]), best=saved["best"], best_epoch=saved["best_epoch"],
                        history=list(saved["history"]), lr_scale=float(saved.get("lr_scale", 1.0)),
                        guard_events=list(saved.get("guard_events", [])), good_epoch=saved.get("good_epoch"),
                        empty_run=int(saved.get("empty_run", 0)), varied=bool(saved.get("varied", False)),
                        pending_event=saved.get("pending_event"))
        if state.folder.is_dir():
            state._tidy()
        state.write_history()
        return state

    def _tidy(self) -> None:
        """Finish or discard what followed the last commit."""
        for p in self.folder.iterdir():
            if p.name.startswith("best-") and self.best_epoch is not None and p == self.best_path(self.best_epoch):
                os.replace(p, self.run / MODEL_FILE)
            elif p.name != STATE_FILE and p != self.weights_path(self.epoch) and p != self.good_path:
                p.unlink() if p.is_file() else shutil.rmtree(p, ignore_errors=True)

    def restore(self, model) -> None:
        """Load model weights and optimizer state of the last completed epoch."""
        model.optimizer.build(model.trainable_variables)
        model.load_weights(self.weights_path(self.epoch))
        log.info("resumed from %s (epoch %d)", self.weights_path(self.epoch), self.epoch)

    def save_good(self, model, epoch: int) -> None:
        """Keep ``model``'s weights (and optimizer state) as the last good epoch's."""
        self.folder.mkdir(parents=True, exist_ok=True)
        _save_atomic(lambda p: model.save_weights(p), self.good_path)
        self.good_epoch = epoch

    def restore_good(self, model) -> None:
        """Load the last good epoch's weights into ``model`` (compiled with a fresh optimizer)."""
        if self.good_epoch:  # epoch 0's file holds no optimizer state
            model.optimizer.build(model.trainable_variables)
        model.load_weights(self.good_path)

    def commit(self) -> None:
        """Write ``state.json`` atomically: the commit point of an epoch."""
        atomic_write_json(self.state_path, {
            "epoch": self.epoch, "best": self.best, "best_epoch": self.best_epoch, "history": self.history,
            "lr_scale": self.lr_scale, "guard_events": self.guard_events, "good_epoch": self.good_epoch,
            "empty_run": self.empty_run, "varied": self.varied, "pending_event": self.pending_event})

    def write_history(self) -> None:
        """Rewrite ``history.csv`` from the committed rows (nothing before the first epoch), in the
        project's one CSV format (:mod:`analysis.imaging.records`) with Keras's values in full; a
        column an epoch did not log is empty there."""
        if not self.history:
            return
        keys = ["epoch"] + sorted({k for row in self.history for k in row} - {"epoch"})
        rows = ([row.get(k) for k in keys] for row in self.history)
        atomic_write_text(self.run / HISTORY_FILE, csv_text(keys, rows, digits=None))


class RunCheckpoint(keras.callbacks.Callback):
    """Keras callback writing weights, best model, state and history at each epoch end.

    The Keras model being fitted (``self.model``) may be a logit view of ``model`` (see
    :func:`bonemets_tf.train._training_view`); weights and optimizer state are saved from the
    fitted model, the best model from ``model`` (probability output, what ``predict`` loads).

    Args:
        run: RUN folder.
        state: the run's state (updated in place).
        rule: which epoch is kept as ``model.keras``.
        model: the model to save as ``model.keras`` (None: the fitted one).
        guard: the collapse guard (None: off).
    """

    def __init__(self, run: Path, state: RunState, rule: CheckpointRule, *, model=None,
                 guard: CollapseGuard | None = None) -> None:
        super().__init__()
        self.run, self.state, self.rule, self.inference, self.guard = run, state, rule, model, guard

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = {k: float(v) for k, v in (logs or {}).items()}
        done = epoch + 1
        st = self.state
        st.folder.mkdir(parents=True, exist_ok=True)
        _save_atomic(lambda p: self.model.save_weights(p), st.weights_path(done))
        value = logs.get(self.rule.monitor, float("nan")) if self.rule.monitor else float("nan")
        if self.guard is not None:
            logs.update(self._guard(done, logs))
        improved = self.rule.improved(value, st.best, st.best_epoch, guard_event=bool(logs.get("guard_event")))
        if improved:
            _save_atomic(lambda p: (self.inference or self.model).save(p), st.best_path(done))
            st.best_epoch = done
            st.best = None if self.rule.monitor is None else value if math.isfinite(value) else float("-inf")
        previous = st.epoch
        st.epoch = done
        st.history = [row for row in st.history if row["epoch"] < done] + [{"epoch": done, **logs}]
        st.commit()
        if improved:
            os.replace(st.best_path(done), self.run / MODEL_FILE)
        if previous != done and st.weights_path(previous).exists():
            st.weights_path(previous).unlink()
        st.write_history()

    def _guard(self, done: int, logs: dict[str, float]) -> dict[str, float]:
        """Apply the collapse rule to epoch ``done``; the history columns it adds."""
        st = self.state
        empty = self.guard.val_empty(logs)
        st.empty_run = st.empty_run + 1 if empty else 0
        reason = self.guard.check(logs, st.empty_run, st.varied, bool(st.good_epoch))
        st.varied = st.varied or self.guard.constant(logs) is None
        scale = st.lr_scale
        if reason is None:
            if not empty:
                st.save_good(self.model, done)
            return {"lr_scale": scale, "guard_event": 0.0}
        st.lr_scale *= GUARD_LR_FACTOR
        st.empty_run = 0
        st.pending_event = {"epoch": done, "reason": reason, "restored_epoch": st.good_epoch, "lr_scale": st.lr_scale}
        st.guard_events.append(st.pending_event)
        self.model.stop_training = True
        return {"lr_scale": scale, "guard_event": 1.0}


def _save_atomic(save: Callable[[str], Any], path: Path) -> None:
    """Write ``path`` through ``save(temporary path)`` (:func:`analysis.imaging.io.atomic_file`; the
    temporary name keeps the endings, ``.keras`` or ``.weights.h5``, by which Keras picks the format)."""
    with atomic_file(path, suffix="".join(path.suffixes)) as tmp:
        save(str(tmp))
