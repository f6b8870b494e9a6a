"""Train nnU-Net v2 (2d configuration) on the cohort's training patients, fold by fold.

Stages, all through nnU-Net's Python API inside :func:`nnunet_bridge.env.nnunet_environment`:

1. convert the training patients (never the test patients of ``splits.json``) into 2D
   slices (:mod:`nnunet_bridge.convert`);
2. fingerprint, plan and preprocess the ``2d`` configuration
   (``nnunetv2.experiment_planning.plan_and_preprocess_api``), then write
   ``splits_final.json`` grouped by patient so nnU-Net's fold k is the cohort's fold k;
3. ``nnunetv2.run.run_training.run_training`` per fold with the bridge's trainer
   (epochs and iterations as options; ``num_gpus`` > 1 runs nnU-Net's DDP);
4. count the trained network's parameters (paper: 30.6M) into ``WORK/params.json``.

Stages 1-2 are skipped when ``WORK/prepared.json`` shows they were built from the same
cohort files and splits. ``resume`` continues each fold from nnU-Net's latest checkpoint.
:func:`prepare_work` runs stages 1-2 alone: after it, folds can train in parallel
processes on the same work folder (one per GPU, each with its own ``CUDA_VISIBLE_DEVICES``),
since each fold writes only its own ``fold_K`` folder.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from analysis.cohort.layout import Cohort
from analysis.errors import InputError
from analysis.imaging.io import atomic_write_json, read_json
from analysis.imaging.records import versions
from nnunet_bridge.convert import convert_patients, nnunet_splits, write_splits_final
from nnunet_bridge.device import resolve_device
from nnunet_bridge.env import (CONFIGURATION, DATASET_ID, PLANS, TRAINER, WorkLayout, default_processes,
                               nnunet_environment)

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

#: nnU-Net v2 parameter count reported by the paper (Pawan, Rich et al., Table 3).
PAPER_PARAMETERS = 30_600_000


@dataclass(frozen=True)
class TrainOptions:
    """Options of ``nnunet train``. None keeps nnU-Net's default (or, with ``resume``, the value recorded
    in ``WORK/train_settings.json``)."""

    folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int | None = None
    iterations: int | None = None
    val_iterations: int | None = None
    device: str = "auto"
    num_gpus: int = 1
    resume: bool = False


@dataclass
class TrainReport:
    """What a training run did: folds trained, parameter count and seconds per stage."""

    folds: list[int]
    parameters: int
    timings_s: dict[str, float] = field(default_factory=dict)
    schedule: dict[str, int] = field(default_factory=dict)


def train(dataset: str | Path, work: str | Path, options: TrainOptions) -> TrainReport:
    """Convert, plan/preprocess and train the requested folds of nnU-Net 2d on a cohort.

    Args:
        dataset: cohort folder with ``splits.json`` (read only).
        work: work folder holding every nnU-Net file.
        options: see :class:`TrainOptions`.

    Returns:
        The :class:`TrainReport` (also written as ``WORK/train_report.json``).

    Raises:
        InputError: missing cohort or splits, bad folds or options, unavailable device,
            or ``--resume`` on a work folder prepared from other data.
    """
    cohort, splits = _cohort_and_splits(dataset)
    _check_options(options, len(splits["folds"]))
    layout = WorkLayout(work)
    schedule = _schedule(options, layout)
    device = resolve_device(options.device)
    _check_gpus(options.num_gpus, device)

    timings: dict[str, float] = {}
    with nnunet_environment(layout.work):
        prepare(cohort, splits, layout, resume=options.resume, timings=timings)
    atomic_write_json(layout.train_settings_json, _settings(cohort, options, schedule, device.type))
    # On a CPU, augment in-process: worker processes only compete for the cores the network uses.
    workers = 0 if device.type == "cpu" else None
    with nnunet_environment(layout.work, augmentation_workers=workers, schedule=schedule):
        from nnunetv2.run.run_training import run_training

        for fold in options.folds:
            log.info("training fold %d of %s (%s) on %s", fold, TRAINER, schedule or "nnU-Net defaults", device)
            start = time.perf_counter()
            run_training(str(DATASET_ID), CONFIGURATION, fold, trainer_class_name=TRAINER, plans_identifier=PLANS,
                         num_gpus=options.num_gpus, continue_training=options.resume, device=device)
            timings[f"fold_{fold}"] = round(time.perf_counter() - start, 2)
            log.info("fold %d done in %.1f s -> %s", fold, timings[f"fold_{fold}"], layout.fold_folder(fold))
        parameters = count_parameters(layout, options.folds[0])
    write_parameter_report(layout, parameters)
    report = TrainReport(folds=list(options.folds), parameters=parameters, timings_s=timings, schedule=schedule)
    atomic_write_json(layout.work / "train_report.json", asdict(report))
    return report


def prepare_work(dataset: str | Path, work: str | Path) -> WorkLayout:
    """Only convert, plan and preprocess (stages 1-2) into ``work``, training nothing.

    Run it once before training folds in parallel processes on the same work folder
    (e.g. one per GPU): each ``train`` then finds the prepared data up to date and only
    reads them, instead of several processes building them at once.

    Args:
        dataset: cohort folder with ``splits.json`` (read only).
        work: work folder.

    Returns:
        The work folder's layout.

    Raises:
        InputError: missing cohort or splits, or a test patient in a fold.
    """
    cohort, splits = _cohort_and_splits(dataset)
    layout = WorkLayout(work)
    timings: dict[str, float] = {}
    with nnunet_environment(layout.work):
        prepare(cohort, splits, layout, timings=timings)
    log.info("prepared %s for nnU-Net (%s)", layout.work, timings or "already up to date")
    return layout


def _cohort_and_splits(dataset: str | Path) -> tuple[Cohort, dict[str, Any]]:
    cohort = Cohort(dataset)
    cohort.require_exists()
    cohort.dataset_json()
    splits = cohort.splits()
    if splits is None:
        raise InputError(f"{cohort.splits_path}: not found; nnU-Net needs the cohort's patient-level splits "
                         f"(run `python cli.py split {cohort.root}` first)")
    return cohort, splits


def _check_gpus(num_gpus: int, device: "torch.device") -> None:
    """``--num-gpus N`` > 1 runs nnU-Net's DDP (one process per GPU): it needs N visible CUDA devices."""
    if num_gpus <= 1:
        return
    if device.type != "cuda":
        raise InputError(f"--num-gpus {num_gpus}: multi-GPU training needs --device cuda, got {device.type}")
    import torch

    available = torch.cuda.device_count()
    if num_gpus > available:
        raise InputError(f"--num-gpus {num_gpus}: only {available} CUDA device(s) are visible "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")


def _check_options(options: TrainOptions, n_folds: int) -> None:
    if not options.folds:
        raise InputError("--folds: expected at least one fold")
    bad = [f for f in options.folds if not 0 <= f < n_folds]
    if bad:
        raise InputError(f"--folds {','.join(map(str, options.folds))}: splits.json has folds 0..{n_folds - 1}")
    for name in ("epochs", "iterations", "val_iterations"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} {value}: expected a positive integer")
    if options.num_gpus < 1:
        raise InputError(f"--num-gpus {options.num_gpus}: expected at least 1")


def _schedule(options: TrainOptions, layout: WorkLayout) -> dict[str, int]:
    """The trainer's schedule: given options, else (with resume) the recorded ones, else nnU-Net's defaults."""
    recorded: dict[str, Any] = {}
    if options.resume and layout.train_settings_json.is_file():
        recorded = read_json(layout.train_settings_json, what="training settings").get("schedule", {})
    given = {"num_epochs": options.epochs, "num_iterations_per_epoch": options.iterations,
             "num_val_iterations_per_epoch": options.val_iterations}
    return {k: int(v) for k, v in ({**recorded, **{k: v for k, v in given.items() if v is not None}}).items()}


def _settings(cohort: Cohort, options: TrainOptions, schedule: dict[str, int], device: str) -> dict[str, Any]:
    return {
        "dataset": str(cohort.root.absolute()),
        "configuration": CONFIGURATION, "trainer": TRAINER, "plans": PLANS,
        "folds": list(options.folds), "schedule": schedule, "device": device, "num_gpus": options.num_gpus,
        "resume": options.resume,
        "versions": versions("nnunetv2", "torch"),
    }


def _stamp(cohort: Cohort, splits: dict[str, Any], patients: Sequence[str]) -> dict[str, Any]:
    """What the prepared data depend on: cohort, splits and each input file's size and mtime."""
    files = {}
    for p in patients:
        for path in (cohort.image_path(p), cohort.label_path(p)):
            st = path.stat()
            files[path.name] = [st.st_size, st.st_mtime_ns]
    return {"dataset": str(cohort.root.absolute()), "test": sorted(splits["test"]), "folds": splits["folds"],
            "files": files}


def prepare(cohort: Cohort, splits: dict[str, Any], layout: WorkLayout, *, resume: bool = False,
            timings: dict[str, float] | None = None) -> dict[str, list[str]]:
    """Convert, fingerprint, plan and preprocess (2d), and write patient-grouped ``splits_final.json``.

    Must run inside :func:`nnunet_bridge.env.nnunet_environment` for ``layout``. Reuses the
    prepared data when ``WORK/prepared.json`` matches the cohort and splits.

    Args:
        cohort: the source cohort (read only).
        splits: its parsed ``splits.json``.
        layout: the work folder.
        resume: refuse (rather than rebuild) when the prepared data are out of date.
        timings: filled with seconds per stage.

    Returns:
        Slice case ids per training patient.

    Raises:
        InputError: a test patient appears in a fold, or ``resume`` with data prepared from
            another cohort or splits.
    """
    timings = {} if timings is None else timings
    test = set(splits["test"])
    patients = sorted({p for fold in splits["folds"] for part in ("train", "val") for p in fold[part]})
    leaked = sorted(test.intersection(patients))
    if leaked:  # Cohort.splits() already checks this; never let a test patient reach nnU-Net
        raise InputError(f"{cohort.splits_path}: test patient(s) {', '.join(leaked)} appear in a fold")
    stamp = _stamp(cohort, splits, patients)
    old = read_json(layout.prepared_json, what="prepared.json") if layout.prepared_json.is_file() else None
    plans_file = layout.preprocessed_dataset / f"{PLANS}.json"
    if old is not None and old.get("stamp") == stamp and plans_file.is_file():
        log.info("reusing the nnU-Net data prepared in %s", layout.work)
        slices = old["slices"]
    else:
        if resume and old is not None:
            raise InputError(f"{layout.prepared_json}: {layout.work} was prepared from another cohort, other files "
                             f"or other splits; --resume continues only a run on the same data")
        if layout.model_folder.parent.exists():
            log.warning("the cohort or splits changed: removing the models trained on the old data in %s",
                        layout.model_folder.parent)
            shutil.rmtree(layout.model_folder.parent)
        layout.prepared_json.unlink(missing_ok=True)
        start = time.perf_counter()
        slices = convert_patients(cohort, patients, layout.raw_dataset)
        timings["conversion"] = round(time.perf_counter() - start, 2)
        plan_and_preprocess(layout, timings)
        atomic_write_json(layout.prepared_json, {"stamp": stamp, "slices": slices})
    write_splits_final(layout.preprocessed_dataset, nnunet_splits(splits, slices))
    return slices


def plan_and_preprocess(layout: WorkLayout, timings: dict[str, float]) -> None:
    """nnU-Net's fingerprint extraction, experiment planning and 2d preprocessing of the raw dataset."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess

    shutil.rmtree(layout.preprocessed_dataset, ignore_errors=True)
    n = default_processes()
    start = time.perf_counter()
    extract_fingerprints([DATASET_ID], num_processes=n, check_dataset_integrity=False, clean=True, verbose=False)
    timings["fingerprint"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    plans_identifier = plan_experiments([DATASET_ID])
    timings["plan"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    preprocess([DATASET_ID], plans_identifier=plans_identifier, configurations=(CONFIGURATION,), num_processes=(n,))
    timings["preprocess"] = round(time.perf_counter() - start, 2)
    log.info("fingerprint %.1f s, plan %.1f s, preprocess %.1f s", timings["fingerprint"], timings["plan"],
             timings["preprocess"])


def count_parameters(layout: WorkLayout, fold: int) -> int:
    """Parameters (sum of ``p.numel()``) of the network trained for ``fold``, loaded from its checkpoint.

    Must run inside :func:`nnunet_bridge.env.nnunet_environment` (the trainer is found by name).
    """
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(layout.model_folder), use_folds=(fold,))
    return int(sum(p.numel() for p in predictor.network.parameters()))


def write_parameter_report(layout: WorkLayout, parameters: int) -> Path:
    """Write ``WORK/params.json`` (count vs the paper's 30.6M) and log it."""
    ratio = parameters / PAPER_PARAMETERS
    log.info("nnU-Net 2d network: %s parameters (%.1fM; paper 30.6M, ratio %.2f)", f"{parameters:,}",
             parameters / 1e6, ratio)
    return atomic_write_json(layout.params_json, {"parameters": parameters, "paper_parameters": PAPER_PARAMETERS,
                                                  "ratio_to_paper": round(ratio, 4)})


#: Iterations below which an nnU-Net model counts as not trained: 5,000 = 20 epochs of nnU-Net's
#: 250 iterations, its shipped ``nnUNetTrainer_20epochs`` schedule (nnunetv2
#: ``training/nnUNetTrainer/variants/training_length``; the 1-, 5- and 10-epoch variants there are
#: smoke tests, the default is 1000 epochs = 250,000 iterations). The CPU demo's token run (6
#: iterations) predicted 15,543 false-positive lesions on 5 test patients (issue #16).
MINIMUM_ITERATIONS = 5_000
#: nnU-Net's own schedule when ``train_settings.json`` records none (``nnUNetTrainer.__init__``).
NNUNET_DEFAULT_SCHEDULE = {"num_epochs": 1000, "num_iterations_per_epoch": 250}


def training_status(layout: WorkLayout) -> dict[str, Any]:
    """Whether WORK holds a trained nnU-Net model, from its records (no torch import).

    Iterations per fold: ``num_epochs * num_iterations_per_epoch`` of ``WORK/train_settings.json``
    (nnU-Net's defaults when it records none) for a fold with a final checkpoint; for a fold
    still without one, the epochs its nnU-Net training log reports finished ("Epoch time" lines)
    times the iterations per epoch. The least trained fold counts (prediction ensembles them).

    Args:
        layout: the work folder's :class:`~nnunet_bridge.env.WorkLayout`.

    Returns:
        ``{"learned": bool | None, "reason": str, "iterations": int, "minimum_iterations": int}``;
        ``learned`` is None when WORK holds no training record, False below
        :data:`MINIMUM_ITERATIONS` ("not trained"), True at or above it.
    """
    status: dict[str, Any] = {"learned": None, "reason": "", "iterations": 0, "minimum_iterations": MINIMUM_ITERATIONS}
    if not layout.train_settings_json.is_file():
        status["reason"] = f"{layout.train_settings_json}: not found; no training record"
        return status
    settings = read_json(layout.train_settings_json, what="training settings")
    schedule = {**NNUNET_DEFAULT_SCHEDULE, **(settings.get("schedule") or {})}
    per_epoch = int(schedule["num_iterations_per_epoch"])
    folds = [int(f) for f in settings.get("folds") or []]
    final = set(layout.trained_folds())
    counts = [int(schedule["num_epochs"]) * per_epoch if f in final else _logged_epochs(layout.fold_folder(f)) * per_epoch
              for f in folds]
    iterations = min(counts) if counts else 0
    status["iterations"] = iterations
    if iterations >= MINIMUM_ITERATIONS:
        status.update(learned=True, reason=f"trained {iterations} iterations (minimum {MINIMUM_ITERATIONS})")
    else:
        status.update(learned=False, reason=f"not trained ({iterations} iterations; nnU-Net needs at least "
                                            f"{MINIMUM_ITERATIONS} here)")
    return status


def _logged_epochs(fold_folder: Path) -> int:
    """Epochs an nnU-Net training log reports finished (its "Epoch time" lines), 0 without a log."""
    logs = sorted(fold_folder.glob("training_log_*.txt"))
    if not logs:
        return 0
    with open(logs[-1], encoding="utf-8", errors="replace") as fh:
        return sum(1 for line in fh if "Epoch time" in line)
