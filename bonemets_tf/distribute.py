"""tf.distribute for training: the strategy of ``--strategy``, ``TF_CONFIG`` and the workers.

``auto`` trains on the default device, ``mirrored`` on every local GPU (or the logical CPU
devices), ``multiworker`` on a ``TF_CONFIG`` cluster where only the chief writes RUN and
every other worker trains in a scratch folder (:func:`worker_scratch`). Keras 3 cannot
``fit`` under MultiWorkerMirroredStrategy as released; :func:`keras_multiworker_fixes`
patches that for one ``fit``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from analysis.errors import InputError
from analysis.imaging.io import read_json
from bonemets_tf.checkpoint import RunState
from bonemets_tf.choices import STRATEGIES

log = logging.getLogger(__name__)


def make_strategy(name: str) -> Any:
    """The tf.distribute strategy for ``--strategy`` (``TF_CONFIG`` was checked by :func:`is_chief`).

    ``mirrored`` replicates over every local GPU; on a machine without GPUs it uses the
    logical CPU devices (one, unless a caller split the CPU with
    ``tf.config.set_logical_device_configuration`` before any TF op, as the tests do).

    Args:
        name: one of :data:`bonemets_tf.choices.STRATEGIES`.
    """
    import tensorflow as tf

    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or \
            [d.name for d in tf.config.list_logical_devices("CPU")]
        log.info("mirrored strategy over %d device(s): %s", len(devices), ", ".join(devices))
        return tf.distribute.MirroredStrategy(devices)
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def strategy_name(strategy) -> str:
    """tf.distribute's public name of ``strategy`` (MultiWorkerMirroredStrategy's class is
    CollectiveAllReduceStrategy; the default strategy's is private)."""
    name = type(strategy).__name__
    return {"CollectiveAllReduceStrategy": "MultiWorkerMirroredStrategy",
            "_DefaultDistributionStrategy": "default"}.get(name, name)


def num_workers(strategy) -> int:
    """Processes training together (1 outside a multi-worker cluster)."""
    spec = _cluster(strategy)
    return len(spec.get("worker", [])) + len(spec.get("chief", [])) if spec else 1


def worker_index(strategy) -> int:
    """This process's place among :func:`num_workers` (chief first; 0 outside a cluster)."""
    spec = _cluster(strategy)
    if not spec:
        return 0
    resolver = strategy.cluster_resolver
    offset = len(spec.get("chief", [])) if resolver.task_type == "worker" else 0
    return offset + int(resolver.task_id or 0)


def _cluster(strategy) -> dict[str, Any]:
    """The strategy's cluster spec as a dict (empty without a cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return resolver.cluster_spec().as_dict() if resolver is not None else {}


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
    source, target = RunState(run=out), RunState(run=scratch)
    if resume and source.state_path.is_file():
        epoch = int(read_json(source.state_path, what="checkpoint state")["epoch"])
        target.folder.mkdir()
        if epoch > 0:
            shutil.copy2(source.weights_path(epoch), target.weights_path(epoch))
        shutil.copy2(source.state_path, target.state_path)
        log.info("worker resumes from the chief's epoch %d (%s)", epoch, source.state_path)
    elif resume:
        log.warning("%s is not visible on this worker: it starts from epoch 0; resuming a multi-worker run "
                    "needs RUN on a filesystem shared by all workers", source.state_path)
    return scratch


@contextlib.contextmanager
def keras_multiworker_fixes(model, train_ds) -> Iterator[None]:
    """Work around two Keras 3 bugs that stop ``fit`` under MultiWorkerMirroredStrategy, for
    this fit only (present in the pinned Keras 3.15.1; keras-team/keras#20585, and the second
    one reported as tensorflow/tensorflow#72388). Both are in
    ``keras/src/backend/tensorflow/trainer.py``:

    1. ``TensorFlowTrainer._maybe_symbolic_build`` takes the first batch of the distributed
       iterator and reduces it across workers (``distribute_strategy.reduce("MEAN", ...,
       axis=None)``) to build the model symbolically ("Attempt to convert a value
       (PerReplica...)"). The model, loss and metrics are built here from one batch of this
       worker's own undistributed pipeline instead (the pipeline is indexed by element:
       reading it does not shift what training reads), and the symbolic build in ``fit`` is
       skipped.
    2. The module function ``reduce_per_replica``, for a multi-worker collective strategy
       (``_collective_all_reduce_multi_worker``) and reduction ``"mean"``, calls
       ``strategy.reduce("MEAN", v, axis=0)`` on every step's logs, also on the scalar loss
       and metrics ("Invalid reduction dimension 0 for input with 0 dimensions"). Scalars are
       reduced with ``axis=None`` (the mean over replicas); other values as Keras does.

    Args:
        model: the compiled Keras model about to be fitted.
        train_ds: its training dataset (this worker's pipeline, not distributed).
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
