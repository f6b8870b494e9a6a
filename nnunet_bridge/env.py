"""The work folder's layout and nnU-Net's environment, set in one scoped context manager.

nnU-Net v2 finds its folders and knobs through environment variables. The bridge never
leaves them in the process environment: :func:`nnunet_environment` sets them for the
duration of a ``with`` block and restores the previous values (or their absence) on exit.

Layout of a work folder (everything nnU-Net writes stays inside it)::

    WORK/nnUNet_raw/Dataset501_Bonemets/{dataset.json, imagesTr/, labelsTr/}
    WORK/nnUNet_preprocessed/Dataset501_Bonemets/{nnUNetPlans.json, splits_final.json, ...}
        (and a scaled plan's ``<plans>.json`` beside nnU-Net's: :mod:`nnunet_bridge.plans`)
    WORK/nnUNet_results/Dataset501_Bonemets/nnUNetTrainerBonemets__<plans>__2d/fold_K/
    WORK/prepared.json      what the raw/preprocessed data were built from (cohort, splits)
    WORK/train_settings.json  the last training's settings, with the plans identifier it trained
    WORK/params.json        the trained network's parameter count and plan

``<plans>`` is ``nnUNetPlans`` (nnU-Net's own plan) or a scaled plan's identifier; a
:class:`WorkLayout` made without one reads it from ``train_settings.json``, so prediction
finds the model that ``nnunet train`` trained last.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

log = logging.getLogger(__name__)

DATASET_ID = 501
DATASET_NAME = f"Dataset{DATASET_ID:03d}_Bonemets"
CONFIGURATION = "2d"
#: nnU-Net's own plans identifier (``ExperimentPlanner(plans_name='nnUNetPlans')``).
PLANS = "nnUNetPlans"
TRAINER = "nnUNetTrainerBonemets"
CHECKPOINT = "checkpoint_final.pth"

#: Folder searched by nnU-Net for :data:`TRAINER` (its modules are imported by name).
TRAINERS_DIR = Path(__file__).resolve().parent / "trainers"
#: Environment variable through which the trainer receives its schedule (JSON object).
SCHEDULE_ENV = "BONEMETS_NNUNET_SCHEDULE"


@dataclass(frozen=True)
class WorkLayout:
    """Paths inside a work folder (nothing is created or read on construction).

    Attributes:
        work: the work folder (absolute).
        plans: the plans identifier whose model folder this layout names; None: the one
            ``train_settings.json`` records (nnU-Net's ``nnUNetPlans`` without a record).
    """

    work: Path
    plans: str | None = None

    def __init__(self, work: str | os.PathLike, plans: str | None = None) -> None:
        object.__setattr__(self, "work", Path(work).absolute())
        object.__setattr__(self, "plans", plans)

    def with_plans(self, plans: str) -> "WorkLayout":
        """The same work folder, naming the model folder of ``plans``."""
        return WorkLayout(self.work, plans)

    @property
    def plans_identifier(self) -> str:
        """The plans identifier: given, else recorded by the last training in WORK, else ``nnUNetPlans``."""
        if self.plans:
            return self.plans
        if self.train_settings_json.is_file():
            try:
                recorded = json.loads(self.train_settings_json.read_text(encoding="utf-8")).get("plans")
            except (ValueError, OSError, AttributeError):
                recorded = None
            if isinstance(recorded, str) and recorded:
                return recorded
        return PLANS

    @property
    def raw(self) -> Path:
        return self.work / "nnUNet_raw"

    @property
    def preprocessed(self) -> Path:
        return self.work / "nnUNet_preprocessed"

    @property
    def results(self) -> Path:
        return self.work / "nnUNet_results"

    @property
    def raw_dataset(self) -> Path:
        return self.raw / DATASET_NAME

    @property
    def preprocessed_dataset(self) -> Path:
        return self.preprocessed / DATASET_NAME

    @property
    def model_folder(self) -> Path:
        return self.results / DATASET_NAME / f"{TRAINER}__{self.plans_identifier}__{CONFIGURATION}"

    def fold_folder(self, fold: int) -> Path:
        return self.model_folder / f"fold_{fold}"

    def checkpoint(self, fold: int) -> Path:
        return self.fold_folder(fold) / CHECKPOINT

    def trained_folds(self) -> list[int]:
        """Folds with a final checkpoint, sorted."""
        if not self.model_folder.is_dir():
            return []
        folds = []
        for p in self.model_folder.glob("fold_*"):
            suffix = p.name[len("fold_"):]
            if suffix.isdigit() and (p / CHECKPOINT).is_file():
                folds.append(int(suffix))
        return sorted(folds)

    @property
    def prepared_json(self) -> Path:
        return self.work / "prepared.json"

    @property
    def train_settings_json(self) -> Path:
        return self.work / "train_settings.json"

    @property
    def params_json(self) -> Path:
        return self.work / "params.json"


def default_processes() -> int:
    """Worker processes for nnU-Net's pools (and its inference thread cap): cores, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


@contextlib.contextmanager
def nnunet_environment(work: str | os.PathLike, *, augmentation_workers: int | None = None,
                       schedule: Mapping[str, Any] | None = None) -> Iterator[WorkLayout]:
    """Set nnU-Net's environment for a work folder; restore the previous environment on exit.

    Sets ``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results`` (under ``work``),
    ``nnUNet_extTrainer`` (the bridge's trainer folder) and, unless the user already set
    them, ``nnUNet_def_n_proc`` (:func:`default_processes`) and ``nnUNet_n_proc_DA``
    (``augmentation_workers``; None keeps nnU-Net's default). ``schedule`` is passed to
    the trainer as JSON in :data:`SCHEDULE_ENV`.

    Use ``augmentation_workers=0`` only around training on a CPU (augmentation in-process:
    faster on few cores, and no worker processes to orphan on Ctrl-C): nnU-Net's planner
    calls ``torch.set_num_threads(nnUNet_n_proc_DA)``, which fails for 0.

    ``nnUNet_def_n_proc`` is read once, when ``nnunetv2.configuration`` is first imported:
    enter this context before importing nnunetv2 (the bridge imports it inside its
    functions). A warning is logged when nnunetv2 was imported earlier with another value.

    Args:
        work: the work folder (created if missing).
        augmentation_workers: nnU-Net's data augmentation processes per GPU (0: in-process).
        schedule: trainer options (``num_epochs``, ``num_iterations_per_epoch``,
            ``num_val_iterations_per_epoch``); None leaves nnU-Net's defaults.

    Yields:
        The work folder's :class:`WorkLayout`.
    """
    layout = WorkLayout(work)
    for folder in (layout.raw, layout.preprocessed, layout.results):
        folder.mkdir(parents=True, exist_ok=True)
    values: dict[str, str | None] = {
        "nnUNet_raw": str(layout.raw),
        "nnUNet_preprocessed": str(layout.preprocessed),
        "nnUNet_results": str(layout.results),
        "nnUNet_extTrainer": str(TRAINERS_DIR),
        "nnUNet_def_n_proc": os.environ.get("nnUNet_def_n_proc", str(default_processes())),
        "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA",
                                           None if augmentation_workers is None else str(augmentation_workers)),
        SCHEDULE_ENV: json.dumps(dict(schedule)) if schedule else None,
    }
    _warn_if_configuration_imported(int(values["nnUNet_def_n_proc"]))  # type: ignore[arg-type]
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            _set(name, value)
        yield layout
    finally:
        for name, value in saved.items():
            _set(name, value)


def _set(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _warn_if_configuration_imported(n_proc: int) -> None:
    config = sys.modules.get("nnunetv2.configuration")
    if config is not None and getattr(config, "default_num_processes", n_proc) != n_proc:
        log.warning("nnunetv2 was imported before the bridge set nnUNet_def_n_proc=%d; it keeps using %d processes",
                    n_proc, config.default_num_processes)
