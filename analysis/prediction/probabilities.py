"""Compact voxel probability maps: uint8 NIfTI with a 1/255 scale that keeps the threshold exact.

A float32 probability map of a 385 x 512 x 512 CT is 400 MB uncompressed and compresses
poorly; stored as uint8 with NIfTI's ``scl_slope = 1/255`` it is a quarter of that before
compression and readers decode it to floats ``k * slope`` on their own (SimpleITK gives
float32, nibabel's ``get_fdata`` float64). Plain quantisation ``round(p * 255)`` would move
voxels across the decision threshold, so a map thresholded after reading could differ
from the mask the run wrote. :func:`write_probability` therefore nudges the stored
integers next to the threshold so that ``decoded >= threshold`` holds exactly where
``p >= threshold`` did, for every decoding in use:

* float64 ``k * float64(slope)`` (nibabel ``get_fdata``) compared with the float64 threshold;
* float32 ``float32(k * slope)`` (SimpleITK, nibabel ``get_fdata(dtype=float32)``) compared
  with the float64 threshold, and with ``float32(threshold)`` (numpy 2 compares a float32
  array with a Python float in float32).

The slope is stored as float32 (``float32(1/255)`` = 0.0039215689, 2.3e-8 relative above
1/255), so decoded values are ``k/255`` to within float32 precision. Away from the
threshold the stored value is ``round(p * 255)`` (error <= 1/510); the nudged voxels
move by at most one or two steps (error < 3/255).

Array layout: ``(slices, rows, cols)`` with the CT's :class:`~analysis.imaging.io.Geometry`, as
everywhere in the project. The NIfTI affine is the ITK (LPS) geometry in RAS:
``diag(-1, -1, 1, 1) @ [[D * spacing, origin], [0, 1]]``, written as both sform and
qform (code 1, scanner anatomical), which SimpleITK reads back as the same geometry.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from analysis.errors import InputError
from analysis.imaging.io import Geometry, atomic_write_bytes, read_array

__all__ = ["write_probability", "write_stored", "read_probability", "quantise", "nifti_affine", "SLOPE", "LEVELS"]

#: Stored integers 0..LEVELS decode to 0..1.
LEVELS = 255
#: The NIfTI scale factor as the header stores it (float32).
SLOPE = np.float32(1.0 / LEVELS)
#: gzip level of the written file (zlib's default). On a 48 x 128 x 128 random smooth map
#: (9 % above 0.5): 419 KB at level 6, 457 KB at level 1 (nibabel's default), 414 KB at 9
#: (3x slower); its uint8 mask is 20 KB and a float32 map 2.9 MB. Real network outputs,
#: saturated near 0 over most of the body, compress far better than this random map.
GZIP_LEVEL = 6
#: Probabilities this far outside [0, 1] are clipped silently (by :func:`quantise` and
#: :func:`read_probability`); further out is an error.
RANGE_TOL = 1e-6


def _decoded_at_or_above(k: np.ndarray, threshold: float) -> np.ndarray:
    """For stored integers ``k``: (all decodings >= threshold, any decoding >= threshold)."""
    d64 = k.astype(np.float64) * np.float64(SLOPE)
    d32 = d64.astype(np.float32)
    tests = np.stack([d64 >= threshold, d32.astype(np.float64) >= threshold, d32 >= np.float32(threshold)])
    return tests.all(axis=0), tests.any(axis=0)


def quantise(prob: np.ndarray, threshold: float, *, above: np.ndarray | None = None) -> np.ndarray:
    """uint8 stored values for ``prob`` such that every decoding keeps ``>= threshold``.

    Args:
        prob: probabilities in [0, 1] (any shape).
        threshold: the decision threshold in [0, 1].
        above: which voxels are at or above the threshold (bool, ``prob``'s shape); None:
            ``prob >= threshold``. Give the mask a caller already cut from ``prob`` so that
            the stored map reproduces exactly that mask.

    Returns:
        uint8 array of ``prob``'s shape: ``round(prob * 255)``, except next to the
        threshold, where values whose decoding would fall on the wrong side are moved
        to the nearest integer on the right side (integers whose float32 and float64
        decodings disagree about the threshold are never used).

    Raises:
        ValueError: NaN or values outside [0, 1], a threshold outside [0, 1], or voxels
            at or above a threshold that no stored value reaches. At threshold 0 every stored
            value decodes to >= it, so the map cannot mark a voxel below it.

    Examples:
        ``0.3 * 255 = 76.5`` rounds to 76, which decodes to 0.298 < 0.3, so the voxel at the
        threshold is stored as 77; ``0.299`` stays 76, below:

        >>> quantise(np.array([0.0, 0.299, 0.3, 1.0]), 0.3).tolist()
        [0, 76, 77, 255]
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold {threshold}: expected a value in [0, 1]")
    p = np.asarray(prob)
    if p.size:
        bad = p.size - int(np.count_nonzero(np.isfinite(p)))
        if bad:
            raise ValueError(f"probabilities must be finite, got {bad} NaN or infinite value(s)")
        if p.min() < -RANGE_TOL or p.max() > 1 + RANGE_TOL:
            raise ValueError(f"probabilities must be in [0, 1], got range [{p.min():.6g}, {p.max():.6g}]")
    levels = np.arange(LEVELS + 1)
    all_above, any_above = _decoded_at_or_above(levels, threshold)
    k_hi = int(np.flatnonzero(all_above)[0]) if all_above.any() else None
    below_levels = np.flatnonzero(~any_above)
    k_lo = int(below_levels[-1]) if below_levels.size else None
    q = np.empty(p.shape, np.uint8)
    flat_p, flat_q = p.reshape(-1), q.reshape(-1)
    flat_above = None if above is None else np.asarray(above, bool).reshape(-1)
    step = 1 << 22  # in chunks: float temporaries of a paper-sized map would cost GBs at once
    for start in range(0, flat_p.size, step):
        chunk = flat_p[start:start + step]
        out = flat_q[start:start + step]
        out[...] = np.rint(np.clip(chunk, 0.0, 1.0) * LEVELS)
        above = chunk >= threshold if flat_above is None else flat_above[start:start + step]
        if above.any():
            if k_hi is None:
                raise ValueError(f"threshold {threshold}: no stored value decodes to >= it")
            np.maximum(out, k_hi, out=out, where=above)
        if not above.all() and k_lo is not None:  # threshold 0: every value decodes to >= it
            np.minimum(out, k_lo, out=out, where=~above)
    return q


def nifti_affine(geometry: Geometry) -> np.ndarray:
    """The NIfTI (RAS) voxel-to-world affine of an ITK (LPS) geometry, 4 x 4 float64.

    The affine maps a nibabel index ``(i, j, k)`` = ITK ``(x, y, z)`` index to RAS mm.
    """
    d = np.asarray(geometry.direction, np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = d * np.asarray(geometry.spacing, np.float64)[None, :]
    lps[:3, 3] = geometry.origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def write_probability(prob: np.ndarray, geometry: Geometry, path: str | os.PathLike, *,
                      threshold: float) -> np.ndarray:
    """Write a probability map as uint8 NIfTI (``scl_slope`` 1/255) atomically.

    Args:
        prob: float ``(slices, rows, cols)`` probabilities in [0, 1], the CT's order.
        geometry: the CT's geometry (ITK ``(x, y, z)`` order).
        path: output ``.nii.gz`` (or ``.nii``) file; written to a temporary file in the
            same folder and renamed into place, with the umask's permissions.
        threshold: the decision threshold whose side every voxel keeps (see the module
            docstring).

    Returns:
        The stored uint8 values ``(slices, rows, cols)``.

    Raises:
        ValueError: a shape unlike the geometry's, or probabilities/threshold out of range.
    """
    if tuple(np.shape(prob)) != geometry.shape:
        raise ValueError(f"probability shape {np.shape(prob)} differs from the geometry's (slices, rows, cols) "
                         f"{geometry.shape}")
    stored = quantise(prob, threshold)
    write_stored(stored, geometry, path)
    return stored


def write_stored(stored: np.ndarray, geometry: Geometry, path: str | os.PathLike) -> Path:
    """Write stored values from :func:`quantise` (uint8 ``(slices, rows, cols)``) as the NIfTI
    map :func:`write_probability` writes (``scl_slope`` 1/255), atomically."""
    import nibabel as nib  # local: only the writer needs it

    if stored.dtype != np.uint8 or tuple(stored.shape) != geometry.shape:
        raise ValueError(f"stored values {stored.dtype} {stored.shape}: expected uint8 {geometry.shape}")
    affine = nifti_affine(geometry)
    image = nib.Nifti1Image(stored.transpose(2, 1, 0), affine)  # (x, y, z) view: NIfTI's order, no copy
    header = image.header
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(float(SLOPE), 0.0)
    header.set_xyzt_units("mm", "sec")
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    raw = image.to_bytes()
    path = Path(path)
    data = gzip.compress(raw, compresslevel=GZIP_LEVEL, mtime=0) if path.name.lower().endswith(".gz") else raw
    return atomic_write_bytes(path, data)


def read_probability(path: str | os.PathLike) -> np.ndarray:
    """Read a voxel probability map as float32 ``(slices, rows, cols)`` in [0, 1].

    The one reader of stored maps (``PRED/<model>/probabilities/<case>.nii.gz``; ``analyze``'s
    FROC). Any scalar image is accepted: integers with a NIfTI ``scl_slope`` are scaled by
    SimpleITK on reading, so a map written by :func:`write_probability` decodes to
    ``float32(k * float32(1/255))``, i.e. ``k/255`` in float32, and float maps are taken as
    they are. As for :func:`quantise`'s input, values within :data:`RANGE_TOL` outside [0, 1]
    (rounding of a stored scale or of a float32 sigmoid) are probabilities and are clipped to
    [0, 1]; values further out are refused. Valid maps are unchanged by the clipping, so
    thresholding the result reproduces the written mask exactly.

    Raises:
        InputError: unreadable, non-finite, or values outside [0, 1] by more than :data:`RANGE_TOL`.
    """
    arr, _ = read_array(path)
    arr = arr.astype(np.float32, copy=False)
    if arr.size:
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -RANGE_TOL or hi > 1 + RANGE_TOL:
            raise InputError(f"{path}: probabilities outside [0, 1] (found {lo:g} to {hi:g}); expected a probability "
                             f"map (uint8 with scl_slope 1/255, or float within {RANGE_TOL:g} of [0, 1])")
    return np.clip(arr, 0.0, 1.0, out=arr)
