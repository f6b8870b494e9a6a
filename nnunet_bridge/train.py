"""Train nnU-Net v2 (2d configuration) on the cohort's training patients, fold by fold.

Stages, all through nnU-Net's Python API inside :func:`nnunet_bridge.env.nnunet_environment`:

1. convert the training patients (never the test patients of ``splits.json``) into 2D
   slices (:mod:`nnunet_bridge.convert`);
2. fingerprint, plan and preprocess the ``2d`` configuration
   (``nnunetv2.experiment_planning.plan_and_preprocess_api``), then write
   ``splits_final.json`` grouped by patient so nnU-Net's fold k is the cohort's fold k;
   with ``--width``, ``--batch-size`` or ``--patch-size``, derive a scaled plan from nnU-Net's
   and write it beside it under its own identifier (:mod:`nnunet_bridge.plans`);
3. ``nnunetv2.run.run_training.run_training`` per fold with the bridge's trainer and the plan
   (epochs and iterations as options; ``num_gpus`` > 1 runs nnU-Net's DDP); the plans
   identifier is recorded in ``WORK/train_settings.json``, where prediction finds it;
4. count the trained network's parameters (paper: 30.6M) into ``WORK/params.json``, with the
   plan that ran.

Stages 1-2 are skipped when ``WORK/prepared.json`` shows they were built from the same
cohort files and splits. ``resume`` continues each fold from nnU-Net's latest checkpoint.
:func:`prepare_work` runs stages 1-2 alone: after it, folds can train in parallel
processes on the same work folder (one per GPU, each with its own ``CUDA_VISIBLE_DEVICES``),
since each fold writes only its own ``fold_K`` folder.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from analysis.cohort.layout import Cohort
from analysis.errors import InputError
from analysis.evaluation.learned import EMPTY_LEVEL, learned
from analysis.imaging.io import atomic_write_json, read_json
from analysis.imaging.records import versions
from nnunet_bridge.convert import convert_patients, nnunet_splits, write_splits_final
from nnunet_bridge.device import resolve_device
from nnunet_bridge.env import (CONFIGURATION, DATASET_ID, PLANS, TRAINER, WorkLayout, default_processes,
                               nnunet_environment)
from nnunet_bridge.plans import PlanScale, plan_summary, write_scaled_plans

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

#: nnU-Net v2 parameter count reported by the paper (Pawan, Rich et al., Table 3).
PAPER_PARAMETERS = 30_600_000


@dataclass(frozen=True)
class TrainOptions:
    """Options of ``nnunet train``. None keeps nnU-Net's default (or, with ``resume``, the value recorded
    in ``WORK/train_settings.json``).

    ``width``, ``batch_size`` and ``patch_size`` train a plan derived from nnU-Net's
    (:class:`~nnunet_bridge.plans.PlanScale`); without them nnU-Net's own plan trains.
    """

    folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int | None = None
    iterations: int | None = None
    val_iterations: int | None = None
    device: str = "auto"
    num_gpus: int = 1
    resume: bool = False
    width: float | None = None
    batch_size: int | None = None
    patch_size: tuple[int, int] | None = None

    @property
    def scale(self) -> PlanScale:
        """The plan's departure from nnU-Net's."""
        patch = None if self.patch_size is None else tuple(int(p) for p in self.patch_size)
        return PlanScale(width=self.width, batch_size=self.batch_size, patch_size=patch)  # type: ignore[arg-type]


@dataclass
class TrainReport:
    """What a training run did: folds trained, parameter count, the plan, seconds per stage."""

    folds: list[int]
    parameters: int
    timings_s: dict[str, float] = field(default_factory=dict)
    schedule: dict[str, int] = field(default_factory=dict)
    plans: str = PLANS


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
    scale = _scale(options, WorkLayout(work))
    layout = WorkLayout(work, scale.identifier())
    schedule = _schedule(options, layout)
    device = resolve_device(options.device)
    _check_gpus(options.num_gpus, device)

    timings: dict[str, float] = {}
    with nnunet_environment(layout.work):
        prepare(cohort, splits, layout, resume=options.resume, timings=timings)
        write_scaled_plans(layout.preprocessed_dataset, scale, CONFIGURATION)
    atomic_write_json(layout.train_settings_json, _settings(cohort, options, schedule, device.type, scale))
    # On a CPU, augment in-process: worker processes only compete for the cores the network uses.
    workers = 0 if device.type == "cpu" else None
    with nnunet_environment(layout.work, augmentation_workers=workers, schedule=schedule):
        from nnunetv2.run.run_training import run_training

        for fold in options.folds:
            log.info("training fold %d of %s with plan %s (%s) on %s", fold, TRAINER, layout.plans_identifier,
                     schedule or "nnU-Net defaults", device)
            start = time.perf_counter()
            run_training(str(DATASET_ID), CONFIGURATION, fold, trainer_class_name=TRAINER,
                         plans_identifier=layout.plans_identifier, num_gpus=options.num_gpus,
                         continue_training=options.resume, device=device)
            timings[f"fold_{fold}"] = round(time.perf_counter() - start, 2)
            log.info("fold %d done in %.1f s -> %s", fold, timings[f"fold_{fold}"], layout.fold_folder(fold))
        parameters = count_parameters(layout, options.folds[0])
    write_parameter_report(layout, parameters, width=1.0 if scale.width is None else scale.width)
    report = TrainReport(folds=list(options.folds), parameters=parameters, timings_s=timings, schedule=schedule,
                         plans=layout.plans_identifier)
    atomic_write_json(layout.work / "train_report.json", asdict(report))
    return report


def prepare_work(dataset: str | Path, work: str | Path, scale: PlanScale = PlanScale()) -> WorkLayout:
    """Only convert, plan and preprocess (stages 1-2) into ``work``, training nothing.

    Run it once before training folds in parallel processes on the same work folder
    (e.g. one per GPU): each ``train`` then finds the prepared data up to date and only
    reads them, instead of several processes building them at once.

    Args:
        dataset: cohort folder with ``splits.json`` (read only).
        work: work folder.
        scale: also write this scaled plan beside nnU-Net's (its data are nnU-Net's).

    Returns:
        The work folder's layout, naming the plan's model folder.

    Raises:
        InputError: missing cohort or splits, a test patient in a fold, or a bad scale.
    """
    scale.check()
    cohort, splits = _cohort_and_splits(dataset)
    layout = WorkLayout(work, scale.identifier())
    timings: dict[str, float] = {}
    with nnunet_environment(layout.work):
        prepare(cohort, splits, layout, timings=timings)
        write_scaled_plans(layout.preprocessed_dataset, scale, CONFIGURATION)
    log.info("prepared %s for nnU-Net, plan %s (%s)", layout.work, layout.plans_identifier,
             timings or "already up to date")
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
    options.scale.check()


def _recorded_scale(layout: WorkLayout) -> PlanScale | None:
    """The plan scale ``WORK/train_settings.json`` records (None: no record; older records: nnU-Net's plan)."""
    if not layout.train_settings_json.is_file():
        return None
    recorded = read_json(layout.train_settings_json, what="training settings").get("scale") or {}
    patch = recorded.get("patch_size")
    return PlanScale(width=recorded.get("width"), batch_size=recorded.get("batch_size"),
                     patch_size=None if patch is None else tuple(int(p) for p in patch))  # type: ignore[arg-type]


def _scale(options: TrainOptions, layout: WorkLayout) -> PlanScale:
    """The plan to train: the options' scale; with ``resume`` and none given, the recorded one.

    Raises:
        InputError: ``--resume`` with a scale other than the one the work folder trained.
    """
    given = options.scale
    recorded = _recorded_scale(layout) if options.resume else None
    if recorded is None:
        return given
    if given.is_default:
        return recorded
    if given.identifier() != recorded.identifier():
        raise InputError(f"--resume: {layout.work} trained the plan {recorded.identifier()}, the options ask for "
                         f"{given.identifier()}; resume with the same --width/--batch-size/--patch-size or none")
    return given


def _schedule(options: TrainOptions, layout: WorkLayout) -> dict[str, int]:
    """The trainer's schedule: given options, else (with resume) the recorded ones, else nnU-Net's defaults."""
    recorded: dict[str, Any] = {}
    if options.resume and layout.train_settings_json.is_file():
        recorded = read_json(layout.train_settings_json, what="training settings").get("schedule", {})
    given = {"num_epochs": options.epochs, "num_iterations_per_epoch": options.iterations,
             "num_val_iterations_per_epoch": options.val_iterations}
    return {k: int(v) for k, v in ({**recorded, **{k: v for k, v in given.items() if v is not None}}).items()}


def _settings(cohort: Cohort, options: TrainOptions, schedule: dict[str, int], device: str,
              scale: PlanScale) -> dict[str, Any]:
    return {
        "dataset": str(cohort.root.absolute()),
        "configuration": CONFIGURATION, "trainer": TRAINER, "plans": scale.identifier(),
        "scale": {"width": scale.width, "batch_size": scale.batch_size,
                  "patch_size": None if scale.patch_size is None else list(scale.patch_size)},
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


def trained_plan(layout: WorkLayout) -> dict[str, Any] | None:
    """The plan the model folder's network was built from (``plans.json``, which nnU-Net's trainer
    copies beside the folds): :func:`nnunet_bridge.plans.plan_summary`, or None without one."""
    path = layout.model_folder / "plans.json"
    if not path.is_file():
        return None
    try:
        return plan_summary(read_json(path, what="nnU-Net plans"), CONFIGURATION)
    except (KeyError, TypeError, ValueError):
        return None


def write_parameter_report(layout: WorkLayout, parameters: int, *, width: float = 1.0) -> Path:
    """Write ``WORK/params.json`` (count vs the paper's 30.6M, with the plan that ran) and log it.

    Args:
        layout: the work folder, naming the trained plan's model folder.
        parameters: sum of ``p.numel()`` over the trained network (:func:`count_parameters`).
        width: the plan's feature-width multiplier (1: nnU-Net's own widths).
    """
    ratio = parameters / PAPER_PARAMETERS
    plan = trained_plan(layout) or {"plans": layout.plans_identifier}
    log.info("nnU-Net 2d network (plan %s): %s parameters (%.1fM; paper 30.6M, ratio %.2f)", plan["plans"],
             f"{parameters:,}", parameters / 1e6, ratio)
    return atomic_write_json(layout.params_json, {"parameters": parameters, "paper_parameters": PAPER_PARAMETERS,
                                                  "ratio_to_paper": round(ratio, 4), "width": width, **plan})


#: nnU-Net's own schedule when ``train_settings.json`` records none (``nnUNetTrainer.__init__``).
NNUNET_DEFAULT_SCHEDULE = {"num_epochs": 1000, "num_iterations_per_epoch": 250}
#: The task whose rule (:func:`analysis.evaluation.learned.learned`) an nnU-Net model meets.
TASK = "segment"


def training_status(layout: WorkLayout) -> dict[str, Any]:
    """Whether WORK holds a trained nnU-Net model, from its records (no torch import).

    The rule is the Keras wing's (:func:`analysis.evaluation.learned.learned`): a model learned
    when its validation Dice exceeds the empty prediction's (0) by more than 0.05. The value is
    nnU-Net's own validation of each fold at the end of its training (``fold_K/validation/
    summary.json``: the fold's validation patients, every slice, the final network with
    mirroring), pooled over the slices as the Keras wing's validation Dice is:
    ``2 sum TP / (2 sum TP + sum FP + sum FN)``. The least good fold counts (prediction
    ensembles them). A fold still without a final checkpoint is not trained.

    Iterations per fold: ``num_epochs * num_iterations_per_epoch`` of ``WORK/train_settings.json``
    (nnU-Net's defaults when it records none) for a fold with a final checkpoint; for a fold
    still without one, the epochs its nnU-Net training log reports finished ("Epoch time" lines)
    times the iterations per epoch. Samples seen: iterations times the plan's batch size.

    Args:
        layout: the work folder's :class:`~nnunet_bridge.env.WorkLayout`.

    Returns:
        ``{"learned": bool | None, "reason": str, "iterations": int, "validation_dice": float | None,
        "plans": str, "width": float, "batch_size": int | None, "patch_size": list | None,
        "samples": int | None, "spacing_xy_mm": list | None}`` (``spacing_xy_mm``: the plan's pixel
        spacing, which nnU-Net's preprocessing resamples every slice to in training and prediction
        alike); ``learned`` is None when WORK holds no training record or no validation result,
        False when a fold is unfinished or its validation Dice is at the empty level ("not
        trained"), True above it.
    """
    status: dict[str, Any] = {"learned": None, "reason": "", "iterations": 0, "validation_dice": None,
                              "plans": layout.plans_identifier}
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
    plan = trained_plan(layout) or {}
    width = (settings.get("scale") or {}).get("width")
    batch = plan.get("batch_size")
    status.update(iterations=iterations, width=1.0 if width is None else float(width), batch_size=batch,
                  patch_size=plan.get("patch_size"), samples=None if batch is None else iterations * int(batch),
                  spacing_xy_mm=plan.get("spacing_xy_mm"))
    unfinished = [f for f in folds if f not in final]
    if not folds or unfinished:
        what = f"fold {unfinished[0]} unfinished" if unfinished else "no fold recorded"
        status.update(learned=False, reason=f"not trained ({what}: {iterations} iterations)")
        return status
    dices = {f: validation_dice(layout.fold_folder(f)) for f in folds}
    for f, d in dices.items():
        if d is None:
            status["reason"] = (f"{layout.fold_folder(f) / 'validation' / 'summary.json'}: no validation result "
                                f"after {iterations} iterations")
            return status
        if math.isnan(d):
            status["reason"] = (f"unknown: fold {f}'s validation slices hold no lesion, so validation Dice cannot "
                                f"tell (an empty prediction scores 1 there)")
            return status
    dice = min(d for d in dices.values() if d is not None)
    status["validation_dice"] = round(dice, 4)
    level = EMPTY_LEVEL[TASK]
    if learned(TASK, dice):
        status.update(learned=True, reason=f"validation Dice {dice:.3f} > empty-prediction level {level:g} after "
                                           f"{iterations} iterations")
    else:
        status.update(learned=False, reason=f"not trained: validation Dice {dice:.3f} after {iterations} iterations "
                                            f"never rose above its empty-prediction level {level:g}")
    return status


def validation_dice(fold_folder: Path) -> float | None:
    """Dice of nnU-Net's validation of a fold, pooled over its slices: ``2 sum TP / (2 sum TP + sum FP +
    sum FN)`` over ``validation/summary.json``'s cases (label 1); NaN when its slices hold no lesion
    (``sum TP + sum FN`` = 0: Dice cannot tell an empty prediction from a model), None without a
    readable summary."""
    path = fold_folder / "validation" / "summary.json"
    if not path.is_file():
        return None
    try:
        cases = read_json(path, what="nnU-Net validation summary")["metric_per_case"]
        tp = sum(float(c["metrics"]["1"]["TP"]) for c in cases)
        fp = sum(float(c["metrics"]["1"]["FP"]) for c in cases)
        fn = sum(float(c["metrics"]["1"]["FN"]) for c in cases)
    except (InputError, KeyError, TypeError, ValueError):
        return None
    return math.nan if tp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
def _logged_epochs(fold_folder: Path) -> int:
    """Epochs an nnU-Net training log reports finished (its "Epoch time" lines), 0 without a log."""
    logs = sorted(fold_folder.glob("training_log_*.txt"))
    if not logs:
        return 0
    with open(logs[-1], encoding="utf-8", errors="replace") as fh:
        return sum(1 for line in fh if "Epoch time" in line)
