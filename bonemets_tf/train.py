"""Training of a registered model on a cohort, writing a resumable RUN folder.

RUN layout (read by ``predict``/``gradcam``/``export``)::

    RUN/config.json        every setting (TrainConfig), the split used (case lists),
                           dataset path + fingerprint, resolved runtime (jit, strategy,
                           replicas, store), versions of tensorflow/keras/numpy
    RUN/model.keras        best model by the validation monitor (val_dice for segmenters,
                           val_auc for detectors); loads with ``keras.models.load_model``
                           after ``import bonemets_tf.layers`` (custom layers/losses)
    RUN/history.csv        one row per completed epoch: epoch (1-based), losses, metrics
    RUN/checkpoints/       state.json (commit point: completed epochs, best value and
                           epoch, history rows) + epoch-NNNN.weights.h5 (model weights and
                           optimizer state of the last completed epoch)
    RUN/logs/              TensorBoard logs (when the tensorboard package is installed)
    RUN/calibration.json   validation score of each probability threshold and the best one
                           (``predict --threshold auto``; see :mod:`bonemets_tf.calibrate`):
                           per-slice Dice for segmenters, F1 of slice calls for detectors

Robust defaults (issue #16). With the demo's default budget, ResUNet seed 0 collapsed on an
AVX-512/bf16 CPU (training Dice 0.18, 0.49, then 0.000 to the end, validation Dice 0 in every
epoch): its lesion logits fell below the clip of the probability-space BCE, where no loss term
has a gradient left (see :mod:`bonemets_tf.losses`). The defaults now train on logits
(``logit_loss``), with one soft Dice per batch (``batch_dice``), the segmenters' logit bias
initialised to the lesion-pixel prior of the training crops (``prior_bias``; Lin et al. 2017,
RetinaNet, sec. 4.1), a linear learning-rate warm-up (``warmup_steps``) and global-norm
gradient clipping (``clip_norm``). Measured effects are in BENCHMARKS.md, "Training robustness".

Collapse guard (``guard``, on by default). At each epoch end an epoch is *collapsed* when the
model's calls on that epoch's training batches *became* constant (share of outputs >= 0.5, the
``pos_frac`` metric, <= 1e-6 or >= 1 - 1e-6, after an earlier epoch where they were not: a
segmenter started at the lesion prior calls nothing at first), or when validation has fallen
back to its empty-prediction level (:data:`EMPTY_LEVEL` + :data:`EMPTY_MARGIN`) for
:data:`GUARD_PATIENCE` epochs in a row after a good epoch. A model whose validation has not yet
left that level is left alone: EfficientNet-B0 at the demo budget read validation AUC 0.486 and
0.502 in its first two epochs while its training AUC rose, and restoring its initial weights
there (the first version of this rule) only threw away half of its four epochs. Then train restores the weights and optimizer state
of the last *good* epoch (not collapsed, validation above that level; the initial weights
when there is none), multiplies the learning-rate curve by :data:`GUARD_LR_FACTOR` and goes on
with the next epoch (the data stream continues, it is not replayed). Each event is a row of
``config.json["guard"]["events"]`` (``epoch``, ``reason``, ``restored_epoch``, ``lr_scale``)
and the ``guard_event``/``lr_scale`` columns of ``history.csv``. After
:data:`GUARD_MAX_EVENTS` events, or when the guard acted and training still ends with validation
never more than :data:`~bonemets_tf.run.LEARNED_MARGIN` above the empty level (Dice 0.05, AUC
0.55), train raises :class:`TrainingFailed` (one line, exit code 3 from the CLI) and removes
``model.keras``, so no model that predicts nothing is left to ``predict``;
``config.json["guard"]["outcome"]`` is ``"ok"``, ``"recovered"`` or ``"failed"``. A run too
short for the guard to act (one epoch: the patience is two) ends normally;
:func:`bonemets_tf.run.training_status` then says whether it learned.

Each epoch end writes the weights file, then (if improved) ``best-NNNN.keras``, then
commits ``state.json`` atomically, then moves the best model to ``model.keras`` and
rewrites ``history.csv``. A process killed at any point (even SIGKILL) leaves a state
from which ``resume=True`` continues after the last committed epoch, with history and
best model consistent; the input pipeline continues its random stream (see
:mod:`bonemets_tf.data`) instead of replaying it.
"""
from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from analysis.cohort.layout import Cohort, fold_cases
from analysis.errors import InputError
from analysis.imaging.io import atomic_write_json, atomic_write_text, check_output_folder, read_json
from analysis.imaging.orientation import CANONICAL
from bonemets_tf.models.catalog import CATALOG, DETECT
from bonemets_tf.run import CALIBRATION_FILE, EMPTY_LEVEL, EMPTY_MARGIN, LEARNED_MARGIN, MODEL_FILE

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("auto", "mirrored", "multiworker")

#: Settings that must match when resuming a run (the others, e.g. epochs, may change).
RESUME_MUST_MATCH = ("dataset", "task", "arch", "fold", "batch_size", "steps_per_epoch", "image_size",
                     "width", "context", "lr", "seed", "precision", "positive_fraction", "lesion_crop_p", "bn_momentum",
                     "lr_schedule", "warmup_steps", "clip_norm", "logit_loss", "batch_dice")
LR_SCHEDULES = ("constant", "cosine")

#: A training epoch whose share of positive calls is within this of 0 or 1 is constant.
CONSTANT_EPS = 1e-6
#: Epochs in a row at the empty level before the guard acts.
GUARD_PATIENCE = 2
#: Factor on the learning rate at each guard event.
GUARD_LR_FACTOR = 0.5
#: Guard events after which training fails.
GUARD_MAX_EVENTS = 3
#: Lesion-pixel prior bounds for the segmenters' initial logit bias.
PRIOR_RANGE = (1e-4, 0.5)


class TrainingFailed(InputError):
    """Training did not produce a model that predicts anything (the collapse guard gave up)."""

    exit_code = 3


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting; written to ``RUN/config.json`` under ``"settings"``.

    Attributes:
        dataset: cohort folder (see :mod:`analysis.cohort.layout`).
        task: ``"detect"`` or ``"segment"``; must match the arch's task.
        arch: registry name.
        fold: cross-validation fold of ``splits.json``.
        epochs: total epochs (a resumed run trains up to this many).
        steps_per_epoch: training batches per epoch.
        batch_size: global batch size (split over replicas and workers).
        image_size: detector resize side / segmenter training crop side.
        width: filter-count multiplier.
        context: adjacent slices as channels (odd).
        lr: Adam learning rate (the peak, with a schedule).
        lr_schedule: ``constant``, or ``cosine``: cosine decay from ``lr`` to 1% of it over
            ``epochs * steps_per_epoch`` steps (Loshchilov & Hutter 2017, SGDR, without restarts).
            In the demo's short budget it gave a slightly better UNet than a constant rate
            (per-slice test Dice 0.51 vs 0.48 after 240 steps, one seed) and smoother validation.
        seed: seeds weights, sampling and augmentation.
        jit: XLA-compile the train step; None = on when a GPU is visible.
        precision: Keras dtype policy.
        strategy: ``auto`` (default device), ``mirrored`` (all local GPUs) or
            ``multiworker`` (``TF_CONFIG`` cluster; only the chief writes RUN).
        deterministic: ``tf.config.experimental.enable_op_determinism()`` (slower).
        positive_fraction: share of lesion slices drawn for training.
        lesion_crop_p: segmenters: probability to centre a crop on lesion.
        val_max_slices: cap on validation slices per epoch (None: all).
        weights: local weights file to start from.
        bn_momentum: momentum of every BatchNormalization layer while training (None keeps
            the builders' values, Keras's 0.99). 0.9 (PyTorch's default) lets the inference
            statistics follow the weights in short from-scratch schedules; with 0.99 they lag
            so far behind that validation outputs stay constant (validation AUC 0.5 and Dice
            0 after a few hundred steps, seen on the phantom).
        warmup_steps: linear learning-rate warm-up steps; None: 10% of all steps, at most one
            epoch (24 of the demo segmenters' 240); 0: none.
        clip_norm: clip each step's gradients to this global norm (None: no clipping).
        prior_bias: segmenters: set the output logit's bias to ``logit(pi)``, ``pi`` the
            lesion-pixel share of the first training batches (detectors train balanced by
            ``pos_weight``, so their prior is 0.5 and the bias stays 0).
        logit_loss: compute the losses from logits (see :mod:`bonemets_tf.losses`).
        batch_dice: segmenters: one soft Dice over each batch instead of one per sample.
        guard: the collapse guard (module docstring).
        rank_auc: detectors: exact rank AUC (:class:`bonemets_tf.losses.RankAUC`) as the
            ``auc``/``val_auc`` metric instead of Keras's 200-bucket ``AUC``, which reads 0.5
            for outputs confined to one bucket (one replica only).
        run_eagerly: run train and validation steps eagerly instead of tracing them into a
            ``tf.function``: the same computation, slower per step but without the one-off
            trace. Measured on a 2-core CPU (batch 8 of 64^2): DenseNet121's first traced step
            takes 77 s, later ones 0.34 s, an eager step 5 s; EfficientNet-B0 48 s / 0.17 s /
            2.6 s. Worth it below ~15 steps (the quick demo), never for real training.
    """

    dataset: str
    task: str
    arch: str
    fold: int = 0
    epochs: int = 50
    steps_per_epoch: int = 200
    batch_size: int = 16
    image_size: int = 256
    width: float = 1.0
    context: int = 1
    lr: float = 1e-3
    seed: int = 0
    jit: bool | None = None
    precision: str = "float32"
    strategy: str = "auto"
    deterministic: bool = False
    positive_fraction: float = 0.5
    lesion_crop_p: float = 0.7
    val_max_slices: int | None = None
    weights: str | None = None
    bn_momentum: float | None = 0.9
    lr_schedule: str = "constant"
    run_eagerly: bool = False
    warmup_steps: int | None = None
    clip_norm: float | None = 1.0
    prior_bias: bool = True
    logit_loss: bool = True
    batch_dice: bool = True
    guard: bool = True
    rank_auc: bool = True

    @property
    def warmup(self) -> int:
        """Warm-up steps in effect (``warmup_steps`` resolved)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(self.steps_per_epoch, max(1, self.epochs * self.steps_per_epoch // 10))

    def check(self) -> None:
        """Raise :class:`InputError` for inconsistent or out-of-range settings."""
        if self.arch not in CATALOG:
            raise InputError(f"--arch {self.arch!r}: unknown model; expected one of {', '.join(CATALOG)}")
        if CATALOG[self.arch].task != self.task:
            raise InputError(f"--task {self.task}: {self.arch} is a {CATALOG[self.arch].task} model")
        if self.bn_momentum is not None and not 0.0 <= self.bn_momentum < 1.0:
            raise InputError(f"--bn-momentum {self.bn_momentum}: expected a value in [0, 1)")
        for name in ("epochs", "steps_per_epoch", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected >= 1")
        stride = CATALOG[self.arch].stride
        if self.image_size < 32 or (self.task != DETECT and self.image_size % stride):
            raise InputError(f"--image-size {self.image_size}: expected >= 32 and, for segmenters, "
                             f"a multiple of {stride}")
        if not 0.0 <= self.positive_fraction <= 1.0:
            raise InputError(f"positive_fraction {self.positive_fraction}: expected a value in [0, 1]")
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision {self.precision}: expected one of {', '.join(PRECISIONS)}")
        if self.strategy not in STRATEGIES:
            raise InputError(f"--strategy {self.strategy}: expected one of {', '.join(STRATEGIES)}")
        if self.run_eagerly and self.jit:
            raise InputError("--run-eagerly and --jit exclude each other (XLA compiles a traced step)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"--lr-schedule {self.lr_schedule}: expected one of {', '.join(LR_SCHEDULES)}")
        if not self.lr > 0:
            raise InputError(f"--lr {self.lr}: expected > 0")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise InputError(f"--warmup-steps {self.warmup_steps}: expected >= 0")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise InputError(f"--clip-norm {self.clip_norm}: expected > 0")


def train(config: TrainConfig, out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
          cache_dir: str | os.PathLike | None = None) -> Path:
    """Train ``config.arch`` and write the RUN folder ``out`` (layout in the module docstring).

    Args:
        config: the settings.
        out: RUN folder.
        resume: continue the run in ``out`` after its last completed epoch (starts from
            epoch 0 if none completed); the settings in :data:`RESUME_MUST_MATCH` must equal
            the saved ones.
        overwrite: delete an existing ``out`` first.
        cache_dir: slice cache root (None: ``~/.cache/bonemets/slices``).

    Returns:
        The RUN folder.

    Raises:
        InputError: bad settings or data, an existing RUN without ``resume``/``overwrite``,
            or a resume whose settings differ from the saved run.
        TrainingFailed: the collapse guard could not get a model that predicts anything.
    """
    config.check()
    out = Path(out)
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other")
    chief = is_chief(config.strategy)
    if chief:  # other workers never touch RUN (with a shared RUN path, the chief may already be writing it)
        check_output_folder(out, overwrite=resume or overwrite, what="run folder",
                            hint="pass --resume to continue it or --overwrite to replace it")

    import tensorflow as tf  # heavy: only when training

    strategy = _make_strategy(config.strategy, tf)  # first TF call (multi-worker needs that)
    cohort = Cohort(config.dataset)
    cohort.require_exists()
    splits = cohort.splits()
    if splits is None:
        log.warning("%s has no splits.json: every case trains and validates (no test set)", cohort.root)
    train_cases, val_cases = fold_cases(splits, config.fold, cohort.cases())
    if not train_cases or not val_cases:
        raise InputError(f"{cohort.root}: fold {config.fold} has no training or no validation cases")

    from bonemets_tf import cache, data

    cached_train = cache.ensure_cached(cohort, train_cases, cache_dir)
    cached_val = cache.ensure_cached(cohort, val_cases, cache_dir)
    record = _record(config, splits, train_cases, val_cases, cached_train + cached_val, strategy, tf)

    run = out if chief else worker_scratch(out, resume=resume)
    try:
        if chief:
            _prepare_run(run, record, resume=resume, overwrite=overwrite)
        with _precision(config.precision):
            trained = _fit(config, run, record, cached_train, cached_val, strategy, tf, data)  # every worker trains
        if chief and (trained or not (run / CALIBRATION_FILE).is_file()):
            from bonemets_tf.calibrate import calibrate_run

            calibrate_run(run, cached_val, batch_size=config.batch_size)
        return out
    finally:
        if not chief:
            shutil.rmtree(run, ignore_errors=True)


def _fit(config, run, record, cached_train, cached_val, strategy, tf, data) -> bool:
    """Train up to ``config.epochs``; False when the run had already got there.

    Raises:
        TrainingFailed: the collapse guard gave up (module docstring).
    """
    import keras

    from bonemets_tf.models.registry import build_model

    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    state = RunState.load(run)
    if state.epoch >= config.epochs:
        log.info("%s: already trained for %d epochs; nothing to do", run, state.epoch)
        return False
    workers = _num_workers(strategy)
    if config.batch_size % (strategy.num_replicas_in_sync) != 0:
        raise InputError(f"--batch-size {config.batch_size}: must be a multiple of the "
                         f"{strategy.num_replicas_in_sync} replicas")
    # tf.distribute splits each batch of every worker's pipeline into num_replicas_in_sync
    # pieces and a worker takes its replicas' share per step: every pipeline yields global
    # batches, and a worker consumes batch_size / workers of its stream per step.
    worker_share = config.batch_size // workers
    sampling = data.Sampling(config.task, image_size=config.image_size,
                             positive_fraction=config.positive_fraction, lesion_crop_p=config.lesion_crop_p)
    train_store = data.SliceStore(cached_train, context=config.context)
    val_store = data.SliceStore(cached_val, context=config.context)

    def train_ds():  # continues the stream after the last completed epoch (resume, guard restart)
        return data.training_dataset(train_store, sampling, batch_size=config.batch_size, seed=config.seed,
                                     stream=_worker_index(strategy),
                                     start=state.epoch * config.steps_per_epoch * worker_share)

    val_ds = data.validation_dataset(val_store, config.task, batch_size=config.batch_size,
                                     image_size=config.image_size, max_slices=config.val_max_slices)
    with strategy.scope():
        model = build_model(config.arch, context=config.context, width=config.width,
                            image_size=config.image_size, weights=config.weights)
        if config.bn_momentum is not None:
            for layer in model.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.momentum = config.bn_momentum
        if state.epoch == 0 and config.prior_bias and config.task != DETECT and config.weights is None:
            _set_prior_bias(model, _lesion_prior(data.training_dataset(
                train_store, sampling, batch_size=config.batch_size, seed=config.seed, stream=_worker_index(strategy))))
        trainer = _training_view(model, config.task) if config.logit_loss else model
        _compile(trainer, config, record, state.lr_scale)
        if state.epoch > 0:
            state.restore(trainer)
            if config.guard and state.pending_event is not None:  # killed between an event and its restore
                state.restore_good(trainer)
                state.pending_event = None
    _record_params(run, model)
    monitor = "val_auc" if config.task == DETECT else "val_dice"
    guard = CollapseGuard(config.task, monitor) if config.guard else None
    if guard is not None and state.epoch == 0:
        state.save_good(trainer, 0)
    log.info("training %s (%s) for epochs %d..%d, %d steps of %d", config.arch, config.task,
             state.epoch + 1, config.epochs, config.steps_per_epoch, config.batch_size)
    while True:
        callbacks = [RunCheckpoint(run, state, monitor, model=model, guard=guard)]
        if importlib.util.find_spec("tensorboard") is not None:
            callbacks.append(keras.callbacks.TensorBoard(log_dir=str(run / "logs"), write_graph=False,
                                                         profile_batch=0))
        ds = train_ds()
        with _keras_multiworker_fixes(trainer, ds) if workers > 1 else contextlib.nullcontext():
            trainer.fit(ds, epochs=config.epochs, initial_epoch=state.epoch, steps_per_epoch=config.steps_per_epoch,
                        validation_data=val_ds, callbacks=callbacks, shuffle=False,
                        verbose=1 if sys.stdout.isatty() else 2)
        event = state.pending_event
        if guard is None or event is None:
            break
        if len(state.guard_events) > GUARD_MAX_EVENTS:
            _fail(run, state, config, f"{len(state.guard_events)} collapses (last: {event['reason']}), "
                                      f"learning rate down to x{state.lr_scale:g}")
        state.pending_event = None
        if state.epoch >= config.epochs:
            state.commit()
            break
        with strategy.scope():  # restore the last good epoch and go on at a lower rate
            _compile(trainer, config, record, state.lr_scale)
            state.restore_good(trainer)
            trainer.optimizer.iterations.assign(state.epoch * config.steps_per_epoch)
        state.commit()
        log.warning("%s epoch %d: %s; restored epoch %d, learning rate x%g", config.arch, event["epoch"],
                    event["reason"], event["restored_epoch"], event["lr_scale"])
    if guard is not None:
        learned = state.best is not None and state.best > EMPTY_LEVEL[config.task] + LEARNED_MARGIN[config.task]
        if state.guard_events and not learned:  # the guard acted and could not get it going
            best = "none" if state.best is None else f"{state.best:.4f}"
            _fail(run, state, config, f"validation {monitor[4:]} never rose above its empty-prediction level "
                                      f"{EMPTY_LEVEL[config.task]:g} (best {best})")
        _write_guard(run, state, "recovered" if state.guard_events else "ok")
        if not learned:
            log.warning("%s did not learn: best %s %s, not above its empty-prediction level %g + %g "
                        "(too short for the collapse guard to act)", config.arch, monitor, state.best,
                        EMPTY_LEVEL[config.task], LEARNED_MARGIN[config.task])
    return True


def _compile(trainer, config: TrainConfig, record: dict[str, Any], lr_scale: float) -> None:
    """Compile ``trainer`` with this run's loss, metrics and optimizer (rate times ``lr_scale``)."""
    import keras
    import tensorflow as tf

    from bonemets_tf.losses import DiceBCELoss, DiceScore, PositiveFraction, RankAUC, WeightedBCELoss

    logits = config.logit_loss
    if config.task == DETECT:
        f = config.positive_fraction
        loss = WeightedBCELoss(pos_weight=(1.0 - f) / f if 0.0 < f < 1.0 else 1.0, from_logits=logits)
        one_replica = tf.distribute.get_strategy().num_replicas_in_sync == 1
        auc = RankAUC(name="auc") if config.rank_auc and one_replica else \
            keras.metrics.AUC(name="auc", from_logits=logits)
        metrics = [auc,
                   keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.0 if logits else 0.5)]
    else:
        loss = DiceBCELoss(from_logits=logits, batch_dice=config.batch_dice)
        metrics = [DiceScore(name="dice", from_logits=logits)]
    metrics.append(PositiveFraction(name="pos_frac", from_logits=logits))
    clip = {"global_clipnorm": config.clip_norm} if config.clip_norm is not None else {}
    trainer.compile(optimizer=keras.optimizers.Adam(_learning_rate(config, lr_scale), **clip), loss=loss,
                    metrics=metrics, jit_compile=record["runtime"]["jit_compile"], run_eagerly=config.run_eagerly)


def _training_view(model, task: str):
    """A model sharing ``model``'s layers whose output is the logit (before the sigmoid),
    cropped like the probability for segmenters: what the logit losses train."""
    import keras

    from bonemets_tf.layers import CropLike

    logit = model.get_layer("logit").output
    logit = keras.layers.Activation("linear", dtype="float32", name="logit_float32")(logit)
    if task != DETECT:
        logit = CropLike(dtype="float32", name="logit_crop")([logit, model.inputs[0]])
    return keras.Model(model.inputs, logit, name=f"{model.name}_logits")


def _lesion_prior(dataset, batches: int = 8) -> float:
    """Lesion-pixel share of the first ``batches`` training batches, within :data:`PRIOR_RANGE`."""
    total = count = 0.0
    for _, mask in dataset.take(batches):
        m = np.asarray(mask, np.float64)
        total, count = total + m.sum(), count + m.size
    prior = total / count if count else PRIOR_RANGE[0]
    return float(min(max(prior, PRIOR_RANGE[0]), PRIOR_RANGE[1]))


def _set_prior_bias(model, prior: float) -> None:
    """Start the segmenter at ``sigmoid(logit bias) = prior`` (rare-foreground initialisation)."""
    layer = model.get_layer("logit")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel, np.full_like(bias, math.log(prior / (1.0 - prior)))])
    log.info("logit bias initialised to the lesion-pixel prior %.4f (%.2f)", prior, math.log(prior / (1.0 - prior)))


def _learning_rate(config: TrainConfig, scale: float = 1.0):
    """Adam's learning rate: a float, or a schedule over the global step (the optimizer's
    ``iterations``, restored on ``--resume``, so a resumed run continues the same curve)."""
    from bonemets_tf.losses import WarmupSchedule

    decay = config.epochs * config.steps_per_epoch if config.lr_schedule == "cosine" else None
    if decay is None and config.warmup == 0 and scale == 1.0:
        return config.lr
    return WarmupSchedule(config.lr, decay_steps=decay, alpha=0.01, warmup_steps=config.warmup, scale=scale)


def _fail(run: Path, state: "RunState", config: TrainConfig, why: str) -> None:
    """Record the failure, remove ``model.keras`` and raise :class:`TrainingFailed`."""
    _write_guard(run, state, "failed")
    (run / MODEL_FILE).unlink(missing_ok=True)
    raise TrainingFailed(f"train {config.arch}: did not learn: {why}; {run / MODEL_FILE} removed "
                         f"(history in {run / 'history.csv'}; try a lower --lr)")


def _write_guard(run: Path, state: "RunState", outcome: str) -> None:
    config_path = run / "config.json"
    if not config_path.is_file():  # a non-chief worker's scratch folder
        return
    saved = read_json(config_path, what="run config")
    guard = {"rule": {"constant_eps": CONSTANT_EPS, "empty_level": EMPTY_LEVEL, "empty_margin": EMPTY_MARGIN,
                      "learned_margin": LEARNED_MARGIN,
                      "patience": GUARD_PATIENCE, "lr_factor": GUARD_LR_FACTOR, "max_events": GUARD_MAX_EVENTS},
             "events": state.guard_events, "lr_scale": state.lr_scale, "outcome": outcome}
    atomic_write_json(config_path, {**saved, "guard": guard})


class CollapseGuard:
    """The collapse rule of the module docstring, applied to one epoch's logs.

    Args:
        task: ``"detect"`` or ``"segment"``.
        monitor: validation key (``val_dice``/``val_auc``).
    """

    def __init__(self, task: str, monitor: str) -> None:
        self.task, self.monitor = task, monitor
        self.empty = EMPTY_LEVEL[task] + EMPTY_MARGIN[task]

    def val_empty(self, logs: dict[str, float]) -> bool:
        """Validation at (or below) the empty-prediction level, or not finite."""
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


@contextlib.contextmanager
def _keras_multiworker_fixes(model, train_ds) -> Iterator[None]:
    """Work around two Keras 3 bugs that stop ``fit`` under MultiWorkerMirroredStrategy
    (keras-team/keras#20585; present in the pinned Keras 3.15.1), for this fit only.

    1. ``fit``/``evaluate`` first reduce a distributed data batch across workers to build
       the model symbolically ("Attempt to convert a value (PerReplica...)"). The model,
       loss and metrics are built here from one batch of this worker's own undistributed
       pipeline instead (the pipeline is indexed by element: reading it does not shift
       what training reads), and the symbolic build in ``fit`` is skipped.
    2. Each step reduces its scalar logs (loss, metrics) across workers with ``axis=0``
       ("Invalid reduction dimension 0 for input with 0 dimensions"). Scalars are reduced
       with ``axis=None`` (the mean over replicas); other values as Keras does.
    """
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    x, y = next(iter(train_ds))
    model._maybe_symbolic_build(data_batch=(x, y, None))
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None  # built above
    original = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction="auto"):
        if reduction not in ("auto", "mean") or not tf_trainer._collective_all_reduce_multi_worker(strategy):
            return original(values, strategy, reduction=reduction)

        def mean(v):
            rank = strategy.experimental_local_results(v)[0].shape.rank
            return strategy.reduce("MEAN", v, axis=0 if rank else None)

        return tree.map_structure(mean, values)

    tf_trainer.reduce_per_replica = reduce_per_replica
    try:
        yield
    finally:
        tf_trainer.reduce_per_replica = original
        del model._maybe_symbolic_build


# --- run state ----------------------------------------------------------------------


@dataclass
class RunState:
    """Progress of a run, committed atomically to ``checkpoints/state.json`` each epoch.

    Attributes:
        run: RUN folder.
        epoch: completed epochs.
        best: best monitored value so far (None before the first epoch).
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
        return self.run / "checkpoints"

    def weights_path(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch:04d}.weights.h5"

    def best_path(self, epoch: int) -> Path:
        return self.folder / f"best-{epoch:04d}.keras"

    @property
    def good_path(self) -> Path:
        return self.folder / "good.weights.h5"

    @classmethod
    def load(cls, run: Path) -> "RunState":
        """Read the committed state and tidy files written after it (by a killed process)."""
        path = run / "checkpoints" / "state.json"
        state = cls(run=run, history=[])
        if path.is_file():
            saved = read_json(path, what="checkpoint state")
            state = cls(run=run, epoch=int(saved["epoch"]), best=saved["best"], best_epoch=saved["best_epoch"],
                        history=list(saved["history"]), lr_scale=float(saved.get("lr_scale", 1.0)),
                        guard_events=list(saved.get("guard_events", [])), good_epoch=saved.get("good_epoch"),
                        empty_run=int(saved.get("empty_run", 0)), varied=bool(saved.get("varied", False)),
                        pending_event=saved.get("pending_event"))
        if state.folder.is_dir():
            for p in state.folder.iterdir():  # finish or discard what followed the last commit
                if p.name.startswith("best-") and state.best_epoch is not None and p == state.best_path(state.best_epoch):
                    os.replace(p, run / "model.keras")
                elif p.name != "state.json" and p != state.weights_path(state.epoch) and p != state.good_path:
                    p.unlink() if p.is_file() else shutil.rmtree(p, ignore_errors=True)
        state.write_history()
        return state

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
        atomic_write_json(self.folder / "state.json", {
            "epoch": self.epoch, "best": self.best, "best_epoch": self.best_epoch, "history": self.history,
            "lr_scale": self.lr_scale, "guard_events": self.guard_events, "good_epoch": self.good_epoch,
            "empty_run": self.empty_run, "varied": self.varied, "pending_event": self.pending_event})

    def write_history(self) -> None:
        if not self.history:
            return
        keys = ["epoch"] + sorted({k for row in self.history for k in row} - {"epoch"})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(self.run / "history.csv", buf.getvalue())


def _keras_callback_base():
    import keras

    return keras.callbacks.Callback


class RunCheckpoint(_keras_callback_base()):
    """Keras callback writing weights, best model, state and history at each epoch end.

    The Keras model being fitted (``self.model``) may be a logit view of ``model`` (see
    :func:`_training_view`); weights and optimizer state are saved from the fitted model, the
    best model from ``model`` (probability output, what ``predict`` loads).

    Args:
        run: RUN folder.
        state: the run's state (updated in place).
        monitor: validation log key to maximise (e.g. ``"val_dice"``).
        model: the model to save as ``model.keras`` (None: the fitted one).
        guard: the collapse guard (None: off).
    """

    def __init__(self, run: Path, state: RunState, monitor: str, *, model=None,
                 guard: CollapseGuard | None = None) -> None:
        super().__init__()
        self.run, self.state, self.monitor, self.inference, self.guard = run, state, monitor, model, guard

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = {k: float(v) for k, v in (logs or {}).items()}
        done = epoch + 1
        st = self.state
        st.folder.mkdir(parents=True, exist_ok=True)
        _save_atomic(lambda p: self.model.save_weights(p), st.weights_path(done))
        value = logs.get(self.monitor, float("nan"))
        improved = st.best is None or (math.isfinite(value) and (not math.isfinite(st.best) or value > st.best))
        if improved:
            _save_atomic(lambda p: (self.inference or self.model).save(p), st.best_path(done))
            st.best, st.best_epoch = (value if math.isfinite(value) else float("-inf")), done
        if self.guard is not None:
            logs.update(self._guard(done, logs))
        previous = st.epoch
        st.epoch = done
        st.history = [row for row in st.history if row["epoch"] < done] + [{"epoch": done, **logs}]
        st.commit()
        if improved:
            os.replace(st.best_path(done), self.run / "model.keras")
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


def _save_atomic(save, path: Path) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        save(str(tmp))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# --- setup helpers ------------------------------------------------------------------


def _record_params(run: Path, model) -> None:
    """Add the built model's parameter count (at this run's width) to ``config.json["model"]``."""
    config_path = run / "config.json"
    if not config_path.is_file():  # a non-chief worker's scratch folder
        return
    saved = read_json(config_path, what="run config")
    params = int(model.count_params())
    if saved.get("model", {}).get("params") != params:
        atomic_write_json(config_path, {**saved, "model": {**saved.get("model", {}), "params": params}})


def _prepare_run(run: Path, record: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
    config_path = run / "config.json"
    if resume and config_path.is_file():
        saved = read_json(config_path, what="run config")
        differ = [k for k in RESUME_MUST_MATCH if saved.get("settings", {}).get(k) != record["settings"][k]]
        if saved.get("dataset_fingerprint") != record["dataset_fingerprint"]:
            differ.append("dataset files (fingerprint)")
        if differ:
            raise InputError(f"--resume {run}: settings differ from the saved run: {', '.join(differ)}; "
                             f"repeat the original command (only --epochs may change)")
        if saved["settings"]["epochs"] != record["settings"]["epochs"]:
            atomic_write_json(config_path, {**saved, "settings": {**saved["settings"], "epochs": record["settings"]["epochs"]}})
        return
    if overwrite and run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(config_path, record)


def _record(config: TrainConfig, splits, train_cases, val_cases, cached, strategy, tf) -> dict[str, Any]:
    import keras

    from bonemets_tf.cache import fingerprint

    jit = False if config.run_eagerly else (config.jit if config.jit is not None else bool(tf.config.list_physical_devices("GPU")))
    return {
        "settings": {**asdict(config), "dataset": str(Path(config.dataset).resolve())},
        "split": {"fold": config.fold, "train": list(train_cases), "val": list(val_cases),
                  "test": sorted(splits["test"]) if splits else [], "splits_seed": splits.get("seed") if splits else None},
        "dataset_fingerprint": fingerprint(cached),
        "case_keys": {c.case: c.key for c in cached},
        # the slice cache holds every case in this orientation (bonemets_tf.cache); predict
        # reorients its input the same way and refuses RUNs without this record
        "orientation": CANONICAL,
        "runtime": {"jit_compile": jit, "strategy": _strategy_name(strategy),
                    "replicas": int(strategy.num_replicas_in_sync), "workers": _num_workers(strategy),
                    "gpus": len(tf.config.list_physical_devices("GPU"))},
        "model": {"stride": CATALOG[config.arch].stride, "input": "raw HU (batch, rows, cols, context)",
                  "output": "sigmoid probability " + ("(batch, 1)" if config.task == DETECT else "(batch, rows, cols, 1)")},
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
                     "python": sys.version.split()[0]},
    }


@contextlib.contextmanager
def _precision(policy: str) -> Iterator[None]:
    import keras

    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _make_strategy(name: str, tf):
    """The tf.distribute strategy for ``--strategy`` (``TF_CONFIG`` was checked by :func:`is_chief`).

    ``mirrored`` replicates over every local GPU; on a machine without GPUs it uses the
    logical CPU devices (one, unless a caller split the CPU with
    ``tf.config.set_logical_device_configuration`` before any TF op, as the tests do).
    """
    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or \
            [d.name for d in tf.config.list_logical_devices("CPU")]
        log.info("mirrored strategy over %d device(s): %s", len(devices), ", ".join(devices))
        return tf.distribute.MirroredStrategy(devices)
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def _strategy_name(strategy) -> str:
    """tf.distribute's public name of ``strategy`` (MultiWorkerMirroredStrategy's class is
    CollectiveAllReduceStrategy; the default strategy's is private)."""
    name = type(strategy).__name__
    return {"CollectiveAllReduceStrategy": "MultiWorkerMirroredStrategy",
            "_DefaultDistributionStrategy": "default"}.get(name, name)


def _num_workers(strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 1
    spec = resolver.cluster_spec().as_dict()
    return len(spec.get("worker", [])) + len(spec.get("chief", []))


def _worker_index(strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 0
    spec = resolver.cluster_spec().as_dict()
    offset = len(spec.get("chief", [])) if resolver.task_type == "worker" else 0
    return offset + int(resolver.task_id or 0)


def is_chief(strategy: str) -> bool:
    """Whether this process writes the RUN folder: always, except a non-chief multi-worker process.

    For ``multiworker`` this reads ``TF_CONFIG`` (no TensorFlow import), with TensorFlow's
    rule: the chief is the task of type ``chief``, or ``worker`` 0 when the cluster has no
    ``chief`` entry.

    Args:
        strategy: ``auto``, ``mirrored`` or ``multiworker``.

    Raises:
        InputError: ``multiworker`` with ``TF_CONFIG`` unset, not JSON, or without a task
            that belongs to its cluster.
    """
    if strategy != "multiworker":
        return True
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise InputError("--strategy multiworker: TF_CONFIG is not set; it must describe the cluster "
                         "and this worker's task (see tf.distribute.MultiWorkerMirroredStrategy)")
    try:
        tf_config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"--strategy multiworker: TF_CONFIG is not valid JSON ({exc})") from None
    cluster = tf_config.get("cluster") if isinstance(tf_config, dict) else None
    task = tf_config.get("task") if isinstance(tf_config, dict) else None
    kind = task.get("type") if isinstance(task, dict) else None
    index = task.get("index", 0) if isinstance(task, dict) else None
    if not isinstance(cluster, dict) or not isinstance(cluster.get(kind), list) or not isinstance(index, int) \
            or not 0 <= index < len(cluster[kind]):
        raise InputError(f"--strategy multiworker: TF_CONFIG {raw!r}: expected "
                         f'{{"cluster": {{"worker": ["host:port", ...]}}, "task": {{"type": "worker", "index": i}}}} '
                         f"with the task's type listed in the cluster and 0 <= index < its length")
    return kind == "chief" or (kind == "worker" and index == 0 and "chief" not in cluster)


def worker_scratch(out: Path, *, resume: bool) -> Path:
    """A fresh scratch folder standing in for RUN on a non-chief worker (removed after training).

    With ``resume``, the chief's last committed state (``checkpoints/state.json`` and that
    epoch's weights) is copied in when ``out`` is visible here (a filesystem shared by the
    workers), so every worker restores the same epoch; the chief's files are only read.

    Args:
        out: the RUN folder named on the command line (written by the chief only).
        resume: the run continues after its last completed epoch.

    Returns:
        The scratch folder.
    """
    scratch = Path(tempfile.mkdtemp(prefix="bonemets-worker-"))
    state = out / "checkpoints" / "state.json"
    if resume and state.is_file():
        epoch = int(read_json(state, what="checkpoint state")["epoch"])
        source, target = RunState(run=out), RunState(run=scratch)
        target.folder.mkdir()
        if epoch > 0:
            shutil.copy2(source.weights_path(epoch), target.weights_path(epoch))
        shutil.copy2(state, target.folder / "state.json")
        log.info("worker resumes from the chief's epoch %d (%s)", epoch, state)
    elif resume:
        log.warning("%s is not visible on this worker: it starts from epoch 0; resuming a multi-worker run "
                    "needs RUN on a filesystem shared by all workers", state)
    return scratch
