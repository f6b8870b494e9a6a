"""Slice cache: each case's CT and lesion mask decoded once into memory-mappable ``.npy``.

Training never decompresses NIfTI in its loop: :func:`ensure_cached` writes, per case,
``ct.npy`` (int16 HU, ``(slices, rows, cols)``), ``mask.npy`` (uint8 0/1, same layout),
``negatives.npy`` (uint8 0/1, the hard-negative map, only for a case with
``negativesTr/<case>.nii.gz``) and ``meta.json`` (shape, spacing, which slices hold lesion
and which hard negatives), all in the canonical
orientation (LPS, :mod:`analysis.imaging.orientation`) whatever the files' storage order. Cases are built one at a
time, so memory stays bounded by the largest case.

Location: ``CACHE/<case>.<key>/`` where ``CACHE`` is ``--cache`` or, by default,
``~/.cache/bonemets/slices``. The cache never goes inside the dataset (inputs are never
modified). ``key`` hashes the resolved paths, sizes and modification times of the
case's image and label (and hard-negative map, when it has one), so editing or replacing a file yields a new key and the stale
entry is simply not used (delete old entries by hand to reclaim space). Only the cases
asked for are read: building a training cache never opens a test case's files.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from analysis.cohort.case import read_case
from analysis.cohort.layout import Cohort
from analysis.errors import InputError
from analysis.imaging.io import atomic_write_json, umask_mode
from analysis.imaging.orientation import CANONICAL

log = logging.getLogger(__name__)

#: 2: arrays in the canonical orientation (analysis.imaging.orientation).
CACHE_VERSION = 2


def default_cache_dir() -> Path:
    """``~/.cache/bonemets/slices``: the default cache root."""
    return Path.home() / ".cache" / "bonemets" / "slices"


@dataclass(frozen=True)
class CachedCase:
    """One case in the cache.

    Attributes:
        case: case id.
        key: hash of the source files' paths, sizes and mtimes (see module docstring).
        folder: folder holding ``ct.npy``, ``mask.npy`` and ``meta.json``.
        shape: ``(slices, rows, cols)``.
        positive: per-slice flag, True where the mask has any lesion voxel.
        hard: per-slice flag, True where the hard-negative map has a voxel (all False
            without a map).
        has_negatives: the case has a hard-negative map (``negatives.npy``).
    """

    case: str
    key: str
    folder: Path
    shape: tuple[int, int, int]
    positive: tuple[bool, ...]
    hard: tuple[bool, ...] = ()
    has_negatives: bool = False

    @property
    def ct_path(self) -> Path:
        return self.folder / "ct.npy"

    @property
    def mask_path(self) -> Path:
        return self.folder / "mask.npy"

    def ct(self) -> np.ndarray:
        """CT as a read-only int16 memmap ``(slices, rows, cols)``."""
        return np.load(self.ct_path, mmap_mode="r")

    def mask(self) -> np.ndarray:
        """Mask as a read-only uint8 memmap ``(slices, rows, cols)``."""
        return np.load(self.mask_path, mmap_mode="r")

    def negatives(self) -> np.ndarray:
        """The hard-negative map as a read-only uint8 memmap ``(slices, rows, cols)``; zeros
        (in memory) for a case without one."""
        if not self.has_negatives:
            return np.zeros(self.shape, np.uint8)
        return np.load(self.folder / "negatives.npy", mmap_mode="r")


def case_key(cohort: Cohort, case: str) -> str:
    """Fingerprint of a case's image and label files (path, size, mtime), and its hard-negative
    map's when it has one (so a case without one keeps the key it had before maps existed),
    16 hex digits.

    Raises:
        InputError: a file is missing.
    """
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    extra = [cohort.negatives_path(case)] if cohort.has_negatives(case) else []
    for path in (cohort.image_path(case), cohort.label_path(case), *extra):
        if not path.is_file():
            raise InputError(f"{path}: file not found (case {case})")
        st = path.stat()
        h.update(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def fingerprint(cases: Sequence[CachedCase]) -> str:
    """Fingerprint of a set of cached cases (order-independent), 16 hex digits."""
    h = hashlib.sha256()
    for c in sorted(cases, key=lambda c: c.case):
        h.update(f"{c.case}:{c.key}\n".encode())
    return h.hexdigest()[:16]


def ensure_cached(cohort: Cohort, cases: Sequence[str], cache_dir: str | os.PathLike | None = None) -> list[CachedCase]:
    """Return the cache entries of ``cases``, building the missing ones case by case.

    Args:
        cohort: the dataset (read only).
        cases: case ids to cache.
        cache_dir: cache root; None uses :func:`default_cache_dir`.

    Returns:
        One :class:`CachedCase` per case, in the order given.

    Raises:
        InputError: missing or unreadable files, or a label unlike its image or not 0/1
            (:func:`analysis.cohort.case.read_case`).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = root.expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--cache {root}: cannot create the cache folder ({exc.strerror})") from None
    out = []
    for i, case in enumerate(cases):
        key = case_key(cohort, case)
        folder = root / f"{case}.{key}"
        if not (folder / "meta.json").is_file():
            log.info("caching case %s (%d/%d) in %s", case, i + 1, len(cases), folder)
            _build(cohort, case, key, folder)
        out.append(_load_meta(case, key, folder))
    return out


def _build(cohort: Cohort, case: str, key: str, folder: Path) -> None:
    # the networks train (and predict, analysis.prediction.runner) on the canonical view: the same patient
    # stored LPS, RAS or as a DICOM series gives the same slices
    source = read_case(cohort, case, canonical=True, negatives=True)
    ct, mask, spacing, negatives = source.image, source.label, source.geometry.spacing, source.negatives
    del source  # the file's CT is freed once converted
    ct = ct if ct.dtype == np.int16 else np.clip(np.rint(ct), -32768, 32767).astype(np.int16)
    positive = mask.reshape(mask.shape[0], -1).any(axis=1)
    hard = np.zeros_like(positive) if negatives is None else negatives.reshape(negatives.shape[0], -1).any(axis=1)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    os.chmod(tmp, umask_mode(0o777))
    try:
        np.save(tmp / "ct.npy", ct)
        np.save(tmp / "mask.npy", mask)
        if negatives is not None:
            np.save(tmp / "negatives.npy", negatives)
        atomic_write_json(tmp / "meta.json", {
            "version": CACHE_VERSION, "case": case, "key": key,
            "image": str(cohort.image_path(case).resolve()), "label": str(cohort.label_path(case).resolve()),
            "shape": list(ct.shape), "orientation": CANONICAL,
            "spacing_xyz_mm": list(spacing),
            "positive_slices": [int(z) for z in np.flatnonzero(positive)],
            "negatives": None if negatives is None else str(cohort.negatives_path(case).resolve()),
            "hard_negative_slices": [int(z) for z in np.flatnonzero(hard)],
        })
        try:
            os.replace(tmp, folder)
        except OSError:  # another process (e.g. a second worker) finished it first
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_meta(case: str, key: str, folder: Path) -> CachedCase:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    shape = tuple(int(s) for s in meta["shape"])
    positive = np.zeros(shape[0], bool)
    positive[meta["positive_slices"]] = True
    hard = np.zeros(shape[0], bool)
    hard[meta.get("hard_negative_slices", [])] = True
    return CachedCase(case=case, key=key, folder=folder, shape=shape, positive=tuple(bool(p) for p in positive),
                      hard=tuple(bool(h) for h in hard), has_negatives=(folder / "negatives.npy").is_file())
