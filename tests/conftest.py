"""Shared fixtures. This file is collected by every pytest process (core, tf, nnunet),
so it must import neither TensorFlow nor torch."""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from analysis.cohort.layout import write_dataset_json  # noqa: E402
from analysis.imaging.io import Geometry, write_array  # noqa: E402


def make_geometry(shape_zyx=(6, 16, 20), spacing=(0.8, 0.9, 3.0), origin=(-10.0, 5.0, 2.5),
                  direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)) -> Geometry:
    z, y, x = shape_zyx
    return Geometry(size=(x, y, z), spacing=tuple(spacing), origin=tuple(origin), direction=tuple(direction))


def write_tiny_cohort(root: Path, n_cases: int = 3, shape=(6, 16, 20), seed: int = 0,
                      geometry: Geometry | None = None) -> Path:
    """A tiny cohort: random HU images, one cuboid lesion per case (none in the last)."""
    rng = np.random.default_rng(seed)
    geom = geometry or make_geometry(shape)
    for i in range(n_cases):
        case = f"case_{i:03d}"
        ct = rng.integers(-1000, 1200, size=shape).astype(np.int16)
        lab = np.zeros(shape, np.uint8)
        if i < n_cases - 1:
            lab[1:3, 4:8, 5:9] = 1
        write_array(ct, geom, root / "imagesTr" / f"{case}_0000.nii.gz")
        write_array(lab, geom, root / "labelsTr" / f"{case}.nii.gz")
    write_dataset_json(root, n_cases)
    return root


def tree_hash(root: Path) -> dict[str, str]:
    """sha256 of every file under root (to prove inputs were not modified)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def tiny_cohort(tmp_path: Path) -> Path:
    return write_tiny_cohort(tmp_path / "ds")


def wrong_modes(root: Path, umask: int, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Files and folders under ``root`` (itself included) whose permission bits are not what
    ``umask`` leaves of 0666 / 0777 (what ``open()`` and ``mkdir()`` would create)."""
    bad = []
    for p in [root, *root.rglob("*")]:
        if any(part in skip for part in p.relative_to(root.parent).parts):
            continue
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        if p.is_symlink():
            continue
        got = p.stat().st_mode & 0o777
        if got != want:
            bad.append(f"{p.relative_to(root.parent)}: {oct(got)} (want {oct(want)})")
    return bad


@pytest.fixture
def umask_022():
    """Run a test under umask 022 (restored after)."""
    old = os.umask(0o022)
    try:
        yield 0o022
    finally:
        os.umask(old)
