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
# ---- END phantom ----

# ---- BEGIN validate/split/import ----
# ---- END validate/split/import ----

# ==== analysis ======================================================================
# ---- BEGIN analyze ----
# ---- END analyze ----

# ==== Keras / TensorFlow (bonemets_tf) ==============================================
# ---- BEGIN tf ----
# ---- END tf ----

# ==== nnU-Net / PyTorch (nnunet_bridge) =============================================
# ---- BEGIN nnunet ----
# ---- END nnunet ----

# ==== whole study ===================================================================
# ---- BEGIN demo ----
# ---- END demo ----


if __name__ == "__main__":  # nnU-Net's worker pools use "spawn": keep this guard
    main()
