"""Reading a RUN folder written by ``train`` (see :mod:`bonemets_tf.train` for its layout).

:func:`read_run` checks the folder and its ``config.json`` without importing TensorFlow,
so commands can validate every input before any heavy work or output;
:meth:`RunInfo.load_model` then loads ``model.keras`` with the project's custom layers
and losses registered.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.errors import InputError
from analysis.evaluation.learned import EMPTY_LEVEL, LEARNED_MARGIN, learned  # noqa: F401  (the rule both wings use)
from analysis.imaging.io import read_json
from bonemets_tf.models.catalog import CATALOG, DETECT, SEGMENT

MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
#: A SavedModel written by ``export``: the graph, and the RUN's config as an asset.
SAVEDMODEL_FILE = "saved_model.pb"
CONFIG_ASSET = "bonemets_config.json"
#: Validation score of each threshold and the chosen one (:mod:`bonemets_tf.calibrate`).
CALIBRATION_FILE = "calibration.json"
HISTORY_FILE = "history.csv"
#: Resumable training state: ``state.json`` (:data:`STATE_FILE`) and weight files (:mod:`bonemets_tf.checkpoint`).
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"
#: TensorBoard logs (when the tensorboard package is installed).
LOGS_DIR = "logs"
#: The validation metric whose highest value picks ``model.keras`` when validation holds
#: lesion (``config.json["checkpoint"]``; see :class:`bonemets_tf.checkpoint.CheckpointRule`).
MONITOR = {SEGMENT: "val_dice", DETECT: "val_auc"}
#: The collapse guard: validation within this much of :data:`EMPTY_LEVEL` is "at the empty level".
EMPTY_MARGIN = {SEGMENT: 0.01, DETECT: 0.02}
#: Characters of the parent's fingerprint shown in a fine-tuned model's name (:attr:`RunInfo.name`).
NAME_DIGITS = 8


@dataclass(frozen=True)
class RunInfo:
    """What a RUN folder says about its model.

    Attributes:
        path: the RUN folder (resolved).
        config: the whole ``config.json`` (``settings``, ``split``, ``versions``, ...).
        arch: registry name.
        task: ``"detect"`` or ``"segment"``.
        context: adjacent slices per input (odd); channel ``context // 2`` is the centre slice.
        image_size: detector resize side (detectors resize inside the model) / segmenter
            training crop side (segmenters run on whole slices).
        stride: total downsampling of a segmenter (the model pads to it internally).
        kind: ``"run"`` (a RUN folder) or ``"savedmodel"`` (a SavedModel from ``export``).
    """

    path: Path
    config: dict[str, Any]
    arch: str
    task: str
    context: int
    image_size: int
    stride: int
    kind: str = "run"

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def name(self) -> str:
        """The model's name: its arch, and for a fine-tune (``train --init-from``,
        :mod:`bonemets_tf.lineage`) the parent it was fine-tuned from, e.g. ``unet fine-tuned
        from 1a2b3c4d`` (the start of the parent's fingerprint; ASCII, within the 64 characters
        of a DICOM AlgorithmName)."""
        parent = self.config.get("init_from")
        if isinstance(parent, dict) and isinstance(parent.get("fingerprint"), str):
            return f"{self.arch} fine-tuned from {parent['fingerprint'][:NAME_DIGITS]}"
        return self.arch

    @property
    def lineage(self) -> list[dict[str, Any]]:
        """The RUNs this one was fine-tuned from, oldest first (empty for a model trained from scratch)."""
        lineage = self.config.get("lineage")
        return [a for a in lineage if isinstance(a, dict)] if isinstance(lineage, list) else []

    def describe(self) -> dict[str, Any]:
        """Summary for provenance records (``predict.json``, exports)."""
        settings = self.config.get("settings", {})
        spacing, source = self.training_spacing()
        return {"run": str(self.path), "kind": self.kind, "name": self.name, "arch": self.arch, "task": self.task,
                "context": self.context, "image_size": self.image_size, "width": settings.get("width"),
                "fold": settings.get("fold"), "seed": settings.get("seed"), "lineage": self.lineage,
                "spacing_xy_mm": None if spacing is None else list(spacing), "spacing_source": source}

    def training_spacing(self) -> tuple[tuple[float, float] | None, str]:
        """The in-plane pixel spacing ``(x, y)`` mm this model was trained at, and where it comes from.

        ``config.json["spacing"]`` (:func:`bonemets_tf.train.training_spacing`); for a RUN trained
        before it was recorded, the median over its training cases (``split.train``) in the
        dataset its config names, when that folder is still there; else None (the model then runs
        at each input's own spacing, and ``predict`` says so once).
        """
        recorded = self.config.get("spacing")
        xy = recorded.get("in_plane_xy_mm") if isinstance(recorded, dict) else None
        if isinstance(xy, list) and len(xy) == 2 and all(isinstance(v, (int, float)) and v > 0 for v in xy):
            return (float(xy[0]), float(xy[1])), f"{CONFIG_FILE}: {recorded.get('source', 'recorded')}"
        dataset = self.config.get("settings", {}).get("dataset")
        cases = self.config.get("split", {}).get("train") or []
        if dataset and cases:
            from analysis.cohort.layout import Cohort
            from analysis.imaging.resample import median_spacing_xy

            paths = [Cohort(dataset).image_path(c) for c in cases]
            if all(p.is_file() for p in paths):
                try:
                    xy = median_spacing_xy(paths)
                except InputError:
                    xy = None
                if xy is not None:
                    return xy, f"median over the {len(paths)} training cases in {dataset} ({CONFIG_FILE} records none)"
        return None, f"not recorded in {CONFIG_FILE} and its training cases are not at {dataset or 'a known dataset'}"

    def budget(self) -> dict[str, Any]:
        """What the model was trained with (:func:`analysis.prediction.request.training_budget`): width,
        ``epochs * steps_per_epoch`` steps of ``batch_size`` crops (segmenters) or resized slices
        (detectors) of ``image_size``^2, from ``config.json``'s settings, and the pixel spacing it was
        trained at (:meth:`training_spacing`)."""
        from analysis.prediction.request import training_budget

        settings = self.config.get("settings", {})
        epochs, per_epoch = settings.get("epochs"), settings.get("steps_per_epoch")
        steps = None if epochs is None or per_epoch is None else int(epochs) * int(per_epoch)
        return training_budget(width=settings.get("width"), steps=steps, batch_size=settings.get("batch_size"),
                               patch=(self.image_size, self.image_size), spacing_xy=self.training_spacing()[0])

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the model file (``model.keras`` or ``saved_model.pb``) and its config."""
        import hashlib

        h = hashlib.sha256()
        model = self.path / (SAVEDMODEL_FILE if self.kind == "savedmodel" else MODEL_FILE)
        with open(model, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        h.update(json.dumps(self.config, sort_keys=True).encode("utf-8"))
        return h.hexdigest()[:16]

    def load_model(self):
        """Load ``model.keras`` (uncompiled) as a ``keras.Model``.

        Raises:
            InputError: the file cannot be loaded as a Keras model (or this is a SavedModel).
        """
        if self.kind == "savedmodel":
            raise InputError(f"{self.path}: a SavedModel has no Keras model to load; use its serving_default signature")
        import keras

        import bonemets_tf.layers  # noqa: F401  registers the custom layers
        import bonemets_tf.losses  # noqa: F401  registers the custom losses/metrics

        try:
            return keras.models.load_model(self.model_path, compile=False)
        except Exception as exc:  # Keras raises many types for corrupt or foreign files
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise InputError(f"{self.model_path}: cannot be loaded as a Keras model ({first})") from None


def read_run(path: str | os.PathLike, *, task: str | None = None, option: str = "--model",
             savedmodel: bool = False) -> RunInfo:
    """Check a RUN folder (or, with ``savedmodel``, a SavedModel written by ``export``) and
    read its ``config.json`` (no TensorFlow import).

    Args:
        path: the RUN folder, or a SavedModel folder (``saved_model.pb`` and
            ``assets/bonemets_config.json``, the RUN's config that ``export`` copies there).
        task: required task (``"detect"``/``"segment"``), or None for either.
        option: the command-line option that named it, for error messages.
        savedmodel: accept a SavedModel too (``predict``).

    Returns:
        The run's :class:`RunInfo`.

    Raises:
        InputError: not a folder with ``model.keras`` and ``config.json``, a config
            without the needed settings, an unknown arch, the wrong task, or a RUN trained
            before inputs were reoriented to :data:`analysis.imaging.orientation.CANONICAL`.
    """
    from analysis.imaging.orientation import CANONICAL

    p = Path(path)
    if savedmodel and (p / SAVEDMODEL_FILE).is_file():
        config_path, kind = p / "assets" / CONFIG_ASSET, "savedmodel"
        if not config_path.is_file():
            raise InputError(f"{p}: a SavedModel without assets/{CONFIG_ASSET}; expected one written by `export`")
    elif not (p.is_dir() and (p / MODEL_FILE).is_file() and (p / CONFIG_FILE).is_file()):
        also = " or a SavedModel from `export`" if savedmodel else ""
        raise InputError(f"{p}: not a RUN folder (expected {MODEL_FILE} and {CONFIG_FILE} from `train`{also})")
    else:
        config_path, kind = p / CONFIG_FILE, "run"
    config = read_json(config_path, what="run config")
    settings = config.get("settings") if isinstance(config, dict) else None
    if not isinstance(settings, dict):
        raise InputError(f"{config_path}: no 'settings' object; expected the config.json written by `train`")
    missing = [k for k in ("arch", "task", "context", "image_size") if k not in settings]
    if missing:
        raise InputError(f"{config_path}: settings lack {', '.join(missing)}; expected the config.json written by `train`")
    arch = settings["arch"]
    if arch not in CATALOG:
        raise InputError(f"{config_path}: unknown arch {arch!r}; expected one of {', '.join(CATALOG)}")
    run_task = CATALOG[arch].task
    if task is not None and run_task != task:
        wanted = {DETECT: "a detector", SEGMENT: "a segmenter"}[task]
        raise InputError(f"{option} {p}: is a {run_task} run ({arch}); expected {wanted}")
    context = settings["context"]
    if not isinstance(context, int) or context < 1 or context % 2 == 0:
        raise InputError(f"{config_path}: context {context!r}; expected an odd integer >= 1")
    if config.get("orientation") != CANONICAL:
        raise InputError(f"{option} {p}: trained before every CT was reoriented to {CANONICAL} (its config.json "
                         f"records no orientation), so it saw patients flipped by their files' storage order; "
                         f"retrain it with this version")
    return RunInfo(path=p.resolve(), config=config, arch=arch, task=run_task, context=context,
                   image_size=int(settings["image_size"]), stride=CATALOG[arch].stride, kind=kind)


def calibrated_threshold(run_dir: str | os.PathLike) -> float:
    """The threshold in ``RUN/calibration.json`` (for ``predict --threshold auto``): the best
    validation per-slice Dice for segmenters, the best validation F1 of slice calls for
    detectors (see :mod:`bonemets_tf.calibrate`).

    Raises:
        InputError: the file is missing or holds no threshold in [0, 1].
    """
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        raise InputError(f"{path}: not found; --threshold auto needs a RUN trained by this version "
                         f"(segmenters since the calibration, detectors since issue #16), or pass a number")
    record = read_json(path)
    t = record.get("threshold") if isinstance(record, dict) else None
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0:
        raise InputError(f"{path}: expected a 'threshold' in [0, 1]")
    return float(t)


def training_status(run: RunInfo) -> dict[str, Any]:
    """Whether a RUN's model learned anything, from its records (no TensorFlow import).

    Reads ``config.json`` (the collapse guard's ``"guard"`` record, when train wrote one),
    ``history.csv`` (the validation monitor: ``val_dice`` for segmenters, ``val_auc`` for
    detectors) and, when there is no history, ``calibration.json``. A model *did not learn*
    when :func:`learned` says so of its best validation value (validation Dice <= 0.05,
    AUC <= 0.55: the score of an empty or constant prediction), or when the guard recorded
    the outcome ``"failed"``. Whether it learned is unknown when its validation cases hold
    no lesion (``config.json["checkpoint"]["monitor"]`` null): an empty prediction scores
    Dice 1 there.

    Args:
        run: the RUN (:func:`read_run`).

    Returns:
        ``{"learned": bool | None, "reason": str, "best_val": float | None,
        "empty_level": float | None, "guard_events": int}``; ``learned`` is None (unknown)
        when the RUN holds no validation record; ``empty_level`` is the task's level.
    """
    task = run.task
    guard = run.config.get("guard") if isinstance(run.config.get("guard"), dict) else {}
    events = guard.get("events") if isinstance(guard.get("events"), list) else []
    level = EMPTY_LEVEL[task]
    monitor = MONITOR[task]
    checkpoint = run.config.get("checkpoint") if isinstance(run.config.get("checkpoint"), dict) else {}
    no_lesion = "monitor" in checkpoint and checkpoint["monitor"] is None
    best, source = (None, "") if no_lesion else (_best_history_value(run.path / HISTORY_FILE, monitor), HISTORY_FILE)
    if best is None and not no_lesion:
        best, source = _calibration_value(run.path / CALIBRATION_FILE, task), CALIBRATION_FILE
    status: dict[str, Any] = {"learned": None, "reason": "", "best_val": best, "empty_level": level,
                              "guard_events": len(events)}
    name = monitor[4:]
    if guard.get("outcome") == "failed":
        status.update(learned=False, reason=f"training failed: the collapse guard gave up after {len(events)} event(s)")
    elif no_lesion:
        status["reason"] = (f"unknown: its validation cases hold no lesion, so validation {name} cannot tell "
                            f"(model.keras is epoch {checkpoint.get('epoch')}, the last)")
    elif best is None:
        status["reason"] = f"no validation {name} recorded in {HISTORY_FILE} or {CALIBRATION_FILE}"
    elif learned(task, best):
        recovered = f" after {len(events)} collapse guard event(s)" if events else ""
        status.update(learned=True, reason=f"best validation {name} {best:.3f} > empty-prediction level "
                                           f"{level:g}{recovered}")
    else:
        status.update(learned=False, reason=f"did not learn: best validation {name} {best:.3f} never rose above "
                                            f"its empty-prediction level {level:g} ({source})")
    return status


def _best_history_value(path: Path, column: str) -> float | None:
    import math

    from analysis.imaging.records import read_csv

    if not path.is_file():
        return None
    best = None
    for row in read_csv(path):
        try:
            value = float(row.get(column) or "nan")
        except ValueError:
            continue
        if math.isfinite(value) and (best is None or value > best):
            best = value
    return best


def _calibration_value(path: Path, task: str) -> float | None:
    """The calibrated validation score: Dice (segmenters) or AUC (detectors)."""
    if not path.is_file():
        return None
    record = read_json(path)
    value = record.get("auc" if task == DETECT else "dice_at_threshold") if isinstance(record, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
