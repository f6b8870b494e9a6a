"""Training of a registered model on a cohort, writing a resumable RUN folder.

RUN layout (read by ``predict``/``gradcam``/``export``; the names are :mod:`bonemets_tf.run`'s)::

    RUN/config.json        every setting (TrainConfig), the split used (case lists),
                           dataset path + fingerprint, the in-plane pixel spacing trained at
                           (``spacing``: the training cases' median, which ``predict``
                           resamples every CT to), resolved runtime (jit, strategy,
                           replicas, store), versions of tensorflow/keras/numpy, the
                           checkpoint rule and the epoch it kept ("checkpoint"); a fine-tune
                           (``init_from``) also its parent and ancestors (``init_from``,
                           ``lineage``: :mod:`bonemets_tf.lineage`); ``review_set``: the
                           training and validation cases that came from readers' reviews
                           (the cohort's ``reviews.json``, written by ``import-reviews``)
    RUN/model.keras        best model by the validation monitor (val_dice for segmenters,
                           val_auc for detectors), or the last epoch's when the validation
                           cases hold no lesion (``config.json["checkpoint"]``, see
                           :class:`bonemets_tf.checkpoint.CheckpointRule`); loads with
                           ``keras.models.load_model`` after ``import bonemets_tf.layers``
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

The collapse guard (``guard``, on by default) restores the last good epoch at a lower learning
rate when a model's calls become constant, and raises :class:`TrainingFailed` when it cannot get
one that learned: the rule and its record are in :mod:`bonemets_tf.guard`. The checkpoint
protocol that makes a killed run resumable (``resume=True``) is in :mod:`bonemets_tf.checkpoint`;
strategies, ``TF_CONFIG`` and the workers of a multi-worker run in :mod:`bonemets_tf.distribute`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from analysis.cohort.layout import Cohort, fold_cases
from analysis.errors import InputError
from analysis.imaging.io import atomic_write_json, check_output_folder, read_json
from analysis.imaging.orientation import CANONICAL
from analysis.imaging.records import versions
from bonemets_tf import cache
from bonemets_tf.cache import CachedCase
from bonemets_tf.checkpoint import CheckpointRule, RunCheckpoint, RunState, write_checkpoint
from bonemets_tf.choices import LR_SCHEDULES, STRATEGIES, TRAIN_PRECISIONS
from bonemets_tf.distribute import (is_chief, keras_multiworker_fixes, make_strategy, num_workers,
                                    strategy_name, worker_index, worker_scratch)
from bonemets_tf.guard import GUARD_MAX_EVENTS, CollapseGuard, write_guard
from bonemets_tf.models.catalog import CATALOG, DETECT
from bonemets_tf.run import (CALIBRATION_FILE, CONFIG_FILE, EMPTY_LEVEL, HISTORY_FILE, LEARNED_MARGIN, LOGS_DIR,
                             MODEL_FILE, MONITOR, learned)

log = logging.getLogger(__name__)

#: Settings that must match when resuming a run (the others, e.g. epochs, may change).
RESUME_MUST_MATCH = ("dataset", "task", "arch", "fold", "batch_size", "steps_per_epoch", "image_size",
                     "width", "context", "lr", "seed", "precision", "positive_fraction", "lesion_crop_p", "bn_momentum",
                     "lr_schedule", "warmup_steps", "clip_norm", "logit_loss", "batch_dice", "init_from",
                     "hard_negative_fraction")

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
        init_from: a RUN folder to fine-tune: its weights start this run, its architecture is
            this run's (:mod:`bonemets_tf.lineage`; the settings must already agree with it:
            :func:`bonemets_tf.lineage.inherited_settings` makes them so).
        hard_negative_fraction: share of training elements drawn from slices with hard
            negatives (``negativesTr``), segmenters' crops centred on them
            (:mod:`bonemets_tf.data`); 0: none.
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
    init_from: str | None = None
    hard_negative_fraction: float = 0.0

    @property
    def warmup(self) -> int:
        """Warm-up steps in effect (``warmup_steps`` resolved)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(self.steps_per_epoch, max(1, self.epochs * self.steps_per_epoch // 10))

    def get_config(self) -> dict[str, Any]:
        """Every setting by field name (JSON-ready): ``config.json["settings"]`` with the
        dataset as given (train writes it resolved)."""
        return asdict(self)

    @classmethod
    def from_config(cls, config: dict[str, Any], *, source: str = "settings") -> TrainConfig:
        """The inverse of :meth:`get_config`.

        Args:
            config: every field of :class:`TrainConfig` by name, and no other key.
            source: what ``config`` is, for error messages (e.g. the file it was read from).

        Raises:
            InputError: ``config`` is not a dict, lacks a field or has a key that is no field
                (e.g. settings written by another version of ``train``).
        """
        if not isinstance(config, dict):
            raise InputError(f"{source}: expected an object of training settings, got {type(config).__name__}")
        names = {f.name for f in fields(cls)}
        missing, unknown = sorted(names - set(config)), sorted(set(config) - names)
        if missing or unknown:
            detail = [f"{what} {', '.join(keys)}" for what, keys in (("lack", missing), ("have unknown", unknown)) if keys]
            raise InputError(f"{source}: {' and '.join(detail)}; expected the settings written by this version of `train`")
        return cls(**config)

    def check(self) -> None:
        """Raise :class:`InputError` for inconsistent or out-of-range settings."""
        self._check_model()
        self._check_training()

    def _check_model(self) -> None:
        """The arch and its task, its BatchNormalization momentum, the counts and sizes."""
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

    def _check_training(self) -> None:
        """The sampling, runtime and optimizer settings."""
        if not 0.0 <= self.positive_fraction <= 1.0:
            raise InputError(f"positive_fraction {self.positive_fraction}: expected a value in [0, 1]")
        if not 0.0 <= self.hard_negative_fraction < 1.0:
            raise InputError(f"--hard-negative-fraction {self.hard_negative_fraction}: expected a value in [0, 1)")
        if self.init_from is not None and self.weights is not None:
            raise InputError("--init-from and --weights exclude each other (a fine-tune starts from its parent's weights)")
        if self.precision not in TRAIN_PRECISIONS:
            raise InputError(f"--precision {self.precision}: expected one of {', '.join(TRAIN_PRECISIONS)}")
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
    parent = _parent(config)
    strategy = make_strategy(config.strategy)  # the first TF call (multi-worker needs that)
    cohort, splits, train_cases, val_cases = _fold(config)
    _check_negatives_folder(config, cohort, train_cases)
    cached_train = cache.ensure_cached(cohort, train_cases, cache_dir)
    cached_val = cache.ensure_cached(cohort, val_cases, cache_dir)
    _check_hard_slices(config, cached_train)
    rule = _checkpoint_rule(config, cached_val)
    record = _record(config, splits=splits, train_cases=train_cases, val_cases=val_cases,
                     cached=cached_train + cached_val, strategy=strategy)
    record["checkpoint"] = rule.record()
    record.update(_provenance(cohort, parent, train_cases, val_cases))
    run = out if chief else worker_scratch(out, resume=resume)
    try:
        if chief:
            _prepare_run(run, record, resume=resume, overwrite=overwrite)
        job = _Job(config=config, run=run, record=record, train_cases=cached_train, val_cases=cached_val,
                   strategy=strategy, rule=rule)
        with _precision(config.precision):
            trained = _fit(job)  # every worker trains
        if chief and (trained or not (run / CALIBRATION_FILE).is_file()):
            from bonemets_tf.calibrate import calibrate_run

            calibrate_run(run, cached_val, batch_size=config.batch_size)
        return out
    finally:
        if not chief:
            shutil.rmtree(run, ignore_errors=True)


def _parent(config: TrainConfig):
    """The ``init_from`` RUN (None without one), checked against ``config``'s architecture.

    Raises:
        InputError: not a RUN folder, or settings that differ from its architecture.
    """
    if config.init_from is None:
        return None
    from bonemets_tf.lineage import inherited_settings, parent_run

    parent = parent_run(config.init_from)
    given = {k: getattr(config, k) for k in ("task", "arch", "width", "context", "image_size", "weights")}
    inherited_settings(parent, given)  # raises on a difference
    return parent


def _check_negatives_folder(config: TrainConfig, cohort: Cohort, train_cases: list[str]) -> None:
    """Refuse ``hard_negative_fraction`` without hard-negative maps for the training cases."""
    if config.hard_negative_fraction <= 0:
        return
    option = f"--hard-negative-fraction {config.hard_negative_fraction:g}"
    if not cohort.negatives_dir.is_dir():
        raise InputError(f"{option}: {cohort.negatives_dir} not found; expected hard-negative maps "
                         f"negativesTr/<case>.nii.gz (written by import-reviews)")
    if not any(cohort.has_negatives(c) for c in train_cases):
        raise InputError(f"{option}: none of fold {config.fold}'s {len(train_cases)} training cases has a "
                         f"hard-negative map in {cohort.negatives_dir}")


def _check_hard_slices(config: TrainConfig, cached: list[CachedCase]) -> None:
    if config.hard_negative_fraction > 0 and not any(any(c.hard) for c in cached):
        raise InputError(f"--hard-negative-fraction {config.hard_negative_fraction:g}: the hard-negative maps of "
                         f"fold {config.fold}'s training cases are empty; expected some voxels marked 1")


def _provenance(cohort: Cohort, parent, train_cases: list[str], val_cases: list[str]) -> dict[str, Any]:
    """``config.json``'s ``init_from``/``lineage`` (a fine-tune) and ``review_set`` entries."""
    from bonemets_tf.lineage import lineage_record

    import hashlib

    out: dict[str, Any] = lineage_record(parent) if parent is not None else {}
    cases = set(cohort.review_set())
    if cases:
        out["review_set"] = {"file": str(cohort.reviews_path.resolve()),
                             "sha256": hashlib.sha256(cohort.reviews_path.read_bytes()).hexdigest(),
                             "cases": len(cases), "train": sorted(cases & set(train_cases)),
                             "val": sorted(cases & set(val_cases))}
    return out


def _fold(config: TrainConfig) -> tuple[Cohort, dict[str, Any] | None, list[str], list[str]]:
    """The cohort, its ``splits.json`` (None: none) and the training and validation cases of ``config.fold``."""
    cohort = Cohort(config.dataset)
    cohort.require_exists()
    splits = cohort.splits()
    if splits is None:
        log.warning("%s has no splits.json: every case trains and validates (no test set)", cohort.root)
    train_cases, val_cases = fold_cases(splits, config.fold, cohort.cases())
    if not train_cases or not val_cases:
        raise InputError(f"{cohort.root}: fold {config.fold} has no training or no validation cases")
    return cohort, splits, train_cases, val_cases


def _checkpoint_rule(config: TrainConfig, val_cases: list[CachedCase]) -> CheckpointRule:
    """The rule choosing ``model.keras``; says in one line when the validation cases hold no lesion."""
    rule = CheckpointRule.for_validation(config.task, any(any(c.positive) for c in val_cases))
    if rule.monitor is None:
        log.warning("train %s fold %d: validation case(s) %s hold no lesion voxel; model.keras will be the last "
                    "epoch's, not the best by validation %s, undefined without lesion (config.json \"checkpoint\")",
                    config.arch, config.fold, ", ".join(c.case for c in val_cases), MONITOR[config.task][4:])
    return rule


@dataclass(frozen=True)
class _Job:
    """What every worker fits.

    Attributes:
        config: the settings.
        run: RUN folder (a scratch folder on a non-chief worker).
        record: the run's ``config.json`` content (``runtime.jit_compile`` is read when compiling).
        train_cases: cached training cases.
        val_cases: cached validation cases.
        strategy: the tf.distribute strategy (:func:`bonemets_tf.distribute.make_strategy`).
        rule: which epoch becomes ``model.keras``.
    """

    config: TrainConfig
    run: Path
    record: dict[str, Any]
    train_cases: list[CachedCase]
    val_cases: list[CachedCase]
    strategy: Any
    rule: CheckpointRule


def _fit(job: _Job) -> bool:
    """Train up to ``job.config.epochs``; False when the run had already got there.

    Raises:
        InputError: a batch size that the replicas cannot share.
        TrainingFailed: the collapse guard gave up (:mod:`bonemets_tf.guard`).
    """
    import keras
    import tensorflow as tf

    config = job.config
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    state = RunState.load(job.run)
    if state.epoch >= config.epochs:
        log.info("%s: already trained for %d epochs; nothing to do", job.run, state.epoch)
        return False
    replicas = job.strategy.num_replicas_in_sync
    if config.batch_size % replicas != 0:
        raise InputError(f"--batch-size {config.batch_size}: must be a multiple of the {replicas} replicas")
    stream, val_ds = _pipelines(job)
    with job.strategy.scope():
        model, trainer = _build(job, state, stream)
    _record_params(job.run, model)
    guard = CollapseGuard(config.task, job.rule.monitor) if config.guard else None
    if guard is not None and state.epoch == 0:
        state.save_good(trainer, 0)
    log.info("training %s (%s) for epochs %d..%d, %d steps of %d", config.arch, config.task,
             state.epoch + 1, config.epochs, config.steps_per_epoch, config.batch_size)
    fitting = _Fitting(job=job, state=state, model=model, trainer=trainer, guard=guard, stream=stream, val_ds=val_ds)
    fitting.fit_epochs()
    if guard is not None:
        fitting.judge()
    write_checkpoint(job.run, job.rule, state)
    return True


def _pipelines(job: _Job) -> tuple[Callable[..., Any], Any]:
    """This worker's training stream (a function of the index of its first element) and the
    validation dataset."""
    from bonemets_tf import data

    config = job.config
    sampling = data.Sampling(config.task, image_size=config.image_size,
                             positive_fraction=config.positive_fraction, lesion_crop_p=config.lesion_crop_p,
                             hard_negative_fraction=config.hard_negative_fraction)
    train_store = data.SliceStore(job.train_cases, context=config.context,
                                  negatives=config.hard_negative_fraction > 0)
    val_store = data.SliceStore(job.val_cases, context=config.context)

    def stream(start: int = 0):
        return data.training_dataset(train_store, sampling, batch_size=config.batch_size, seed=config.seed,
                                     stream=worker_index(job.strategy), start=start)

    val_ds = data.validation_dataset(val_store, config.task, batch_size=config.batch_size,
                                     image_size=config.image_size, max_slices=config.val_max_slices)
    return stream, val_ds


def _build(job: _Job, state: RunState, stream: Callable[..., Any]) -> tuple[Any, Any]:
    """The model (probability output, saved as ``model.keras``) and what Keras fits (its logit
    view with ``logit_loss``, else the model), compiled and, on resume, restored. Call it in
    the strategy's scope."""
    import keras

    from bonemets_tf.models.registry import build_model

    config = job.config
    model = build_model(config.arch, context=config.context, width=config.width,
                        image_size=config.image_size, weights=config.weights)
    if config.init_from is not None and state.epoch == 0:  # a resumed fine-tune restores its own checkpoint
        from bonemets_tf.models.registry import load_weights

        load_weights(model, Path(config.init_from) / MODEL_FILE, option="--init-from")
    if config.bn_momentum is not None:
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = config.bn_momentum
    if (state.epoch == 0 and config.prior_bias and config.task != DETECT and config.weights is None
            and config.init_from is None):
        _set_prior_bias(model, _lesion_prior(stream()))
    trainer = _training_view(model, config.task) if config.logit_loss else model
    _compile(trainer, config, job.record, state.lr_scale)
    if state.epoch > 0:
        state.restore(trainer)
        if config.guard and state.pending_event is not None:  # killed between an event and its restore
            state.restore_good(trainer)
            state.pending_event = None
    return model, trainer


@dataclass(frozen=True)
class _Fitting:
    """One worker fitting a job: its models, progress, guard and pipelines.

    Attributes:
        job: what is fitted.
        state: the run's progress (updated in place by :class:`RunCheckpoint`).
        model: the probability model (``model.keras``).
        trainer: the Keras model that is fitted (``model`` or its logit view).
        guard: the collapse guard (None: off).
        stream: this worker's training stream from an element index (see :func:`_pipelines`).
        val_ds: the validation dataset.
    """

    job: _Job
    state: RunState
    model: Any
    trainer: Any
    guard: CollapseGuard | None
    stream: Callable[..., Any]
    val_ds: Any

    def fit_epochs(self) -> None:
        """Fit up to ``epochs``; after each guard event restore the last good epoch and go on.

        Raises:
            TrainingFailed: more than :data:`~bonemets_tf.guard.GUARD_MAX_EVENTS` events.
        """
        while True:
            self._fit_once()
            event = self.state.pending_event
            if self.guard is None or event is None or not self._restart(event):
                return

    def _fit_once(self) -> None:
        """One ``fit`` from the last completed epoch (a guard event stops it early)."""
        import keras

        config, run, state = self.job.config, self.job.run, self.state
        callbacks = [RunCheckpoint(run, state, self.job.rule, model=self.model, guard=self.guard)]
        if importlib.util.find_spec("tensorboard") is not None:
            callbacks.append(keras.callbacks.TensorBoard(log_dir=str(run / LOGS_DIR), write_graph=False,
                                                         profile_batch=0))
        # tf.distribute splits each batch of every worker's pipeline into num_replicas_in_sync
        # pieces and a worker takes its replicas' share per step: every pipeline yields global
        # batches, and a worker consumes batch_size / workers of its stream per step. The
        # stream continues after the last completed epoch (resume, guard restart).
        workers = num_workers(self.job.strategy)
        ds = self.stream(state.epoch * config.steps_per_epoch * (config.batch_size // workers))
        with keras_multiworker_fixes(self.trainer, ds) if workers > 1 else contextlib.nullcontext():
            self.trainer.fit(ds, epochs=config.epochs, initial_epoch=state.epoch,
                             steps_per_epoch=config.steps_per_epoch, validation_data=self.val_ds,
                             callbacks=callbacks, shuffle=False, verbose=1 if sys.stdout.isatty() else 2)

    def _restart(self, event: dict[str, Any]) -> bool:
        """Handle a guard event: restore the last good epoch at the lower rate; False when
        training is over (the event was in the last epoch)."""
        config, run, state = self.job.config, self.job.run, self.state
        if len(state.guard_events) > GUARD_MAX_EVENTS:
            _fail(run, state, config, f"{len(state.guard_events)} collapses (last: {event['reason']}), "
                                      f"learning rate down to x{state.lr_scale:g}")
        state.pending_event = None
        if state.epoch >= config.epochs:
            state.commit()
            return False
        with self.job.strategy.scope():
            _compile(self.trainer, config, self.job.record, state.lr_scale)
            state.restore_good(self.trainer)
            self.trainer.optimizer.iterations.assign(state.epoch * config.steps_per_epoch)
        state.commit()
        log.warning("%s epoch %d: %s; restored epoch %d, learning rate x%g", config.arch, event["epoch"],
                    event["reason"], event["restored_epoch"], event["lr_scale"])
        return True

    def judge(self) -> None:
        """Record the guard's outcome; fail a run where the guard acted and the model did not learn.

        Raises:
            TrainingFailed: the guard acted and the best validation value is not above the
                empty-prediction level (:func:`bonemets_tf.run.learned`; not judged when the
                validation cases hold no lesion).
        """
        config, run, state, monitor = self.job.config, self.job.run, self.state, self.job.rule.monitor
        ok = monitor is None or learned(config.task, state.best)  # without lesion in validation: not judged
        if state.guard_events and not ok:
            best = "none" if state.best is None else f"{state.best:.4f}"
            _fail(run, state, config, f"validation {monitor[4:]} never rose above its empty-prediction level "
                                      f"{EMPTY_LEVEL[config.task]:g} (best {best})")
        write_guard(run, state.guard_events, state.lr_scale, "recovered" if state.guard_events else "ok")
        if not ok:
            log.warning("%s did not learn: best %s %s, not above its empty-prediction level %g + %g "
                        "(too short for the collapse guard to act)", config.arch, monitor, state.best,
                        EMPTY_LEVEL[config.task], LEARNED_MARGIN[config.task])


def _fail(run: Path, state: RunState, config: TrainConfig, why: str) -> None:
    """Record the failure, remove ``model.keras`` and raise :class:`TrainingFailed`."""
    write_guard(run, state.guard_events, state.lr_scale, "failed")
    (run / MODEL_FILE).unlink(missing_ok=True)
    raise TrainingFailed(f"train {config.arch}: did not learn: {why}; {run / MODEL_FILE} removed "
                         f"(history in {run / HISTORY_FILE}; try a lower --lr)")


def _compile(trainer, config: TrainConfig, record: dict[str, Any], lr_scale: float) -> None:
    """Compile ``trainer`` with this run's loss, metrics and optimizer (rate times ``lr_scale``)."""
    import keras

    clip = {"global_clipnorm": config.clip_norm} if config.clip_norm is not None else {}
    loss, metrics = _loss_and_metrics(config)
    trainer.compile(optimizer=keras.optimizers.Adam(_learning_rate(config, lr_scale), **clip), loss=loss,
                    metrics=metrics, jit_compile=record["runtime"]["jit_compile"], run_eagerly=config.run_eagerly)


def _loss_and_metrics(config: TrainConfig) -> tuple[Any, list[Any]]:
    """The task's loss and metrics (on logits with ``logit_loss``); ``pos_frac`` feeds the guard."""
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
    return loss, metrics


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


# --- the RUN's config.json -------------------------------------------------------------


def _record(config: TrainConfig, *, splits: dict[str, Any] | None, train_cases: list[str], val_cases: list[str],
            cached: list[CachedCase], strategy) -> dict[str, Any]:
    """The content of ``config.json`` (see the module docstring)."""

    return {
        "settings": {**config.get_config(), "dataset": str(Path(config.dataset).resolve())},
        "split": {"fold": config.fold, "train": list(train_cases), "val": list(val_cases),
                  "test": sorted(splits["test"]) if splits else [], "splits_seed": splits.get("seed") if splits else None},
        "dataset_fingerprint": cache.fingerprint(cached),
        "case_keys": {c.case: c.key for c in cached},
        # the slice cache holds every case in this orientation (bonemets_tf.cache); predict
        # reorients its input the same way and refuses RUNs without this record
        "orientation": CANONICAL,
        "spacing": training_spacing(Cohort(config.dataset), train_cases),
        "runtime": _runtime(config, strategy),
        "model": {"stride": CATALOG[config.arch].stride, "input": "raw HU (batch, rows, cols, context)",
                  "output": "sigmoid probability " + ("(batch, 1)" if config.task == DETECT else "(batch, rows, cols, 1)")},
        "versions": versions("tensorflow", "keras", "numpy"),
    }


def training_spacing(cohort: Cohort, cases: list[str]) -> dict[str, Any]:
    """``config.json["spacing"]``: the in-plane pixel spacing a model is trained at, the median over
    its training cases' canonical views (``(x, y)`` mm), which ``predict`` resamples each CT to
    (:func:`analysis.prediction.runner.network_grid`). Slices are fed at their own spacing in
    training, so a cohort of mixed spacings trains at its median (nnU-Net's plans take the
    median spacing as the target too)."""
    from analysis.imaging.resample import median_spacing_xy

    xy = median_spacing_xy([cohort.image_path(c) for c in cases])
    return {"in_plane_xy_mm": [round(v, 6) for v in xy], "source": f"median over the {len(cases)} training cases"}


def _runtime(config: TrainConfig, strategy) -> dict[str, Any]:
    """What the run resolved at start: XLA on or off, the strategy, replicas, workers and GPUs."""
    import tensorflow as tf

    gpus = len(tf.config.list_physical_devices("GPU"))
    jit = False if config.run_eagerly else (config.jit if config.jit is not None else bool(gpus))
    return {"jit_compile": jit, "strategy": strategy_name(strategy), "replicas": int(strategy.num_replicas_in_sync),
            "workers": num_workers(strategy), "gpus": gpus}


def _prepare_run(run: Path, record: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
    """Write a new run's ``config.json`` (emptying ``run`` first with ``overwrite``), or check a
    resumed run's against ``record``."""
    config_path = run / CONFIG_FILE
    if resume and config_path.is_file():
        _check_resume(run, read_json(config_path, what="run config"), record)
        return
    if overwrite and run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(config_path, record)


def _check_resume(run: Path, saved: dict[str, Any], record: dict[str, Any]) -> None:
    """Refuse a resume whose settings (:data:`RESUME_MUST_MATCH`) or dataset files differ from
    the saved run's; record a new ``epochs``.

    Raises:
        InputError: the saved settings differ, or are not this version's (:meth:`TrainConfig.from_config`).
    """
    config_path = run / CONFIG_FILE
    now = TrainConfig.from_config(record["settings"])
    before = TrainConfig.from_config(saved.get("settings"), source=f"--resume {run}: {config_path} settings")
    differ = [k for k in RESUME_MUST_MATCH if getattr(before, k) != getattr(now, k)]
    if saved.get("dataset_fingerprint") != record["dataset_fingerprint"]:
        differ.append("dataset files (fingerprint)")
    if differ:
        raise InputError(f"--resume {run}: settings differ from the saved run: {', '.join(differ)}; "
                         f"repeat the original command (only --epochs may change)")
    if before.epochs != now.epochs:
        atomic_write_json(config_path, {**saved, "settings": {**saved["settings"], "epochs": now.epochs}})


def _record_params(run: Path, model) -> None:
    """Add the built model's parameter count (at this run's width) to ``config.json["model"]``."""
    config_path = run / CONFIG_FILE
    if not config_path.is_file():  # a non-chief worker's scratch folder
        return
    saved = read_json(config_path, what="run config")
    params = int(model.count_params())
    if saved.get("model", {}).get("params") != params:
        atomic_write_json(config_path, {**saved, "model": {**saved.get("model", {}), "params": params}})


@contextlib.contextmanager
def _precision(policy: str) -> Iterator[None]:
    """Set Keras's global dtype policy for the block."""
    import keras

    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
