"""Records and tables, one format for the whole project (imaging room: file formats).

* :func:`format_value` / :func:`csv_text` / :func:`read_csv`: every CSV bonemets writes
  (``analyze``'s tables, ``lesions.csv``, ``patients.csv``, ``slices.csv``, training
  histories) has one format: empty cells for None and NaN, ``true``/``false`` for booleans,
  integers as integers, floats to 10 significant digits (unless a table asks for fewer, or for
  full precision: a training history keeps Keras's values as they were), ``\\n`` line ends, UTF-8.
* :func:`versions`: the ``versions`` record written beside every result.

Imports nothing from the rest of the core (only the package version).
"""
from __future__ import annotations

import csv
import importlib.metadata
import io
import math
import os
import platform
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["format_value", "csv_text", "read_csv", "versions", "CORE_DISTRIBUTIONS"]

#: Distributions the framework-neutral core depends on (recorded by :func:`versions`).
CORE_DISTRIBUTIONS = ("numpy", "scipy", "connected-components-3d", "SimpleITK", "pyradiomics-bhklab",
                      "pyradiomics", "matplotlib", "pandas")


def format_value(value: Any, digits: int | None = 10) -> str:
    """One CSV cell; a float to ``digits`` significant digits, or with ``digits=None`` in full
    (the shortest text that reads back to the same float, Python's ``repr``).

    >>> [format_value(v) for v in (None, float("nan"), True, 3, 0.1 + 0.2, "a")]
    ['', '', 'true', '3', '0.3', 'a']
    >>> format_value(0.1 + 0.2, digits=None)
    '0.30000000000000004'
    """
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        return repr(float(value)) if digits is None else format(float(value), f".{digits}g")
    return str(value)


def csv_text(columns: Sequence[str], rows: Iterable[Sequence[Any] | Mapping[str, Any]], *,
             digits: int | None = 10) -> str:
    """CSV text: a header of ``columns``, then one line per row (a sequence in column order, or a
    mapping read by column name), each cell through :func:`format_value`.

    >>> print(csv_text(("case", "dice"), [("a", 0.5), {"case": "b", "dice": None}]), end="")
    case,dice
    a,0.5
    b,
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        cells = [row[c] for c in columns] if isinstance(row, Mapping) else row
        writer.writerow([format_value(v, digits) for v in cells])
    return buf.getvalue()


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a CSV written by :func:`csv_text`, as ``{column: text}`` (no typing, no checks;
    readers that check their columns are beside their writers)."""
    with open(Path(path), encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def versions(*distributions: str, core: bool = False) -> dict[str, str]:
    """``{"bonemets": ..., "python": ..., dist: version, ...}`` for the installed distributions
    among ``distributions`` (and :data:`CORE_DISTRIBUTIONS` with ``core``); absent ones are left out."""
    from analysis import __version__

    out = {"bonemets": __version__, "python": platform.python_version()}
    for dist in (*(CORE_DISTRIBUTIONS if core else ()), *distributions):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out
