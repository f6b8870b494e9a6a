#!/usr/bin/env python
"""bonemets command line: detection and segmentation of bone metastases on CT.

A thin click layer: each command parses and validates its options, calls one library
function, and turns library :class:`analysis.errors.InputError` into a one-line message
with exit code 2 (``--debug`` shows the traceback instead). Heavy frameworks are imported
inside the commands that need them, so ``--help``, ``phantom``, ``validate`` and
``analyze`` start without TensorFlow or torch.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import click

from analysis.cohort.bone_maps import BONE_MAP_KINDS
from analysis.errors import DataProblems, InputError
# the option vocabularies, from their owners: plain data, no TensorFlow, torch or image readers
from bonemets_tf import choices as tf_choices
from bonemets_tf.models.catalog import TASKS
from nnunet_bridge.device import DEVICES as NNUNET_DEVICES

log = logging.getLogger("bonemets")

CASES_HELP = "Cases: 'test' (splits.json's test set; all when there is none), 'all', or ID,ID,..."

#: Is it CT? Declared once; predict, nnunet predict, serve, followup, validate and analyze share it
#: (the check: analysis.imaging.hounsfield.ct_problem).
CT_CHECK = click.option(
    "--no-ct-check", "ct_check", is_flag=True, flag_value=False, default=True,
    help="Accept volumes that do not look like CT in Hounsfield units (no air near -1000 HU in the field of "
         "view, nothing denser than air, values beyond CT's range), e.g. a genuine CT cropped tightly.")

#: Keras wing: predict, serve, followup and timeline run a RUN at the pixel spacing it was trained at
#: (bonemets_tf.predict); nnU-Net always resamples to its plan's spacing, so it has no such switch.
RESAMPLE = click.option(
    "--resample/--no-resample", default=True, show_default=True,
    help="Keras: run the model on slices resampled in-plane to the pixel spacing it was trained at (config.json) "
         "and bring the probabilities back linearly; --no-resample: at each input's own spacing (lesions then "
         "scale with the scanner's pixel size).")


class BonemetsGroup(click.Group):
    """Click group that reports bad input as one line and exit code 2."""

    def invoke(self, ctx: click.Context):  # noqa: D401 - click API
        try:
            return super().invoke(ctx)
        except DataProblems as exc:
            if ctx.find_root().params.get("debug"):
                raise
            for problem in exc.problems:
                click.echo(f"error: {problem}", err=True)
            sys.exit(exc.exit_code)
        except InputError as exc:
            if ctx.find_root().params.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except MemoryError:
            if ctx.find_root().params.get("debug"):
                raise
            click.echo("error: out of memory; use fewer --jobs, a smaller --batch-size or smaller volumes", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; no partial output was kept", err=True)
            sys.exit(130)


# ---- BEGIN tensorflow start-up output ----
#: TensorFlow's C++ log level for the CLI's process (and its children) unless the user set one:
#: 1 hides INFO; warnings and errors show.
TF_LOG_LEVEL = "1"
#: An absl log line: severity, date, time, thread, ``file:line]``, message.
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:[\d.]+\s+\d+ \S+:\d+\] (.*)$")
_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
#: Messages of a machine without an NVIDIA driver: the CUDA platform of a GPU build of TensorFlow
#: (TF 2.21: ``cuda_platform.cc``: E "failed call to cuInit: ... UNKNOWN ERROR (303)" when the
#: devices are first listed; ``cudart_stub.cc``: I "Could not find cuda drivers").
_NO_DRIVER = ("failed call to cuInit", "Could not find cuda drivers")


def nvidia_driver() -> bool:
    """Whether an NVIDIA kernel driver is loaded (Linux: ``/proc/driver/nvidia/version``)."""
    return Path("/proc/driver/nvidia/version").exists()


def tensorflow_output(lines: Iterable[str], *, driver: bool, show_info: bool) -> list[str]:
    """The lines of TensorFlow's start-up output worth showing.

    Dropped: absl INFO lines (and the lines continuing them) unless ``show_info`` (TF 2.21 prints
    them before it reads ``TF_CPP_MIN_LOG_LEVEL``), absl's preamble about that, and, on a machine
    without an NVIDIA driver, the CUDA platform's failure to find one. Every other line, errors
    included, is kept.

    >>> tensorflow_output(["E0000 00:00:17.5 8123 cuda_platform.cc:52] failed call to cuInit: INTERNAL: x",
    ...                    "E0000 00:00:17.6 8123 op.cc:1] a real error"], driver=False, show_info=False)
    ['E0000 00:00:17.6 8123 op.cc:1] a real error']
    """
    keep, dropping = [], False
    for line in lines:
        match = _ABSL_LINE.match(line)
        if match:
            severity, message = match.groups()
            dropping = (severity == "I" and not show_info) or (not driver and any(n in message for n in _NO_DRIVER))
        elif line.startswith(_ABSL_PREAMBLE):
            continue
        elif re.match(r"^\S+:\d+: \w*Warning:", line) or line.startswith("Traceback"):
            dropping = False  # a Python warning or traceback is its own message
        if not dropping:
            keep.append(line)
    return keep


@contextlib.contextmanager
def _filtered_stderr() -> Iterator[None]:
    """Collect what is written to file descriptor 2 (C++ and Python) during the block, then write
    back the lines :func:`tensorflow_output` keeps."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().decode("utf-8", "replace").splitlines()
            show_info = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0").strip() in ("", "0")
            for line in tensorflow_output(lines, driver=nvidia_driver(), show_info=show_info):
                sys.stderr.write(line + "\n")
            sys.stderr.flush()


class QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """On the process's first ``import tensorflow``: import it and list its devices (where the
    CUDA platform starts) with stderr filtered by :func:`tensorflow_output`, then step aside.

    Installed by the CLI only (``main``); commands that never import TensorFlow pay nothing.
    """

    def find_spec(self, fullname: str, path, target=None):  # noqa: D102 - importlib API
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def quietly(module) -> None:
            with _filtered_stderr():
                exec_module(module)
                module.config.list_physical_devices()

        spec.loader.exec_module = quietly
        return spec


def quiet_tensorflow() -> None:
    """Set TensorFlow's log level (:data:`TF_LOG_LEVEL`, unless set) and filter its start-up
    output (:class:`QuietTensorFlowImport`), before TensorFlow is imported; the CLI only."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", TF_LOG_LEVEL)
    if "tensorflow" not in sys.modules and not any(isinstance(f, QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, QuietTensorFlowImport())
# ---- END tensorflow start-up output ----


@click.group(cls=BonemetsGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name=None, version=None, message="bonemets %(version)s")
def main(debug: bool, verbose: int) -> None:
    """Detect and segment osseous metastases on CT (Pawan, Rich et al.).

    Data commands (phantom, validate, split, import-dicom, import-bones, analyze, and
    followup with masks) need neither TensorFlow nor PyTorch; Keras commands (models,
    train, predict, gradcam, export) use TensorFlow; `nnunet` commands use PyTorch;
    serve and followup use the wing of the model they are given; review (the reader's web
    application) uses neither. Never both in one process.
    """
    level = logging.DEBUG if verbose >= 2 or debug else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # our own progress messages are INFO; show them by default
    logging.getLogger("bonemets").setLevel(min(level, logging.INFO))
    for name in ("analysis", "bonemets_tf", "nnunet_bridge", "study"):
        logging.getLogger(name).setLevel(min(level, logging.INFO))
    quiet_tensorflow()


def _version() -> str:
    from analysis import __version__

    return __version__


# click's version_option needs the version at decoration time without importing packages
main.params[-1].version = _version()  # type: ignore[attr-defined]


# ==== foundation: data commands =====================================================
# ---- BEGIN phantom ----
def _triple(kind: type, name: str, order: str):
    """Click callback parsing 'A,B,C' into a tuple of three ``kind`` values."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None):
        if value is None:
            return None
        parts = [p.strip() for p in value.split(",")]
        try:
            values = tuple(kind(p) for p in parts)
        except ValueError:
            values = ()
        if len(values) != 3 or any(v <= 0 for v in values):
            raise click.BadParameter(f"{value!r}: expected three positive {kind.__name__}s {order}", param_hint=name)
        return values

    return parse


@main.command()
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Dataset folder to create.")
@click.option("--cases", default=8, show_default=True, type=click.IntRange(min=1), help="Number of patients.")
@click.option("--seed", default=0, show_default=True, type=int, help="Cohort seed (same seed, same bytes).")
@click.option("--shape", callback=_triple(int, "--shape", "Z,Y,X (slices,rows,cols)"), metavar="Z,Y,X",
              help="Voxels per case [default: 48,128,128].")
@click.option("--spacing", callback=_triple(float, "--spacing", "X,Y,Z in mm"), metavar="X,Y,Z",
              help="Voxel size in mm [default: 1,1,3].")
@click.option("--scale", type=click.Choice(["paper"]), default=None,
              help="paper: 512x512 in-plane, 385 slices of 2.5 mm (replaces --shape/--spacing).")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty output folder.")
@click.option("--followup", is_flag=True,
              help="Also a second CT per patient, moved and with known lesion changes: followup/ (a cohort "
                   "layout), followup_truth.csv and followup_transforms.csv.")
@click.option("--timepoints", type=click.IntRange(2, 4), default=None,
              help="Also N CTs per patient over time (2-4) with a stated schedule of lesion events: timeline/t0.. "
                   "(cohort layouts), timeline_scans.csv (dates, motion, PCWG3 states), timeline_truth.csv (tracks) "
                   "and timeline_schedule.csv.")
def phantom(out: str, cases: int, seed: int, shape, spacing, scale: str | None, overwrite: bool,
            followup: bool, timepoints: int | None) -> None:
    """Write a synthetic CT cohort with lesion masks and bone maps (no patient data needed)."""
    from analysis.cohort.phantom import DEFAULT_SHAPE, DEFAULT_SPACING, generate_cohort

    if scale and (shape or spacing):
        raise click.BadParameter("--scale paper sets the grid; drop --shape/--spacing", param_hint="--scale")

    def progress(done: int, total: int, case: str) -> None:
        log.info("phantom: wrote %s (%d/%d)", case, done, total)

    companions = []
    if followup:
        from analysis.cohort.followup_phantom import Followups

        companions.append(Followups())
    if timepoints:
        from analysis.monitoring.timeline_phantom import Timelines

        companions.append(Timelines(timepoints))
    root = generate_cohort(out, cases=cases, seed=seed, shape=shape or DEFAULT_SHAPE,
                           spacing=spacing or DEFAULT_SPACING, scale=scale, overwrite=overwrite, progress=progress,
                           companion=companions)
    click.echo(f"wrote {cases} cases (imagesTr, labelsTr, bonesTr, dataset.json"
               f"{', followup/, followup_truth.csv' if followup else ''}"
               f"{', timeline/, timeline_scans.csv, timeline_truth.csv' if timepoints else ''}) to {root}")
# ---- END phantom ----

# ---- BEGIN validate/split/import ----
@main.command()
@click.argument("dataset", type=click.Path(file_okay=False, path_type=str))
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=str),
              help="Also write a quality-control report (index.html and PNGs, one row and overlay per case) here.")
@click.option("--overwrite", is_flag=True, help="With --report: replace an existing non-empty report folder.")
@CT_CHECK
def validate(dataset: str, report_dir: str | None, overwrite: bool, ct_check: bool) -> None:
    """Check a cohort folder and print a summary table (exit 2 on any problem)."""
    from analysis.cohort.validate import validate_dataset

    report = validate_dataset(dataset, ct_check=ct_check)
    if report.cases:
        click.echo(report.table())
    if report_dir is not None:
        from analysis.cohort.qc_report import write_qc_report

        qc = write_qc_report(dataset, report_dir, problems=report.problems, overwrite=overwrite)
        click.echo(f"wrote {qc.index} ({len(qc.rows)} cases, {qc.n_flagged} flagged)")
    if not report.ok:
        raise DataProblems(report.problems)
    click.echo(f"{dataset}: OK")


@main.command()
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--test-fraction", default=0.2, show_default=True, type=float, help="Share of patients held out for testing.")
@click.option("--folds", default=5, show_default=True, type=click.IntRange(min=1), help="Cross-validation folds over the rest.")
@click.option("--seed", default=0, show_default=True, type=int)
def split(dataset: str, test_fraction: float, folds: int, seed: int) -> None:
    """Write DATASET/splits.json: a patient-level test set plus k folds."""
    from analysis.cohort.splits import write_splits

    path = write_splits(dataset, test_fraction=test_fraction, folds=folds, seed=seed)
    click.echo(f"wrote {path}")


@main.command("import-dicom")
@click.argument("dicom_dir", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--dataset", required=True, type=click.Path(path_type=str), help="Cohort folder (created when missing).")
@click.option("--case", "case", help="Case id for the imported series (not with --all).")
@click.option("--label", type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="Lesion label: a mask (NIfTI/NRRD) with the CT's geometry, a DICOM-SEG or an RTSTRUCT of the series.")
@click.option("--segment", metavar="NUMBER|LABEL|all", help="DICOM-SEG label: the segment (default: the only one; all: merged).")
@click.option("--roi", "rois", multiple=True, metavar="NAME", help="RTSTRUCT label: the ROI (repeat to merge several).")
@click.option("--series", help="SeriesInstanceUID to pick when the folder holds several series.")
@click.option("--overwrite", is_flag=True, help="Replace an existing case of the same id.")
@click.option("--all", "all_", is_flag=True, help="DICOM_DIR holds one folder per patient: import them all (resumable).")
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="With --all: CSV case,label_path[,roi_or_segment]; else a SEG/RTSTRUCT beside the series is used.")
def import_dicom_cmd(dicom_dir: str, dataset: str, case: str | None, label: str | None, segment: str | None,
                     rois: tuple[str, ...], series: str | None, overwrite: bool, all_: bool, labels_csv: str | None) -> None:
    """Import a CT DICOM series (HU) as imagesTr/ID_0000.nii.gz with an optional label, or a whole export (--all)."""
    if all_:
        given = [name for name, value in (("--case", case), ("--label", label), ("--segment", segment),
                                          ("--roi", rois), ("--series", series)) if value]
        if given:
            raise click.UsageError(f"{', '.join(given)} choose within one case; with --all use --labels CSV")
        from analysis.cohort.import_all import import_all

        summary = import_all(dicom_dir, dataset, labels_csv=labels_csv, overwrite=overwrite,
                             progress=lambda done, total, o: log.info("[%d/%d] %s: %s", done, total, o.case, o.status))
        click.echo(summary.table())
        if summary.failed:
            raise DataProblems([f"case {o.case}: {o.message}" for o in summary.failed])
        return
    if case is None or labels_csv is not None:
        raise click.UsageError("--case ID is required (or --all for a folder of patients; --labels goes with --all)")
    from analysis.cohort.imports import import_dicom

    path = import_dicom(dicom_dir, dataset, case, label=label, series=series, overwrite=overwrite,
                        segment=segment, rois=rois)
    click.echo(f"wrote {path}")


@main.command("import-reviews")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--dataset", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Cohort folder to add the reviewed studies to (created when missing).")
def import_reviews_cmd(root: str, dataset: str) -> None:
    """Add every signed or viewer-reviewed study of a spool or PRED folder to a cohort: the CT, the
    kept lesions as label, the rejected ones as hard negatives (negativesTr/); resumable."""
    from analysis.review.import_reviews import import_reviews

    summary = import_reviews(root, dataset, progress=lambda done, total, o: log.info(
        "[%d/%d] study %s: %s", done, total, o.study_uid, o.status))
    click.echo(summary.table())
    if summary.failed:
        raise DataProblems([f"study {o.study_uid}: {o.message}" for o in summary.failed])


@main.command("import-bones")
@click.argument("seg", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--dataset", required=True, type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--case", "case", required=True, help="Case id whose CT the map belongs to.")
def import_bones_cmd(seg: str, dataset: str, case: str) -> None:
    """Map a TotalSegmentator v2 "total" multilabel map to bonesTr/ID.nii.gz."""
    from analysis.cohort.imports import import_bones

    path = import_bones(seg, dataset, case)
    click.echo(f"wrote {path}")
# ---- END validate/split/import ----

# ==== analysis ======================================================================
# ---- BEGIN analyze ----
@main.command("analyze")
@click.option("--dataset", required=True, type=click.Path(exists=True, file_okay=False), help="Cohort folder (imagesTr, labelsTr, optional bonesTr).")
@click.option("--predictions", "predictions", required=True, type=click.Path(exists=True, file_okay=False),
              help="PRED folder: PRED/<model>/<case>.nii.gz masks and/or PRED/<model>/slices.csv.")
@click.option("--out", required=True, type=click.Path(), help="Output folder (written atomically).")
@click.option("--cases", default="test", show_default=True, help=CASES_HELP)
@click.option("--no-radiomics", is_flag=True, help="Skip the pyradiomics ICC analysis.")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(min=1), help="Processes for radiomics.")
@click.option("--connectivity", default="26", show_default=True, type=click.Choice(["6", "18", "26"]), help="3D lesion connectivity.")
@click.option("--cluster-slices", default=10, show_default=True, type=click.IntRange(min=0),
              help="Lesions whose slice ranges are at most this many slices apart are neighbours.")
@click.option("--diffuse-fraction", default=0.6, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="A lesion is diffuse when it covers at least this fraction of its 2D bone region in some slice.")
@click.option("--threshold", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="A detector's slice is positive when its probability is >= this.")
@click.option("--bone-hu", default=None, type=float, help="Without bonesTr, CT >= this many HU is bone (default 150).")
@click.option("--froc-floor", default=0.1, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="FROC candidates: connected components of voxel probability >= this (PRED/<model>/probabilities/).")
@click.option("--bootstrap", default=1000, show_default=True, type=click.IntRange(min=0),
              help="Patient-level bootstrap resamples for 95% intervals (0: none).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the bootstrap.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty OUT.")
@CT_CHECK
def analyze_cmd(dataset: str, predictions: str, out: str, cases: str, no_radiomics: bool, jobs: int, connectivity: str,
                cluster_slices: int, diffuse_fraction: float, threshold: float, bone_hu: float | None, froc_floor: float,
                bootstrap: int, seed: int, overwrite: bool, ct_check: bool) -> None:
    """Segmentation, detection, clinical lesion metrics, t-tests and radiomics ICC into OUT."""
    from analysis.evaluation.analyze import run_analysis
    from analysis.lesions import DEFAULT_BONE_HU

    path = run_analysis(dataset, predictions, out, cases=cases, radiomics=not no_radiomics, jobs=jobs,
                        connectivity=int(connectivity), cluster_slices=cluster_slices,
                        diffuse_fraction=diffuse_fraction, threshold=threshold,
                        bone_hu=DEFAULT_BONE_HU if bone_hu is None else bone_hu, froc_floor=froc_floor,
                        bootstrap=bootstrap, seed=seed, overwrite=overwrite, ct_check=ct_check)
    click.echo(f"wrote {path / 'report.md'}")
# ---- END analyze ----

# ==== Keras / TensorFlow (bonemets_tf) ==============================================
# ---- BEGIN tf ----
def _arch_names() -> list[str]:
    from bonemets_tf.models.catalog import names  # plain data: no TensorFlow import

    return names()


@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models_cmd(as_json: bool) -> None:
    """List the registered Keras models with task and parameter count (full width, 1 channel).

    Builds each model to count its parameters (a few seconds).
    """
    import json as _json

    from bonemets_tf.models.summary import model_table

    rows = model_table()
    if as_json:
        click.echo(_json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':<13}{'task':<9}{'params':>12}{'paper':>12}  description")
    for r in rows:
        paper = f"{r['paper_params']:,}" if r["paper_params"] else "-"
        click.echo(f"{r['name']:<13}{r['task']:<9}{r['params']:>12,}{paper:>12}  {r['description']}")


@main.command("train")
@click.option("--dataset", required=True, type=click.Path(exists=True, file_okay=False), help="Cohort folder.")
@click.option("--task", default=None, type=click.Choice(TASKS),
              help="Detection or segmentation (required unless --init-from).")
@click.option("--arch", default=None, type=click.Choice(_arch_names()),
              help="Registered model (see `models`; required unless --init-from).")
@click.option("--init-from", default=None, type=click.Path(exists=True, file_okay=False, path_type=str),
              help="Fine-tune a RUN: start from its weights, with its architecture (task, arch, width, context) "
                   "and spacing; config.json records it as the parent.")
@click.option("--hard-negative-fraction", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Share of training crops centred on hard negatives (negativesTr/, from import-reviews).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="RUN folder to write.")
@click.option("--fold", default=0, show_default=True, type=click.IntRange(min=0), help="Fold of splits.json.")
@click.option("--epochs", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--steps-per-epoch", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1), help="Global batch size.")
@click.option("--image-size", default=256, show_default=True, type=click.IntRange(min=32),
              help="Detector resize side / segmenter crop side (segmenters: a multiple of 8).")
@click.option("--width", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Filter-count multiplier (segmenters and resnet34).")
@click.option("--context", default=1, show_default=True, type=click.IntRange(min=1), help="Adjacent slices as channels (odd).")
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Adam learning rate.")
@click.option("--lr-schedule", default="constant", show_default=True, type=click.Choice(tf_choices.LR_SCHEDULES),
              help="cosine: decay from --lr to 1% of it over all training steps.")
@click.option("--positive-fraction", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Share of lesion slices among the training samples.")
@click.option("--lesion-crop-p", default=0.7, show_default=True, type=click.FloatRange(0, 1),
              help="Segmenters: probability of centring a lesion slice's crop on lesion.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--jit/--no-jit", default=None, help="XLA-compile the train step [default: on when a GPU is visible].")
@click.option("--precision", default="float32", show_default=True,
              type=click.Choice(tf_choices.TRAIN_PRECISIONS))
@click.option("--strategy", default="auto", show_default=True, type=click.Choice(tf_choices.STRATEGIES),
              help="auto: one device; mirrored: all local GPUs; multiworker: TF_CONFIG cluster (chief writes RUN).")
@click.option("--resume", is_flag=True, help="Continue the run in --out after its last completed epoch.")
@click.option("--deterministic", is_flag=True, help="Enable TensorFlow op determinism (slower).")
@click.option("--run-eagerly", is_flag=True,
              help="Run steps eagerly, without tracing (slower per step; saves the trace of big "
                   "models: worth it for a few steps only).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="Local weights file to start from.")
@click.option("--bn-momentum", default=0.9, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="BatchNormalization momentum while training (Keras's own default is 0.99).")
@click.option("--warmup-steps", type=click.IntRange(min=0),
              help="Linear learning-rate warm-up steps [default: 10% of all steps, at most one epoch].")
@click.option("--clip-norm", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Clip each step's gradients to this global norm.")
@click.option("--guard/--no-guard", default=True, show_default=True,
              help="Collapse guard: restore the last good epoch at a lower rate when the model's calls "
                   "become constant; fail (exit 3) if it cannot recover.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False),
              help="Slice cache folder [default: ~/.cache/bonemets/slices].")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out.")
@click.pass_context
def train_cmd(ctx: click.Context, out: str, resume: bool, overwrite: bool, cache_dir: str | None, **settings) -> None:
    """Train a Keras detector or segmenter and write a RUN folder (model.keras, config.json,
    history.csv, checkpoints/, logs/); --init-from fine-tunes a RUN."""
    from bonemets_tf.train import TrainConfig, train

    if settings["init_from"] is not None:
        from bonemets_tf.lineage import inherited_settings, parent_run

        given = {k: v for k, v in settings.items()
                 if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT}
        defaults = {k: v for k, v in settings.items() if k not in given}
        settings = {**defaults, **inherited_settings(parent_run(settings["init_from"]), given)}
    elif settings["task"] is None or settings["arch"] is None:
        raise click.UsageError("--task and --arch are required (unless --init-from RUN)")
    path = train(TrainConfig(**settings), out, resume=resume, overwrite=overwrite, cache_dir=cache_dir)
    click.echo(f"wrote {path}")
# ---- END tf ----

# ---- BEGIN tf-infer ----
IMAGES_HELP = ("New patients instead of a cohort: a NIfTI/NRRD/MHA file, a folder of them, a DICOM series "
               "folder, or a folder of patient folders holding DICOM series.")


def prediction_options(command):
    """The options `predict` and `nnunet predict` share, declared once: the fields of
    :class:`analysis.prediction.request.PredictRequest` plus the inputs and the output folder.
    Their values are checked by the request (one line, exit code 2), the same for both wings."""
    shared = [
        click.option("--dataset", default=None, type=click.Path(path_type=str), help="Cohort folder (imagesTr, labelsTr)."),
        click.option("--images", default=None, type=click.Path(path_type=str), help=IMAGES_HELP),
        click.option("--out", required=True, type=click.Path(path_type=str), help="PRED/NAME folder to write (case by case)."),
        click.option("--cases", default="test", show_default=True, help=CASES_HELP),
        click.option("--shard", default=None, metavar="I/N", help="Only sorted(cases)[I::N] (I is 0-based), e.g. 0/4."),
        click.option("--series", default=None, metavar="UID", help="DICOM: use this SeriesInstanceUID."),
        click.option("--probabilities", is_flag=True, help="Also write probabilities/<case>.nii.gz (uint8, scale 1/255)."),
        click.option("--dicom-seg", is_flag=True, help="Also write dicom_seg/<case>.dcm (DICOM input only)."),
        click.option("--sr", is_flag=True, help="Also write sr/<case>.dcm, a TID 1500 measurement report of the "
                                                "lesions, with the SEG it references (DICOM input only)."),
        click.option("--preview/--no-preview", default=True, show_default=True, help="Draw preview/<case>.png."),
        click.option("--crop/--no-crop", default=False, show_default=True,
                     help="Run the segmenter on windows around the body instead of whole slices. Keras: exact (each "
                          "window holds the network's receptive radius of real context on its stride grid); "
                          "nnU-Net: approximate (its sliding window moves). Checked on one slice per case "
                          "(predict.json)."),
        click.option("--min-size", default=0, show_default=True, type=int, metavar="VOXELS",
                     help="Remove 3D components (26-connected) smaller than this; 0 keeps all."),
        click.option("--bones", default=None, type=click.Path(path_type=str),
                     help="Folder of bone maps <case>.nii.gz for the lesion table's bone and weight-bearing columns."),
        click.option("--bones-from", default="project", show_default=True,
                     type=click.Choice(BONE_MAP_KINDS),
                     help="Bone maps hold the cohort's bone codes, or TotalSegmentator 'total' ids."),
        click.option("--overwrite", is_flag=True, help="Replace a --out written with other settings, or redo its cases."),
        CT_CHECK,
    ]
    for option in reversed(shared):
        command = option(command)
    return command


def _threshold_or_auto(ctx, param, value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected a probability in [0, 1] or 'auto'") from None


@main.command("predict")
@click.option("--model", "model", required=True, type=click.Path(path_type=str),
              help="RUN folder from `train`, or a SavedModel from `export` (segmenter or detector).")
@prediction_options
@click.option("--threshold", default="0.5", show_default=True, callback=_threshold_or_auto, metavar="P|auto",
              help="A pixel is lesion when its probability is >= this; 'auto': the segmenter RUN's "
                   "validation-calibrated threshold (RUN/calibration.json, written by `train`).")
@click.option("--detector", type=click.Path(path_type=str), default=None,
              help="Detector RUN (or SavedModel) for the cascade: only slices it marks are segmented.")
@click.option("--detector-threshold", default=0.5, show_default=True, type=float,
              help="Cascade: segment slices whose detector probability is >= this.")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Slices per network call.")
@click.option("--precision", default="float32", show_default=True, type=click.Choice(tf_choices.PREDICT_PRECISIONS),
              help="mixed_bfloat16: faster on CPUs and GPUs with bf16 units (RUN folders only).")
@click.option("--mirror", is_flag=True,
              help="Average the segmenter over the slice and its mirror images along rows, cols and both "
                   "(4 passes): nnU-Net's 2D test-time mirroring, for a like-for-like comparison.")
@RESAMPLE
def predict_cmd(model: str, dataset: str | None, images: str | None, out: str, detector: str | None,
                **options) -> None:
    """Segment volumes to PRED/NAME/<case>.nii.gz (plus lesions.csv, patients.csv, previews),
    or score slices to PRED/NAME/slices.csv, for a cohort (--dataset) or new patients (--images)."""
    from analysis.prediction.folder import read_record
    from bonemets_tf.predict import PredictOptions, predict

    path = predict(model, dataset, out, options=PredictOptions.from_options(options), detector=detector,
                   images=images)
    timing = read_record(path)["timing"]
    click.echo(f"wrote {path} ({timing['network_slices']} slices through the networks, "
               f"{timing['slices_per_s']} slices/s)")


@main.command("gradcam")
@click.option("--model", "model", required=True, type=click.Path(path_type=str), help="Detector RUN folder from `train`.")
@click.option("--dataset", default=None, type=click.Path(path_type=str), help="Cohort folder.")
@click.option("--images", default=None, type=click.Path(path_type=str),
              help="New patients instead of a cohort: image files or DICOM series folders (see predict).")
@click.option("--out", required=True, type=click.Path(path_type=str), help="Output folder (written atomically).")
@click.option("--cases", default="test", show_default=True, help=CASES_HELP)
@click.option("--max-slices", default=4, show_default=True, type=int, help="Overlays per case (its most confident slices).")
@click.option("--method", default="gradcam", show_default=True, type=click.Choice(tf_choices.GRADCAM_METHODS))
@click.option("--batch-size", default=8, show_default=True, type=int, help="Slices per network call.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@CT_CHECK
def gradcam_cmd(model: str, dataset: str | None, images: str | None, out: str, cases: str, max_slices: int, method: str, batch_size: int,
                overwrite: bool, ct_check: bool) -> None:
    """Grad-CAM overlays (PNG), heat-map volumes (NIfTI) and gradcam.csv for a detector."""
    from bonemets_tf.gradcam import gradcam

    path = gradcam(model, dataset, out, cases=cases, max_slices=max_slices, method=method, batch_size=batch_size,
                   overwrite=overwrite, images=images, ct_check=ct_check)
    click.echo(f"wrote {path}")


@main.command("export")
@click.option("--model", "model", required=True, type=click.Path(path_type=str), help="RUN folder from `train`.")
@click.option("--out", required=True, type=click.Path(path_type=str), help="SavedModel folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
def export_cmd(model: str, out: str, overwrite: bool) -> None:
    """Export a RUN as a TensorFlow SavedModel: ct_hu (HU) -> lesion_probability."""
    from bonemets_tf.export import export_savedmodel

    path = export_savedmodel(model, out, overwrite=overwrite)
    click.echo(f"wrote {path} (signature serving_default: ct_hu -> lesion_probability)")
# ---- END tf-infer ----

# ==== nnU-Net / PyTorch (nnunet_bridge) =============================================
# ---- BEGIN nnunet ----


def _nnunet_folds(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    """Parse --folds 0,1,2 into a tuple of distinct non-negative ints."""
    if value is None:
        return None
    try:
        folds = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected fold numbers like 0,1,2,3,4") from None
    if not folds or min(folds) < 0 or len(set(folds)) != len(folds):
        raise click.BadParameter(f"{value!r}: expected distinct fold numbers like 0,1,2,3,4")
    return folds


def _nnunet_patch(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    """Parse --patch-size 64,64 into (rows, cols)."""
    if value is None:
        return None
    try:
        patch = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected ROWS,COLS like 64,64") from None
    if len(patch) != 2 or min(patch) < 1:
        raise click.BadParameter(f"{value!r}: expected two positive integers ROWS,COLS like 64,64")
    return patch  # type: ignore[return-value]


def _nnunet_plan_options(command):
    """The scaled-plan options `nnunet train` and `nnunet prepare` share (nnunet_bridge.plans)."""
    options = [
        click.option("--width", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Feature-width multiplier of a plan derived from nnU-Net's (as the Keras --width; "
                          "default: nnU-Net's own plan)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Batch of the derived plan (default: nnU-Net's planned batch)."),
        click.option("--patch-size", default=None, callback=_nnunet_patch,
                     help="2D patch ROWS,COLS of the derived plan; nnU-Net's topology for it (default: nnU-Net's "
                          "planned patch)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.group("nnunet")
def nnunet_group() -> None:
    """nnU-Net v2 (PyTorch, 2d configuration) on the cohort's patients and splits."""


@nnunet_group.command("train")
@click.option("--dataset", required=True, type=click.Path(exists=True, file_okay=False), help="Cohort folder with splits.json.")
@click.option("--work", required=True, type=click.Path(file_okay=False), help="Work folder for every nnU-Net file.")
@click.option("--folds", default="0,1,2,3,4", show_default=True, callback=_nnunet_folds, help="Folds to train.")
@click.option("--epochs", type=int, default=None, help="Epochs (nnU-Net default 1000).")
@click.option("--iterations", type=int, default=None, help="Training iterations per epoch (nnU-Net default 250).")
@click.option("--val-iterations", type=int, default=None, help="Validation iterations per epoch (nnU-Net default 50).")
@click.option("--device", type=click.Choice(NNUNET_DEVICES), default="auto", show_default=True,
              help="auto: CUDA when available, else CPU.")
@click.option("--num-gpus", type=click.IntRange(min=1), default=1, show_default=True,
              help="GPUs per fold (nnU-Net DDP when > 1).")
@click.option("--resume", is_flag=True, help="Continue each fold from nnU-Net's latest checkpoint.")
@_nnunet_plan_options
def nnunet_train_cmd(dataset: str, work: str, folds: tuple[int, ...], epochs: int | None, iterations: int | None,
                     val_iterations: int | None, device: str, num_gpus: int, resume: bool, width: float | None,
                     batch_size: int | None, patch_size: tuple[int, int] | None) -> None:
    """Convert the training patients to 2D slices, plan/preprocess, and train nnU-Net folds
    (nnU-Net's own plan, or one derived from it with --width/--batch-size/--patch-size)."""
    from nnunet_bridge.train import TrainOptions, train

    report = train(dataset, work, TrainOptions(folds=folds, epochs=epochs, iterations=iterations,
                                               val_iterations=val_iterations, device=device, num_gpus=num_gpus,
                                               resume=resume, width=width, batch_size=batch_size,
                                               patch_size=patch_size))
    click.echo(f"trained fold(s) {','.join(map(str, report.folds))} of plan {report.plans} in {work}; "
               f"network parameters {report.parameters:,} (paper 30.6M)")


@nnunet_group.command("prepare")
@click.option("--dataset", required=True, type=click.Path(exists=True, file_okay=False), help="Cohort folder with splits.json.")
@click.option("--work", required=True, type=click.Path(file_okay=False), help="Work folder for every nnU-Net file.")
@_nnunet_plan_options
def nnunet_prepare_cmd(dataset: str, work: str, width: float | None, batch_size: int | None,
                       patch_size: tuple[int, int] | None) -> None:
    """Only convert, plan and preprocess into WORK (run once before training folds in parallel)."""
    from nnunet_bridge.plans import PlanScale
    from nnunet_bridge.train import prepare_work

    layout = prepare_work(dataset, work, PlanScale(width=width, batch_size=batch_size, patch_size=patch_size))
    same = "".join(f" --{k} {v}" for k, v in (("width", width), ("batch-size", batch_size),
                                             ("patch-size", None if patch_size is None else
                                              ",".join(map(str, patch_size)))) if v is not None)
    click.echo(f"prepared {layout.work} (plan {layout.plans_identifier}); train folds with "
               f"`nnunet train --work {work} --folds K{same}`")


@nnunet_group.command("predict")
@click.option("--work", required=True, type=click.Path(exists=True, file_okay=False), help="Work folder of `nnunet train`.")
@prediction_options
@click.option("--folds", default=None, callback=_nnunet_folds, help="Folds to ensemble (default: every trained fold).")
@click.option("--device", type=click.Choice(NNUNET_DEVICES), default="auto", show_default=True,
              help="auto: CUDA when available, else CPU.")
@click.option("--no-mirroring", is_flag=True, help="Disable mirroring test-time augmentation (4x faster in 2D).")
def nnunet_predict_cmd(dataset: str | None, images: str | None, work: str, out: str, no_mirroring: bool,
                       **options) -> None:
    """Predict lesion masks OUT/<case>.nii.gz (uint8, the input's geometry), lesions.csv, patients.csv
    and previews with the trained folds, for a cohort (--dataset) or new patients (--images)."""
    from nnunet_bridge.predict import PredictOptions, predict

    written = predict(dataset, work, out, PredictOptions.from_options({**options, "mirroring": not no_mirroring}),
                      images=images)
    click.echo(f"wrote {len(written)} mask(s) to {out}")
# ---- END nnunet ----

# ---- BEGIN serve ----
def _node_options(command):
    """predict's own options that mean the same for the node (declared once in prediction_options);
    its input comes from the network and its output goes to the spool, so not the others."""
    before = list(getattr(command, "__click_params__", []))
    command = prediction_options(command)
    keep = {"crop", "min_size", "bones", "bones_from", "ct_check"}
    command.__click_params__ = [p for p in command.__click_params__ if p.name in keep or p in before]
    return command


def _node_model_loader(model: str | None, nnunet_work: str | None, options: dict):
    """``load_model() -> NodeModel`` of the one wing asked for: each call reads the model at
    ``--model``/``--nnunet-work`` again (resolved once: a later switch of a symbolic link needs the
    next SIGHUP) and predicts a series as ``predict --images series_dir --dicom-seg --sr`` (or
    ``nnunet predict``) does; only that wing is imported."""
    from analysis.node.server import NodeModel

    shared = {**options, "dicom_seg": True, "sr": True, "preview": False}
    if model is not None:
        from bonemets_tf.predict import PredictOptions, predict
        from bonemets_tf.run import read_run

        opts = PredictOptions.from_options(shared)

        def load_keras() -> NodeModel:
            run = read_run(model, savedmodel=True)
            return NodeModel(lambda series_dir, out: predict(run.path, None, out, options=opts, images=series_dir),
                             name=run.name, fingerprint=run.fingerprint(), source=str(run.path))

        return load_keras
    from nnunet_bridge.predict import PredictOptions, model_identity, predict

    opts = PredictOptions.from_options({k: v for k, v in shared.items()
                                        if k not in ("threshold", "precision", "resample")})

    def load_nnunet() -> NodeModel:
        work, name, fingerprint = model_identity(nnunet_work, opts.folds)
        return NodeModel(lambda series_dir, out: predict(None, work, out, opts, images=series_dir),
                         name=name, fingerprint=fingerprint, source=str(work))

    return load_nnunet


@main.command("serve")
@click.option("--model", default=None, type=click.Path(exists=True, path_type=str),
              help="Keras RUN folder or SavedModel (as predict).")
@click.option("--nnunet-work", default=None, type=click.Path(exists=True, file_okay=False, path_type=str),
              help="nnU-Net work folder instead of --model (as nnunet predict).")
@click.option("--spool", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Spool folder: received instances, jobs, failed/ and undelivered/ (a journal: restart with it).")
@click.option("--destination", required=True, metavar="AE@HOST:PORT|dicomweb:URL",
              help="Where SEG and SR go: a DICOM node (C-STORE) or a DICOMweb root (STOW-RS).")
@click.option("--port", default=11112, show_default=True, type=click.IntRange(0, 65535))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--ae-title", default="BONEMETS", show_default=True, help="The node's AE title.")
@click.option("--allow", default=None, metavar="AE[,AE...]", help="Accept associations only from these calling AE titles.")
@click.option("--idle-seconds", default=10.0, show_default=True, type=float,
              help="A series is complete when no instance of it arrived for this long.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), help="Series predicted at once.")
@click.option("--no-dicom-seg", is_flag=True, help="Do not send the SEG.")
@click.option("--no-sr", is_flag=True, help="Do not send the measurement report.")
@click.option("--min-free-gb", default=1.0, show_default=True, type=float,
              help="Refuse instances (out of resources) below this much free space on the spool's disk.")
@click.option("--retries", default=5, show_default=True, type=click.IntRange(min=0),
              help="Delivery retries before a result goes to the spool's undelivered/ folder.")
@click.option("--retry-seconds", default=5.0, show_default=True, type=float,
              help="Wait before the first retry; doubled for each next one.")
@click.option("--priors", default=3, show_default=True, type=click.IntRange(min=0),
              help="Per new CT series, up to this many earlier CT studies of the patient (the node's archive, then "
                   "the destination by C-FIND/C-GET or QIDO/WADO-RS; newest first) make a timeline whose report is "
                   "delivered in place of predict's; 0: none, nothing archived.")
@click.option("--once", is_flag=True, help="Process what is in the spool (no listening) and exit.")
@click.option("--resend", is_flag=True, help="First move undelivered results back to be delivered again.")
@_node_options
@click.option("--threshold", default="0.5", show_default=True, callback=_threshold_or_auto, metavar="P|auto",
              help="Keras: as predict --threshold.")
@click.option("--precision", default="float32", show_default=True, type=click.Choice(tf_choices.PREDICT_PRECISIONS),
              help="Keras: as predict --precision.")
@RESAMPLE
def serve_cmd(model: str | None, nnunet_work: str | None, spool: str, destination: str, port: int, host: str,
              ae_title: str, allow: str | None, idle_seconds: float, workers: int, no_dicom_seg: bool, no_sr: bool,
              min_free_gb: float, retries: int, retry_seconds: float, priors: int, once: bool, resend: bool,
              **options) -> None:
    """A DICOM node: receive CT (C-STORE) from a PACS, predict each complete series as
    `predict --images` does, and send the SEG and the TID 1500 report back (C-STORE or STOW-RS).
    SIGHUP reads the model again (after the running predictions); SIGTERM stops."""
    import signal
    from pathlib import Path

    from analysis.node.deliver import Destination
    from analysis.node.server import Node, NodeConfig
    from analysis.node.spool import Spool

    if (model is None) == (nnunet_work is None):
        raise InputError("give either --model (Keras RUN or SavedModel) or --nnunet-work (nnU-Net work folder)")
    _refuse_no_resample(nnunet_work, options["resample"])
    config = NodeConfig(spool=Path(spool), destination=Destination.parse(destination), ae_title=ae_title, host=host,
                        port=port, allow=tuple(a.strip() for a in allow.split(",") if a.strip()) if allow else (),
                        idle_seconds=idle_seconds, workers=workers, min_free_gb=min_free_gb, retries=retries,
                        retry_seconds=retry_seconds, deliver_seg=not no_dicom_seg, deliver_sr=not no_sr,
                        priors=priors)
    config.check()
    if resend:
        moved = Spool(config.spool).resend()
        log.info("serve --resend: %d result folder(s) to deliver again", len(moved))
    load_model = _node_model_loader(model, nnunet_work, options)
    node = Node(config, load_model(), load_model=load_model)
    signal.signal(signal.SIGTERM, lambda *_: node.stop())
    signal.signal(signal.SIGHUP, lambda *_: node.reload())
    done = node.run(once=once)
    click.echo(f"serve: {done} series predicted; spool {spool}")
# ---- END serve ----

# ---- BEGIN review ----
@main.group("review", invoke_without_command=True)
@click.option("--spool", default=None, type=click.Path(exists=True, file_okay=False, path_type=str),
              help="A node's spool (serve --spool): review the studies it predicted.")
@click.option("--pred", "preds", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=str),
              help="A PRED/NAME folder of predict --images on DICOM (repeatable).")
@click.option("--users", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="The readers and their password hashes (review add-user NAME --users FILE).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; put a TLS proxy in front of anything but 127.0.0.1 (docs/review.md).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--destination", default=None, metavar="AE@HOST:PORT|dicomweb:URL",
              help="Where signed results go (as serve); without it they wait in the review outbox.")
@click.option("--ae-title", default="BONEMETS", show_default=True, help="Calling AE title of a C-STORE.")
@click.option("--retries", default=5, show_default=True, type=click.IntRange(min=0),
              help="Delivery retries before a signed result goes to review/outbox/undelivered/.")
@click.option("--retry-seconds", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="Wait before the first retry; doubled for each next one.")
@click.option("--resend", is_flag=True, help="First move undelivered signed results back to be delivered again.")
@click.option("--secure-cookies", is_flag=True, help="Mark the session cookie Secure (served through HTTPS by a proxy).")
@click.option("--idle-minutes", default=30.0, show_default=True, type=click.FloatRange(min=1),
              help="A reader's session ends after this long without a request.")
@click.pass_context
def review_cmd(ctx: click.Context, spool: str | None, preds: tuple[str, ...], users: str | None, host: str, port: int,
               destination: str | None, ae_title: str, retries: int, retry_seconds: float, resend: bool,
               secure_cookies: bool, idle_minutes: float) -> None:
    """A web application for the reader: accept or reject each predicted lesion, add missed ones,
    sign; the final SEG and verified report go to the PACS (docs/review.md)."""
    if ctx.invoked_subcommand is not None:
        return
    import signal
    from pathlib import Path

    from analysis.node.deliver import Destination, Retries
    from analysis.review.server import ReviewConfig, resend as resend_undelivered, serve

    if users is None:
        raise InputError("review: --users FILE is required (create it with `review add-user NAME --users FILE`)")
    config = ReviewConfig(spool=Path(spool) if spool else None, preds=tuple(Path(p) for p in preds),
                          users=Path(users), host=host, port=port,
                          destination=Destination.parse(destination) if destination else None, ae_title=ae_title,
                          retries=Retries(retries, retry_seconds), secure_cookies=secure_cookies,
                          idle_minutes=idle_minutes)
    if resend:
        log.info("review --resend: %d signed result(s) to deliver again", len(resend_undelivered(config)))

    def _end(*_):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _end)
    serve(config)


@review_cmd.command("add-user")
@click.argument("name")
@click.option("--users", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="The users file (created if missing; mode 0600).")
def review_add_user_cmd(name: str, users: str) -> None:
    """Add reader NAME (or set a new password); the password is asked for, or read from standard input."""
    from analysis.review.auth import add_user

    if sys.stdin.isatty():
        password = click.prompt(f"password for {name}", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    new = add_user(users, name, password)
    click.echo(f"{'added' if new else 'updated'} reader {name} in {users}")
# ---- END review ----

# ---- BEGIN followup ----
def _comparison_options(command):
    """The matching, status and registration options followup and timeline share (one declaration)."""
    for option in reversed([
        click.option("--match-mm", default=10.0, show_default=True, type=float,
                     help="Lesions that overlap nothing match when their centroids are this close (mm, after "
                          "registration)."),
        click.option("--change", default=0.2, show_default=True, type=float,
                     help="Relative volume change for grown / shrunk (0.2 = 20 %)."),
        click.option("--min-change-ml", default=0.1, show_default=True, type=float,
                     help="Smallest absolute volume change for grown / shrunk (ml)."),
        click.option("--min-lesion-ml", default=None, type=float, metavar="ML",
                     help="A lesion on one scan only is new or resolved from this volume up; smaller ones are "
                          "'indeterminate' and do not count toward the new-lesion flag (nor as new for PCWG3) "
                          "[default: 0.1, a 5.8 mm sphere: the Fleischner Society's smallest CT finding that is "
                          "followed; 0: every one counts]."),
        click.option("--no-registration", is_flag=True,
                     help="The scans are already aligned: skip the registration and its check."),
        click.option("--series", default=None, metavar="UID", help="DICOM: use this SeriesInstanceUID."),
        click.option("--overwrite", is_flag=True, help="Replace an existing --out."),
        CT_CHECK,
    ]):
        command = option(command)
    return command


def _predictor_options(scans: str):
    """``--model`` and ``--nnunet-work`` of followup and timeline: the model that predicts ``scans``."""
    def decorate(command):
        command = RESAMPLE(command)
        command = click.option("--nnunet-work", default=None,
                               type=click.Path(exists=True, file_okay=False, path_type=str),
                               help=f"nnU-Net work folder: predict {scans} (as `nnunet predict`).")(command)
        return click.option("--model", default=None, type=click.Path(exists=True, file_okay=False, path_type=str),
                            help=f"Keras RUN or SavedModel: predict {scans} (as `predict`).")(command)
    return decorate


def _refuse_no_resample(nnunet_work: str | None, resample: bool) -> None:
    """``--no-resample`` is the Keras wing's: nnU-Net always runs at its plan's spacing."""
    if nnunet_work is not None and not resample:
        raise InputError(f"--no-resample is for a Keras --model; nnU-Net (--nnunet-work {nnunet_work}) always "
                         "resamples to its plan's spacing")


def _scan_predictor(model: str | None, nnunet_work: str | None, series: str | None, ct_check: bool = True,
                    resample: bool = True):
    """``predictor(images, folder)``: one CT predicted into a PRED folder by the one wing asked for
    (followup and timeline); None without a model. Only that wing is imported."""
    if model is not None:  # the Keras wing only: TensorFlow and torch never share a process
        from bonemets_tf.predict import PredictOptions, predict

        options = PredictOptions(cases="all", series=series, preview=False, ct_check=ct_check, resample=resample)

        def predictor(images: str, folder) -> None:
            predict(model, None, str(folder), options=options, images=images)

        return predictor
    if nnunet_work is not None:
        _refuse_no_resample(nnunet_work, resample)
        from nnunet_bridge.predict import PredictOptions as NnunetOptions, predict as nnunet_predict

        def predictor(images: str, folder) -> None:
            nnunet_predict(None, nnunet_work, str(folder), NnunetOptions(cases="all", series=series, preview=False,
                                                                         ct_check=ct_check), images=images)

        return predictor
    return None


@main.command("followup")
@click.option("--baseline", required=True, type=click.Path(exists=True, path_type=str),
              help="Baseline CT: a NIfTI/NRRD/MHA file or a DICOM series folder (as predict --images).")
@click.option("--followup", "followup_ct", required=True, type=click.Path(exists=True, path_type=str),
              help="Follow-up CT of the same patient, in any of those forms.")
@click.option("--out", required=True, type=click.Path(path_type=str), help="Folder to write (refused if it exists).")
@_predictor_options("both CTs")
@click.option("--baseline-mask", default=None, type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="Baseline lesion mask (the CT's geometry) instead of a model.")
@click.option("--followup-mask", default=None, type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="Follow-up lesion mask (the CT's geometry) instead of a model.")
@click.option("--baseline-bones", default=None, type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="Baseline bone map (project codes) for the bone column.")
@click.option("--followup-bones", default=None, type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="Follow-up bone map (project codes), for new lesions.")
@_comparison_options
@click.option("--sr", is_flag=True, help="DICOM baseline: also write followup_sr.dcm (TID 1500 report of the "
              "statuses and changes) and followup_seg.dcm (the tracked lesions) on the baseline series.")
def followup_cmd(baseline: str, followup_ct: str, out: str, model: str | None, nnunet_work: str | None,
                 resample: bool, baseline_mask: str | None, followup_mask: str | None, baseline_bones: str | None,
                 followup_bones: str | None, match_mm: float, change: float, min_change_ml: float,
                 min_lesion_ml: float | None, no_registration: bool, series: str | None, sr: bool, overwrite: bool,
                 ct_check: bool) -> None:
    """Compare two CTs of one patient lesion by lesion: new, resolved, grown, shrunk, stable, indeterminate.

    The follow-up is registered rigidly to the baseline (refused when their bones do not align),
    lesions are matched in the baseline frame, and OUT gets lesions.csv, summary.csv,
    status.nii.gz, followup_registered.nii.gz, preview.png and followup.json.
    """
    from analysis.monitoring.followup import FollowupSettings, run_followup

    masks = (baseline_mask is not None) + (followup_mask is not None)
    if (model is not None) + (nnunet_work is not None) + (masks > 0) != 1 or masks == 1:
        raise InputError("followup: give exactly one of --model RUN|SAVEDMODEL, --nnunet-work WORK, or both "
                         "--baseline-mask and --followup-mask")
    predictor = _scan_predictor(model, nnunet_work, series, ct_check, resample)
    settings = FollowupSettings(match_mm=match_mm, change=change, min_change_ml=min_change_ml,
                                register=not no_registration,
                                **({} if min_lesion_ml is None else {"min_lesion_ml": min_lesion_ml}))
    path = run_followup(baseline, followup_ct, out, baseline_mask=baseline_mask, followup_mask=followup_mask,
                        predictor=predictor, model=model or nnunet_work, baseline_bones=baseline_bones,
                        followup_bones=followup_bones, settings=settings, series=series, overwrite=overwrite,
                        sr=sr, ct_check=ct_check)
    from analysis.lesions.change import describe_counts
    from analysis.monitoring.followup import read_summary

    summary = read_summary(path)
    click.echo(f"wrote {path}: {summary['baseline_lesions']} -> {summary['followup_lesions']} lesions; "
               f"{describe_counts(summary)}")


@main.command("timeline")
@click.argument("cts", nargs=-1, required=True, type=click.Path(exists=True, path_type=str))
@click.option("--out", required=True, type=click.Path(path_type=str), help="Folder to write (refused if it exists).")
@click.option("--masks", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="A lesion mask per CT, in the same order (repeat the option), instead of a model.")
@_predictor_options("every CT")
@click.option("--dates", default=None, metavar="YYYY-MM-DD,...",
              help="Each CT's date, in the same order (default: DICOM StudyDate; image files carry none).")
@click.option("--bones", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="A bone map (project codes) per CT, in the same order, for tracks.csv's bone column.")
@_comparison_options
@click.option("--pcwg3-new", default=2, show_default=True, type=int,
              help="New lesions that make a scan unconfirmed (PCWG3: 2).")
@click.option("--pcwg3-additional", default=2, show_default=True, type=int,
              help="Additional new lesions the confirming scan of t1 must show (PCWG3: 2).")
@click.option("--pcwg3-persist", default=2, show_default=True, type=int,
              help="New lesions of a later scan that must persist on its confirming scan (PCWG3: 2).")
@click.option("--pcwg3-interval-days", default=42, show_default=True, type=int,
              help="A confirming scan is at least this many days after the scan it confirms (PCWG3: 6 weeks).")
@click.option("--sr", is_flag=True, help="DICOM series: also a SEG and a TID 1500 report per follow-up study in "
              "OUT/dicom/ (one tracking identifier and UID per track in every study, the PCWG3 state).")
def timeline_cmd(cts: tuple[str, ...], out: str, masks: tuple[str, ...], model: str | None, nnunet_work: str | None,
                 resample: bool, dates: str | None, bones: tuple[str, ...], match_mm: float, change: float,
                 min_change_ml: float, min_lesion_ml: float | None, no_registration: bool, series: str | None, overwrite: bool,
                 ct_check: bool, pcwg3_new: int, pcwg3_additional: int, pcwg3_persist: int, pcwg3_interval_days: int,
                 sr: bool) -> None:
    """Track a patient's CTs over time: one id per lesion for life, the PCWG3 bone rule per scan.

    CTs in date order (image files or DICOM series folders); every scan is registered rigidly and
    directly to the first. OUT gets timeline.csv, tracks.csv, timeline.png, a preview per scan,
    index.html and timeline.json.
    """
    from analysis.monitoring.timeline import TimelineSettings, run_timeline

    if (model is not None) + (nnunet_work is not None) + bool(masks) != 1:
        raise InputError("timeline: give exactly one of --model RUN|SAVEDMODEL, --nnunet-work WORK, or --masks "
                         "(one per CT)")
    settings = TimelineSettings(match_mm=match_mm, change=change, min_change_ml=min_change_ml,
                                register=not no_registration, min_new=pcwg3_new, min_additional=pcwg3_additional,
                                min_persist=pcwg3_persist, interval_days=pcwg3_interval_days,
                                **({} if min_lesion_ml is None else {"min_lesion_ml": min_lesion_ml}))
    path = run_timeline(list(cts), out, masks=list(masks) or None,
                        predictor=_scan_predictor(model, nnunet_work, series, ct_check, resample),
                        model=model or nnunet_work, dates=dates.split(",") if dates else None,
                        bones=list(bones) or None, settings=settings, series=series, overwrite=overwrite, sr=sr,
                        ct_check=ct_check)
    from analysis.imaging.records import read_csv

    rows = read_csv(path / "timeline.csv")
    tracks = {r["track"] for r in read_csv(path / "tracks.csv")}
    click.echo(f"wrote {path}: {len(rows)} scans, {len(tracks)} lesion tracks; last scan {rows[-1]['date']}: "
               f"{rows[-1]['state']}")
# ---- END followup ----

# ==== whole study ===================================================================
# ---- BEGIN demo ----
@main.command()
@click.option("--out", default="demo_out", show_default=True, type=click.Path(file_okay=False, path_type=str),
              help="Demo folder; rerunning skips finished stages.")
@click.option("--quick", is_flag=True, help="Tiny budgets: the whole study in at most 10 minutes (smoke test).")
@click.option("--cases", type=click.IntRange(min=6), help="Phantom patients (default: 6 quick, 20 full).")
@click.option("--seed", default=0, show_default=True, type=int)
def demo(out: str, quick: bool, cases: int | None, seed: int) -> None:
    """The whole study on a phantom: 7 models, masks, analysis and a report.

    Each stage calls one library function (no cli.py commands); TensorFlow and PyTorch stages
    run in separate processes, one per framework group.
    """
    from study.demo import StageFailed, run_demo

    try:
        report = run_demo(out, quick=quick, cases=cases, seed=seed)
    except StageFailed as exc:
        click.echo(f"error: {exc}; rerun the same command to resume", err=True)
        sys.exit(1)
    click.echo(f"report: {report}")
    click.echo(f"report (HTML, figures embedded): {report.with_suffix('.html')}")
# ---- END demo ----

# ---- BEGIN doctor ----
@main.command("doctor")
@click.option("--require-gpu", is_flag=True, help="A machine without a GPU is an error too (benchmarks/gpu.sh).")
def doctor_cmd(require_gpu: bool) -> None:
    """What each framework sees (each in its own process, with its wing's interpreter): versions,
    devices, CUDA/cuDNN, XLA, CPU bf16. Exit 1 when a GPU is present that a framework cannot use."""
    from study.doctor import run_doctor

    report = run_doctor(require_gpu=require_gpu)
    click.echo("\n".join(report.lines))
    sys.exit(0 if report.ok else 1)
# ---- END doctor ----

# ---- BEGIN wings ----
#: Commands that run one wing's framework (serve and followup: the wing of the model option given).
WING_OF = {"models": "tf", "train": "tf", "predict": "tf", "gradcam": "tf", "export": "tf", "nnunet": "torch"}
MODEL_OPTION_WING = {"--model": "tf", "--nnunet-work": "torch"}


def command_wing(args: list[str]) -> str | None:
    """The wing whose framework the command line ``args`` (without the program) runs, or None."""
    command = next((a for a in args if not a.startswith("-")), None)
    if command in ("serve", "followup", "timeline"):
        return next((MODEL_OPTION_WING[a.split("=")[0]] for a in args if a.split("=")[0] in MODEL_OPTION_WING), None)
    return WING_OF.get(command)


def run() -> None:
    """Entry point: a wing's command runs with that wing's interpreter (study.wings; two
    environments after `make setup GPU=1`), everything else in this one."""
    import os

    from study.wings import runs_here, wing_python

    wing = command_wing(sys.argv[1:])
    if wing and not os.environ.get("BONEMETS_WING"):  # set below: a handed-over command is never handed on
        try:
            python = wing_python(wing)
        except InputError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        if not runs_here(python):
            os.execve(python, [python, os.path.abspath(__file__), *sys.argv[1:]], {**os.environ, "BONEMETS_WING": wing})
    main()
# ---- END wings ----


if __name__ == "__main__":  # nnU-Net's worker pools use "spawn": keep this guard
    run()
