"""What ``--images PATH`` holds: image files and DICOM series, each a case with an id.

PATH may be

- one image file (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``);
- a folder: its image files (directly in it; sub-folders are not searched for image files),
  plus every *series folder* at or below it (a folder directly holding DICOM image files,
  see :func:`analysis.imaging.dicom.series_folders`), one patient each. A folder may mix both.

Case ids:

- image file: its name without the extension and without a trailing ``_0000``
  (``pt01_0000.nii.gz`` -> ``pt01``);
- DICOM: the series folder's path relative to PATH with every character other than
  letters, digits, ``_`` and ``-`` replaced by ``_`` (``pt 01/CT`` -> ``pt_01_CT``); PATH
  itself being the series folder -> its own folder name.

Several series in one folder: every usable axial CT series of the folder is a case (the
issue's rule). The series :func:`analysis.imaging.dicom.find_series` would choose on its own (the
most slices, ties: the thinnest, then the lowest SeriesNumber) keeps the folder's id; each
further series gets ``<id>_s<SeriesNumber>`` (``<id>_s<n>`` numbered from 2 when it has no
SeriesNumber). With ``all_series=False`` only the chosen series is a case and the others are
recorded as skipped in its record. Localizers, non-CT and non-image objects, non-axial
series and further series failing the checks (one slice, gaps, tilt) are never cases;
they are recorded in the case's ``series.record["skipped"]``.

Two inputs with the same id are refused, naming both paths. Discovery reads headers only.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import SimpleITK as sitk

from analysis.errors import InputError
from analysis.imaging.dicom import DicomSeries, find_series, list_series, read_series, series_folders
from analysis.imaging.io import read_image

#: Image file endings accepted as cases (longest first, so ``.nii.gz`` wins over ``.gz``).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass(frozen=True)
class InputCase:
    """One case of ``--images``.

    Attributes:
        case_id: the case's id (see the module docstring).
        kind: ``"image"`` for an image file, ``"dicom"`` for a DICOM series.
        path: the image file, or the series folder.
        series: the DICOM series (headers only) for ``"dicom"``; None for ``"image"``.
    """

    case_id: str
    kind: Literal["image", "dicom"]
    path: Path
    series: DicomSeries | None = None

    def describe(self) -> str:
        """The path, with the series UID for a DICOM case (for messages)."""
        return f"{self.path} (series {self.series.series_uid})" if self.series is not None else str(self.path)


def sanitise_case_id(text: str) -> str:
    """``text`` with every character other than letters, digits, ``_`` and ``-`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def image_suffix(path: Path) -> str | None:
    """The image ending of ``path`` (case-insensitive), or None when it is not an image file."""
    name = path.name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)


def _image_case(path: Path) -> InputCase:
    suffix = image_suffix(path) or ""
    stem = path.name[: len(path.name) - len(suffix)]
    if stem.endswith("_0000"):
        stem = stem[: -len("_0000")]
    case_id = sanitise_case_id(stem)
    if not case_id:
        raise InputError(f"{path}: no case id left after removing the extension and _0000; rename the file")
    return InputCase(case_id=case_id, kind="image", path=path)


def _dicom_cases(root: Path, folder: Path, *, all_series: bool) -> list[InputCase]:
    rel = folder.relative_to(root)
    base = sanitise_case_id(str(rel) if str(rel) != "." else root.resolve().name)
    if all_series:
        found = list_series(folder)
    else:
        found = [find_series(folder)]
    cases = [InputCase(case_id=base, kind="dicom", path=folder, series=found[0])]
    for i, series in enumerate(found[1:], start=2):
        suffix = series.series_number if series.series_number is not None else i
        cases.append(InputCase(case_id=f"{base}_s{suffix}", kind="dicom", path=folder, series=series))
    return cases


def discover_inputs(path: str | os.PathLike, *, all_series: bool = True, series_uid: str | None = None,
                    errors: list[str] | None = None) -> list[InputCase]:
    """The cases ``--images PATH`` holds, in a stable order (image files, then series folders, sorted).

    Args:
        path: an image file or a folder (see the module docstring).
        all_series: every usable axial CT series of a folder is a case (default); False:
            only the one :func:`analysis.imaging.dicom.find_series` chooses (a tie is then refused).
        series_uid: keep only the DICOM series with this SeriesInstanceUID (``--series``);
            image files are kept.
        errors: when given, a series folder refused by :mod:`analysis.imaging.dicom` is reported
            here (one line naming it) and skipped, so one bad patient does not stop a batch.

    Returns:
        The cases; DICOM cases carry their :class:`~analysis.imaging.dicom.DicomSeries` (headers only).

    Raises:
        InputError: a missing path, a file of another kind, a folder holding no image file
            and no DICOM series, a series folder refused by :mod:`analysis.imaging.dicom`, or two
            inputs with one case id (naming both).
    """
    root = Path(path)
    if root.is_file():
        if image_suffix(root) is None:
            raise InputError(f"{root}: not an image file; expected one of {', '.join(IMAGE_SUFFIXES)} or a folder")
        return [_image_case(root)]
    if not root.is_dir():
        raise InputError(f"{root}: not found; expected an image file or a folder of images or DICOM series")
    cases = [_image_case(p) for p in sorted(root.iterdir()) if p.is_file() and image_suffix(p) is not None]
    for folder in series_folders(root):
        try:
            cases += _dicom_cases(root, folder, all_series=all_series)
        except InputError as exc:
            if errors is None:
                raise
            errors.append(str(exc))
    if series_uid is not None:
        dicom = [c for c in cases if c.series is not None]
        kept = [c for c in dicom if c.series.series_uid == series_uid]
        if not kept:
            found = ", ".join(sorted({c.series.series_uid for c in dicom})) or "none"
            raise InputError(f"--series {series_uid}: no such CT series under {root}; usable series found: {found}")
        cases = [c for c in cases if c.series is None] + kept
    if not cases and errors:
        return []
    if not cases:
        raise InputError(f"{root}: holds no image file ({', '.join(IMAGE_SUFFIXES)}) and no DICOM series")
    seen: dict[str, InputCase] = {}
    for case in cases:
        if case.case_id in seen:
            raise InputError(f"{case.describe()}: case id {case.case_id!r} is also that of "
                             f"{seen[case.case_id].describe()}; rename one of them")
        seen[case.case_id] = case
    return cases


def read_input(case: InputCase) -> tuple[sitk.Image, dict[str, Any]]:
    """Read one case's CT volume (the only step that decodes pixels).

    Args:
        case: from :func:`discover_inputs`.

    Returns:
        ``(image, record)``: a 3D image, ``(slices, rows, cols)`` as an array, HU; and
        ``{"case_id", "kind", "path", "dicom"}`` where ``"dicom"`` is the series' record
        (:func:`analysis.imaging.dicom.find_series`) for a DICOM case and None for an image file.

    Raises:
        InputError: an unreadable file or series.
    """
    if case.kind == "image":
        image = read_image(case.path)
        dicom = None
    else:
        if case.series is None:
            raise InputError(f"{case.path}: DICOM case {case.case_id} without its series; discover it first")
        image = read_series(case.series)
        dicom = case.series.record
    return image, {"case_id": case.case_id, "kind": case.kind, "path": str(case.path), "dicom": dicom}
