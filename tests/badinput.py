"""Shared checks for the bad-input tables (core, tf and nnunet test processes).

Framework-free: imported by tests/test_bad_input.py, tests/tf/test_bad_input_tf.py and
tests/nnunet/test_bad_input_nnunet.py. Each bad input must give exit code 2, exactly one
``error:`` line that names the file and what was expected versus found, no traceback,
and no change at all under the test's folder (no output, inputs untouched).
"""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from analysis.imaging.io import Geometry, write_array


def snapshot(root: Path) -> dict[str, str]:
    """Every file (sha256) and folder (``dir``) under ``root``, hidden ones included."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def invoke(args: Sequence[str]):
    """Run ``python cli.py ARGS`` in-process (click's runner); returns the click Result."""
    from click.testing import CliRunner

    from cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def error_lines(text: str) -> list[str]:
    """Lines that start with ``error:`` (click's own usage errors say ``Error:``)."""
    return [ln for ln in text.splitlines() if ln.strip().lower().startswith("error:")]


def assert_clean_error(result, needles: Sequence[str]) -> str:
    """Exit code 2, one ``error:`` line holding every needle, no traceback; returns the line."""
    text = result.output + (result.stderr if result.stderr not in result.output else "")
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"unexpected exception {result.exception!r}\n{text}"
    assert result.exit_code == 2, f"exit {result.exit_code}\n{text}"
    assert "Traceback" not in text, text
    lines = error_lines(text)
    assert len(lines) == 1, text
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# --- damaged files ---------------------------------------------------------------------------


def write_with(path: Path, reference: Geometry, array: np.ndarray | None = None, **changes) -> None:
    """Rewrite ``path`` with ``reference`` geometry changed by ``changes`` (size via ``array``)."""
    geom = Geometry(size=changes.get("size", reference.size), spacing=changes.get("spacing", reference.spacing),
                    origin=changes.get("origin", reference.origin), direction=changes.get("direction", reference.direction))
    if array is None:
        array = np.zeros(geom.shape, np.uint8)
    write_array(array, geom, path)


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file to ``keep`` of its bytes (an interrupted download)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def not_nifti(path: Path) -> None:
    """Replace a file with gzip-compressed text (a renamed file of another kind)."""
    path.write_bytes(gzip.compress(b"patient,notes\n1,this is a CSV, not an image\n"))


def empty(path: Path) -> None:
    path.write_bytes(b"")
