"""Per-lesion and per-patient tables for new patients (a model's prediction, no ground truth).

``lesions.csv`` has one row per predicted lesion, ``patients.csv`` one row per case
(:data:`LESION_COLUMNS`, :data:`PATIENT_COLUMNS`). Definitions are those of
``analyze`` (:func:`analysis.evaluation.analyze.run_analysis`), computed with the same functions of
:mod:`analysis.lesions`:

* lesions are 26-connected components of the mask, ids ``1..N`` in
  :func:`~analysis.lesions.lesion_instances` order on the stored array;
* ``n_neighbours``: other lesions whose slice range lies within ``cluster_slices``
  slices (:func:`~analysis.lesions.count_neighbours`);
* ``diffuse``: the lesion's largest per-slice fraction of its bone region is at least
  ``diffuse_fraction`` (:func:`~analysis.lesions.diffuse_fractions`), bone
  pixels from the bone map when one is given, else CT >= ``bone_hu``;
* ``bone``, ``weight_bearing``: :func:`~analysis.lesions.bone_identity` on the
  bone map (project codes, :data:`analysis.cohort.layout.BONE_CODES`); empty without one;
* ``long_axis_mm``, ``short_axis_mm``: the bidirectional measurement of the lesion's largest
  cross-section along array axis 0 (:func:`~analysis.lesions.cross_sections`: the maximum Feret
  diameter in that slice and the longest extent perpendicular to it, RECIST 1.1's axial long and
  short axis); the two last columns, so that readers of the earlier columns are unchanged.
* ``off_bone``: less than :data:`~analysis.lesions.MIN_ON_BONE` of the lesion's voxels on the
  bone map (mostly where a bone metastasis cannot be; the QC report's ``off bone`` rule); empty
  without a bone map; the last column.

Everything is computed on the arrays in the stored file's order, as ``analyze`` does,
so ``z_first``/``z_last`` and the slice-based definitions (neighbours, diffuse) follow
the file's third index (array axis 0), which is axial for CT as scanners store it.
Centroids are in patient coordinates: ITK physical space (LPS, mm), independent of the
storage order.

Resumable runs: each finished case keeps its rows in its part record of the prediction
folder (:class:`analysis.prediction.folder.PredictionFolder`), and the tables are rebuilt from
every finished case (:func:`analysis.prediction.runner.lesion_tables`).
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from analysis.cohort.imports import bones_from  # noqa: F401  (part of this module's API)
from analysis.errors import InputError
from analysis.imaging.io import Geometry, atomic_write_text
from analysis.lesions import (DEFAULT_BONE_HU, LOCATION_CATEGORIES, MIN_ON_BONE, CrossSection, bone_identity,
                              count_neighbours, cross_sections, diffuse_fractions, lesion_instances, lesion_table,
                              on_bone_fractions)
from analysis.imaging.records import csv_text

__all__ = ["LESION_COLUMNS", "PATIENT_COLUMNS", "REGION_COLUMNS", "lesion_rows", "lesion_sections", "patient_row",
           "bones_from",
           "csv_text", "write_rows", "read_rows", "read_lesions", "read_patients", "LESIONS_CSV", "PATIENTS_CSV"]

#: The lesion table of a PRED folder (one row per lesion, :data:`LESION_COLUMNS`) and its patient
#: table (one row per case, :data:`PATIENT_COLUMNS`).
LESIONS_CSV = "lesions.csv"
PATIENTS_CSV = "patients.csv"

#: Columns of ``lesions.csv`` (other tools read these: do not rename).
LESION_COLUMNS: tuple[str, ...] = ("case", "lesion_id", "voxels", "volume_ml", "x_mm", "y_mm", "z_mm", "z_first",
                                   "z_last", "hu_mean", "hu_max", "score", "n_neighbours", "diffuse", "bone",
                                   "weight_bearing", "long_axis_mm", "short_axis_mm", "off_bone")
#: Bone regions counted per patient (``bone`` values of :data:`LESION_COLUMNS`).
REGION_COLUMNS: tuple[str, ...] = (*LOCATION_CATEGORIES, "other", "unknown")
#: Columns of ``patients.csv``.
PATIENT_COLUMNS: tuple[str, ...] = ("case", "lesions", "volume_ml", "largest_ml", "weight_bearing", "diffuse",
                                    *REGION_COLUMNS)

_INT = {"lesion_id", "voxels", "z_first", "z_last", "n_neighbours", "lesions", *REGION_COLUMNS}
_FLOAT = {"volume_ml", "x_mm", "y_mm", "z_mm", "hu_mean", "hu_max", "score", "largest_ml", "long_axis_mm",
          "short_axis_mm"}
_BOOL_LESION = {"diffuse", "weight_bearing", "off_bone"}          # bools in lesions.csv, counts in patients.csv



def _check_shapes(geometry: Geometry, **arrays: np.ndarray | None) -> None:
    for name, arr in arrays.items():
        if arr is not None and tuple(np.shape(arr)) != geometry.shape:
            raise ValueError(f"{name}: shape {np.shape(arr)} differs from the geometry's (slices, rows, cols) "
                             f"{geometry.shape}")


def _lesion_sums(labels: np.ndarray, n: int, ct: np.ndarray, probability: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per-lesion voxel index sums, HU sum and maximum and the highest probability, slice by
    slice, so memory stays that of one slice however large the lesions (index ``id``; 0 unused)."""
    size = n + 1
    sums = {k: np.zeros(size, np.float64) for k in ("count", "z", "y", "x", "hu")}
    hu_max = np.full(size, -np.inf)
    score = np.full(size, -np.inf) if probability is not None else None
    for z in range(labels.shape[0]):
        lab = labels[z]
        inside = lab != 0
        if not inside.any():
            continue
        ids = lab[inside].astype(np.int64)
        yy, xx = np.nonzero(inside)
        count = np.bincount(ids, minlength=size)
        sums["count"] += count
        sums["z"] += z * count
        sums["y"] += np.bincount(ids, weights=yy, minlength=size)
        sums["x"] += np.bincount(ids, weights=xx, minlength=size)
        hu = np.asarray(ct[z])[inside].astype(np.float64)
        sums["hu"] += np.bincount(ids, weights=hu, minlength=size)
        np.maximum.at(hu_max, ids, hu)
        if score is not None:
            np.maximum.at(score, ids, np.asarray(probability[z])[inside].astype(np.float64))
    sums["hu_max"] = hu_max
    sums["score"] = score
    return sums


def _centroids_mm(sums: dict[str, np.ndarray], geometry: Geometry) -> np.ndarray:
    """Centroids ``(n, 3)`` in ITK physical ``(x, y, z)`` mm from the per-lesion index sums."""
    count = np.maximum(sums["count"][1:], 1)
    index_xyz = np.stack([sums["x"][1:], sums["y"][1:], sums["z"][1:]], axis=1) / count[:, None]
    d = np.asarray(geometry.direction, np.float64).reshape(3, 3)
    return np.asarray(geometry.origin, np.float64)[None, :] + (index_xyz * np.asarray(geometry.spacing)) @ d.T


def lesion_rows(case: str, mask: np.ndarray, ct: np.ndarray, geometry: Geometry, *,
                probability: np.ndarray | None = None, bones: np.ndarray | None = None,
                cluster_slices: int = 10, diffuse_fraction: float = 0.6,
                bone_hu: float = DEFAULT_BONE_HU,
                labels: tuple[np.ndarray, int] | None = None,
                sections: Sequence[CrossSection] | None = None,
                probability_scale: float = 1.0) -> list[dict[str, Any]]:
    """One row per lesion of a predicted mask, columns :data:`LESION_COLUMNS`.

    Args:
        case: case id (first column).
        mask: ``(slices, rows, cols)`` in the stored file's order; non-zero is lesion.
        ct: ``(slices, rows, cols)`` HU, same order.
        geometry: the stored file's geometry (ITK ``(x, y, z)`` order).
        probability: ``(slices, rows, cols)`` voxel probabilities; ``score`` is each
            lesion's highest one. None leaves ``score`` empty.
        bones: ``(slices, rows, cols)`` project bone codes 0..7 (``bonesTr``,
            :func:`bones_from`); None leaves ``bone`` and ``weight_bearing`` empty and
            takes bone pixels for the diffuse rule from ``ct >= bone_hu``.
        cluster_slices: largest slice gap between neighbouring lesions.
        diffuse_fraction: a lesion is diffuse when its largest per-slice bone-region
            fraction is at least this.
        bone_hu: HU threshold for bone pixels without a bone map.
        labels: ``lesion_instances(mask, 26)`` when the caller has it already (saves a
            labelling of a large volume).
        sections: :func:`lesion_sections` of those labels when the caller has them already.
        probability_scale: ``probability`` holds stored values times this (e.g. the uint8
            map of :mod:`analysis.prediction.probabilities`: pass the float64 ``1 / 255``, not
            the file's float32 slope, whose 255 x float32(1/255) = 1.0000000591 is above 1;
            a score is a probability and stays in [0, 1]).

    Returns:
        Dicts keyed by :data:`LESION_COLUMNS` in that order, lesion ids ``1..N``:
        ``voxels`` count, ``volume_ml`` ml, ``x_mm, y_mm, z_mm`` the centroid (mean voxel
        index mapped to ITK physical space: LPS mm), ``z_first``/``z_last`` array axis 0
        indices, ``hu_mean``/``hu_max`` HU over the lesion's voxels, ``score`` float or
        None, ``n_neighbours`` int, ``diffuse`` bool, ``bone`` str or None,
        ``weight_bearing`` bool or None, ``long_axis_mm``/``short_axis_mm`` mm, ``off_bone`` bool
        or None. An empty mask gives no rows.

    Raises:
        ValueError: an array whose shape differs from the geometry's.
    """
    _check_shapes(geometry, mask=mask, ct=ct, probability=probability, bones=bones)
    labels, n = lesion_instances(mask, 26) if labels is None else labels
    if n == 0:
        return []
    table = lesion_table(labels, n, spacing_mm=geometry.spacing)
    sums = _lesion_sums(labels, n, ct, probability)
    centroids = _centroids_mm(sums, geometry)
    hu_mean = sums["hu"][1:] / table.voxels
    hu_max = sums["hu_max"][1:]
    score = None if sums["score"] is None else sums["score"][1:] * probability_scale
    bone_px = (bones > 0) if bones is not None else (np.asarray(ct) >= bone_hu)
    diffuse = diffuse_fractions(labels, n, bone_px) >= diffuse_fraction
    neighbours = count_neighbours(table.z_first, table.z_last, cluster_slices)
    names, wb = bone_identity(labels, table, bones) if bones is not None else (None, None)
    sections = lesion_sections((labels, n), geometry, table=table) if sections is None else sections
    off = on_bone_fractions(labels, n, bones) < MIN_ON_BONE if bones is not None else None
    rows = []
    for i in range(n):
        rows.append({
            "case": case, "lesion_id": i + 1, "voxels": int(table.voxels[i]),
            "volume_ml": float(table.volume_ml[i]),
            "x_mm": float(centroids[i, 0]), "y_mm": float(centroids[i, 1]), "z_mm": float(centroids[i, 2]),
            "z_first": int(table.z_first[i]), "z_last": int(table.z_last[i]),
            "hu_mean": float(hu_mean[i]), "hu_max": float(hu_max[i]),
            "score": None if score is None else float(score[i]),
            "n_neighbours": int(neighbours[i]), "diffuse": bool(diffuse[i]),
            "bone": None if names is None else names[i],
            "weight_bearing": None if wb is None else bool(wb[i]),
            "long_axis_mm": float(sections[i].long_axis_mm), "short_axis_mm": float(sections[i].short_axis_mm),
            "off_bone": None if off is None else bool(off[i]),
        })
    return rows


def lesion_sections(labels: tuple[np.ndarray, int], geometry: Geometry, *,
                    table: Any = None) -> list[CrossSection]:
    """Each lesion's largest cross-section along array axis 0 with its long and short axis
    (:func:`analysis.lesions.cross_sections`), in the pixel spacing of ``geometry``.

    Args:
        labels: ``(labels, n)`` of :func:`~analysis.lesions.lesion_instances`, ``(slices, rows, cols)``.
        geometry: their geometry (ITK ``(x, y, z)`` spacing: columns are x, rows y).
        table: their :func:`~analysis.lesions.lesion_table` when the caller has it already.
    """
    array, n = labels
    table = lesion_table(array, n, spacing_mm=geometry.spacing) if table is None else table
    return cross_sections(array, table, pixel_spacing_mm=(float(geometry.spacing[1]), float(geometry.spacing[0])))


def patient_row(case: str, lesion_rows: Sequence[dict[str, Any]], *, has_bones: bool | None = None) -> dict[str, Any]:
    """One row of ``patients.csv`` from a case's lesion rows, columns :data:`PATIENT_COLUMNS`.

    Args:
        case: case id.
        lesion_rows: the case's rows from :func:`lesion_rows` (or read back from a CSV).
        has_bones: whether a bone map was used. None infers it from the rows (a lesion
            with a ``bone`` value), which a case without lesions cannot tell: pass it
            explicitly so that such a case gets zero region counts instead of empty ones.

    Returns:
        ``lesions`` count, ``volume_ml`` total ml, ``largest_ml`` ml (0 without lesions),
        ``diffuse`` number of diffuse lesions, ``weight_bearing`` number of lesions in
        weight-bearing bone, and one count per region of :data:`REGION_COLUMNS`;
        ``weight_bearing`` and the region counts are None without a bone map.

    Raises:
        ValueError: rows of another case, or ``has_bones`` contradicting the rows.
    """
    rows = list(lesion_rows)
    others = sorted({r["case"] for r in rows} - {case})
    if others:
        raise ValueError(f"patient_row({case!r}): lesion rows of other cases {others[:3]}")
    with_bone = [r["bone"] is not None for r in rows]
    if any(with_bone) and not all(with_bone):
        raise ValueError(f"case {case}: some lesion rows have a bone, others do not")
    inferred = bool(rows) and all(with_bone)
    if has_bones is None:
        has_bones = inferred
    elif rows and has_bones != inferred:
        raise ValueError(f"case {case}: has_bones={has_bones} but the lesion rows "
                         f"{'have' if inferred else 'lack'} bone values")
    volumes = [float(r["volume_ml"]) for r in rows]
    out: dict[str, Any] = {
        "case": case, "lesions": len(rows), "volume_ml": float(sum(volumes)),
        "largest_ml": float(max(volumes, default=0.0)),
        "weight_bearing": sum(bool(r["weight_bearing"]) for r in rows) if has_bones else None,
        "diffuse": sum(bool(r["diffuse"]) for r in rows),
    }
    for region in REGION_COLUMNS:
        out[region] = sum(r["bone"] == region for r in rows) if has_bones else None
    return out


# --- CSV tables and per-case parts ---------------------------------------------------------


def write_rows(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> Path:
    """Write dict rows as CSV atomically, in the project's one CSV format (:mod:`analysis.imaging.records`).

    Empty for None/NaN, ``true``/``false`` for booleans, floats with 10 significant digits.
    """
    return atomic_write_text(path, csv_text(columns, rows))


def _parse(path: Path, column: str, text: str, lesion_table: bool) -> Any:
    if text == "":
        return None
    try:
        if column in _BOOL_LESION and lesion_table:
            if text not in ("true", "false"):
                raise ValueError(text)
            return text == "true"
        if column in _INT or column in _BOOL_LESION:
            return int(text)
        if column in _FLOAT:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(text)
            return value
    except ValueError:
        raise InputError(f"{path}: column {column}: {text!r} is not a valid value") from None
    return text


def read_rows(path: str | os.PathLike, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Read a table written by :func:`write_rows` back into typed dict rows.

    Args:
        path: ``lesions.csv``, ``patients.csv`` or one of their part files.
        columns: :data:`LESION_COLUMNS` or :data:`PATIENT_COLUMNS`.

    Returns:
        Rows with the types :func:`lesion_rows` / :func:`patient_row` give (empty cells None).

    Raises:
        InputError: missing file, or a header or value that does not fit ``columns``.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: not found")
    lesion = tuple(columns) == LESION_COLUMNS
    with open(p, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(header) != tuple(columns):
            raise InputError(f"{p}: header {header} differs from the expected columns {','.join(columns)}")
        rows = []
        for line_no, cells in enumerate(reader, 2):
            if len(cells) != len(columns):
                raise InputError(f"{p}: line {line_no} has {len(cells)} fields, expected {len(columns)}")
            rows.append({c: _parse(p, c, v, lesion) for c, v in zip(columns, cells)})
    return rows


def read_lesions(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The typed rows of a PRED folder's :data:`LESIONS_CSV` (:func:`read_rows`, :data:`LESION_COLUMNS`).

    Raises:
        InputError: no table, or one that does not fit :data:`LESION_COLUMNS`.
    """
    return read_rows(Path(folder) / LESIONS_CSV, LESION_COLUMNS)


def read_patients(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The typed rows of a PRED folder's :data:`PATIENTS_CSV` (:func:`read_rows`, :data:`PATIENT_COLUMNS`).

    Raises:
        InputError: no table, or one that does not fit :data:`PATIENT_COLUMNS`.
    """
    return read_rows(Path(folder) / PATIENTS_CSV, PATIENT_COLUMNS)
