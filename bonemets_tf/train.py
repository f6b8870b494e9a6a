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
    RUN/calibration.json   segmenters: validation per-slice Dice of each probability threshold
                           and the best one (``predict --threshold auto``; see
                           :mod:`bonemets_tf.calibrate`)

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
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from analysis.cohort import Cohort, fold_cases
from analysis.errors import InputError
from analysis.io import atomic_write_json, atomic_write_text, check_output_folder, read_json
from bonemets_tf.models.catalog import CATALOG, DETECT
from bonemets_tf.run import CALIBRATION_FILE

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("auto", "mirrored", "multiworker")

#: Settings that must match when resuming a run (the others, e.g. epochs, may change).
RESUME_MUST_MATCH = ("dataset", "task", "arch", "fold", "batch_size", "steps_per_epoch", "image_size",
                     "width", "context", "lr", "seed", "precision", "positive_fraction", "lesion_crop_p", "bn_momentum",
                     "lr_schedule")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting; written to ``RUN/config.json`` under ``"settings"``.

    Attributes:
        dataset: cohort folder (see :mod:`analysis.cohort`).
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
        if chief and config.task != DETECT and (trained or not (run / CALIBRATION_FILE).is_file()):
            from bonemets_tf.calibrate import calibrate_run

            calibrate_run(run, cached_val, batch_size=config.batch_size)
        return out
    finally:
        if not chief:
            shutil.rmtree(run, ignore_errors=True)


def _fit(config, run, record, cached_train, cached_val, strategy, tf, data) -> bool:
    """Train up to ``config.epochs``; False when the run had already got there."""
    import keras

    from bonemets_tf.losses import DiceBCELoss, DiceScore, WeightedBCELoss
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
    start = state.epoch * config.steps_per_epoch * worker_share
    train_ds = data.training_dataset(train_store, sampling, batch_size=config.batch_size, seed=config.seed,
                                     stream=_worker_index(strategy), start=start)
    val_ds = data.validation_dataset(val_store, config.task, batch_size=config.batch_size,
                                     image_size=config.image_size, max_slices=config.val_max_slices)
    with strategy.scope():
        model = build_model(config.arch, context=config.context, width=config.width,
                            image_size=config.image_size, weights=config.weights)
        if config.bn_momentum is not None:
            for layer in model.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.momentum = config.bn_momentum
        if config.task == DETECT:
            f = sampling.positive_fraction
            loss = WeightedBCELoss(pos_weight=(1.0 - f) / f if 0.0 < f < 1.0 else 1.0)
            metrics = [keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")]
        else:
            loss, metrics = DiceBCELoss(), [DiceScore(name="dice")]
        model.compile(optimizer=keras.optimizers.Adam(_learning_rate(config)), loss=loss, metrics=metrics,
                      jit_compile=record["runtime"]["jit_compile"], run_eagerly=config.run_eagerly)
        if state.epoch > 0:
            state.restore(model)
    _record_params(run, model)
    monitor = "val_auc" if config.task == DETECT else "val_dice"
    callbacks = [RunCheckpoint(run, state, monitor)]
    if importlib.util.find_spec("tensorboard") is not None:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(run / "logs"), write_graph=False, profile_batch=0))
    else:
        log.warning("TensorBoard logs skipped: the tensorboard package is not installed")
    log.info("training %s (%s) for epochs %d..%d, %d steps of %d", config.arch, config.task,
             state.epoch + 1, config.epochs, config.steps_per_epoch, config.batch_size)
    with _keras_multiworker_fixes(model, train_ds) if workers > 1 else contextlib.nullcontext():
        model.fit(train_ds, epochs=config.epochs, initial_epoch=state.epoch, steps_per_epoch=config.steps_per_epoch,
                  validation_data=val_ds, callbacks=callbacks, shuffle=False,
                  verbose=1 if sys.stdout.isatty() else 2)
    return True


def _learning_rate(config: TrainConfig):
    """Adam's learning rate: a float, or a schedule over the global step (the optimizer's
    ``iterations``, restored on ``--resume``, so a resumed run continues the same curve)."""
    import keras

    if config.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(config.lr, decay_steps=config.epochs * config.steps_per_epoch,
                                                      alpha=0.01)
    return config.lr


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
    """

    run: Path
    epoch: int = 0
    best: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, float]] | None = None

    @property
    def folder(self) -> Path:
        return self.run / "checkpoints"

    def weights_path(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch:04d}.weights.h5"

    def best_path(self, epoch: int) -> Path:
        return self.folder / f"best-{epoch:04d}.keras"

    @classmethod
    def load(cls, run: Path) -> "RunState":
        """Read the committed state and tidy files written after it (by a killed process)."""
        path = run / "checkpoints" / "state.json"
        state = cls(run=run, history=[])
        if path.is_file():
            saved = read_json(path, what="checkpoint state")
            state = cls(run=run, epoch=int(saved["epoch"]), best=saved["best"], best_epoch=saved["best_epoch"],
                        history=list(saved["history"]))
        if state.folder.is_dir():
            for p in state.folder.iterdir():  # finish or discard what followed the last commit
                if p.name.startswith("best-") and state.best_epoch is not None and p == state.best_path(state.best_epoch):
                    os.replace(p, run / "model.keras")
                elif p.name != "state.json" and p != state.weights_path(state.epoch):
                    p.unlink() if p.is_file() else shutil.rmtree(p, ignore_errors=True)
        state.write_history()
        return state

    def restore(self, model) -> None:
        """Load model weights and optimizer state of the last completed epoch."""
        model.optimizer.build(model.trainable_variables)
        model.load_weights(self.weights_path(self.epoch))
        log.info("resumed from %s (epoch %d)", self.weights_path(self.epoch), self.epoch)

    def commit(self) -> None:
        atomic_write_json(self.folder / "state.json", {
            "epoch": self.epoch, "best": self.best, "best_epoch": self.best_epoch, "history": self.history})

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

    Args:
        run: RUN folder.
        state: the run's state (updated in place).
        monitor: validation log key to maximise (e.g. ``"val_dice"``).
    """

    def __init__(self, run: Path, state: RunState, monitor: str) -> None:
        super().__init__()
        self.run, self.state, self.monitor = run, state, monitor

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = {k: float(v) for k, v in (logs or {}).items()}
        done = epoch + 1
        st = self.state
        st.folder.mkdir(parents=True, exist_ok=True)
        _save_atomic(lambda p: self.model.save_weights(p), st.weights_path(done))
        value = logs.get(self.monitor, float("nan"))
        improved = st.best is None or (math.isfinite(value) and (not math.isfinite(st.best) or value > st.best))
        if improved:
            _save_atomic(lambda p: self.model.save(p), st.best_path(done))
            st.best, st.best_epoch = (value if math.isfinite(value) else float("-inf")), done
        previous = st.epoch
        st.epoch = done
        st.history = [row for row in st.history if row["epoch"] < done] + [{"epoch": done, **logs}]
        st.commit()
        if improved:
            os.replace(st.best_path(done), self.run / "model.keras")
        if previous != done and st.weights_path(previous).exists():
            st.weights_path(previous).unlink()
        st.write_history()


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
