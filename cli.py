#!/usr/bin/env python
"""bonemets command line: detection and segmentation of bone metastases on CT.

A thin click layer: each command parses and validates its options, calls one library
function, and turns library :class:`analysis.errors.InputError` into a one-line message
with exit code 2 (``--debug`` shows the traceback instead). Heavy frameworks are imported
inside the commands that need them, so ``--help``, ``phantom``, ``validate`` and
``analyze`` start without TensorFlow or torch.
"""
from __future__ import annotations

import logging
import sys

import click

from analysis.errors import DataProblems, InputError

log = logging.getLogger("bonemets")

CASES_HELP = "Cases: 'test' (splits.json's test set; all when there is none), 'all', or ID,ID,..."


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


@click.group(cls=BonemetsGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name=None, version=None, message="bonemets %(version)s")
def main(debug: bool, verbose: int) -> None:
    """Detect and segment osseous metastases on CT (Pawan, Rich et al.).

    Data commands (phantom, validate, split, import-dicom, import-bones, analyze) need
    neither TensorFlow nor PyTorch; Keras commands (models, train, predict, gradcam,
    export) use TensorFlow; `nnunet` commands use PyTorch. Never both in one process.
    """
    level = logging.DEBUG if verbose >= 2 or debug else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # our own progress messages are INFO; show them by default
    logging.getLogger("bonemets").setLevel(min(level, logging.INFO))
    logging.getLogger("analysis").setLevel(min(level, logging.INFO))


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
def phantom(out: str, cases: int, seed: int, shape, spacing, scale: str | None, overwrite: bool) -> None:
    """Write a synthetic CT cohort with lesion masks and bone maps (no patient data needed)."""
    from analysis.phantom import DEFAULT_SHAPE, DEFAULT_SPACING, generate_cohort

    if scale and (shape or spacing):
        raise click.BadParameter("--scale paper sets the grid; drop --shape/--spacing", param_hint="--scale")

    def progress(done: int, total: int, case: str) -> None:
        log.info("phantom: wrote %s (%d/%d)", case, done, total)

    root = generate_cohort(out, cases=cases, seed=seed, shape=shape or DEFAULT_SHAPE,
                           spacing=spacing or DEFAULT_SPACING, scale=scale, overwrite=overwrite, progress=progress)
    click.echo(f"wrote {cases} cases (imagesTr, labelsTr, bonesTr, dataset.json) to {root}")
# ---- END phantom ----

# ---- BEGIN validate/split/import ----
@main.command()
@click.argument("dataset", type=click.Path(file_okay=False, path_type=str))
def validate(dataset: str) -> None:
    """Check a cohort folder and print a summary table (exit 2 on any problem)."""
    from analysis.validate import validate_dataset

    report = validate_dataset(dataset)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    if report.cases:
        click.echo(report.table())
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
    from analysis.splits import write_splits

    path = write_splits(dataset, test_fraction=test_fraction, folds=folds, seed=seed)
    click.echo(f"wrote {path}")


@main.command("import-dicom")
@click.argument("dicom_dir", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--dataset", required=True, type=click.Path(path_type=str), help="Cohort folder (created when missing).")
@click.option("--case", "case", required=True, help="Case id for the imported series.")
@click.option("--label", type=click.Path(exists=True, dir_okay=False, path_type=str), help="Lesion mask (NIfTI/NRRD) with the CT's geometry.")
@click.option("--series", help="SeriesInstanceUID to pick when the folder holds several series.")
@click.option("--overwrite", is_flag=True, help="Replace an existing case of the same id.")
def import_dicom_cmd(dicom_dir: str, dataset: str, case: str, label: str | None, series: str | None, overwrite: bool) -> None:
    """Import a CT DICOM series (HU) as imagesTr/ID_0000.nii.gz, with an optional mask."""
    from analysis.imports import import_dicom

    path = import_dicom(dicom_dir, dataset, case, label=label, series=series, overwrite=overwrite)
    click.echo(f"wrote {path}")


@main.command("import-bones")
@click.argument("seg", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--dataset", required=True, type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--case", "case", required=True, help="Case id whose CT the map belongs to.")
def import_bones_cmd(seg: str, dataset: str, case: str) -> None:
    """Map a TotalSegmentator v2 "total" multilabel map to bonesTr/ID.nii.gz."""
    from analysis.imports import import_bones

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
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty OUT.")
def analyze_cmd(dataset: str, predictions: str, out: str, cases: str, no_radiomics: bool, jobs: int, connectivity: str,
                cluster_slices: int, diffuse_fraction: float, threshold: float, bone_hu: float | None, overwrite: bool) -> None:
    """Segmentation, detection, clinical lesion metrics, t-tests and radiomics ICC into OUT."""
    from analysis.analyze import run_analysis
    from analysis.metrics.lesions import DEFAULT_BONE_HU

    path = run_analysis(dataset, predictions, out, cases=cases, radiomics=not no_radiomics, jobs=jobs,
                        connectivity=int(connectivity), cluster_slices=cluster_slices,
                        diffuse_fraction=diffuse_fraction, threshold=threshold,
                        bone_hu=DEFAULT_BONE_HU if bone_hu is None else bone_hu, overwrite=overwrite)
    click.echo(f"wrote {path / 'report.md'}")
# ---- END analyze ----

# ==== Keras / TensorFlow (bonemets_tf) ==============================================
# ---- BEGIN tf ----
# ---- END tf ----

# ---- BEGIN tf-infer ----
# ---- END tf-infer ----

# ==== nnU-Net / PyTorch (nnunet_bridge) =============================================
# ---- BEGIN nnunet ----
# ---- END nnunet ----

# ==== whole study ===================================================================
# ---- BEGIN demo ----
# ---- END demo ----


if __name__ == "__main__":  # nnU-Net's worker pools use "spawn": keep this guard
    main()
