"""In-plane resampling of canonical volumes: onto a network's pixel spacing and back.

A network trained on 1 mm pixels sees a 0.6 mm CT's lesions 1.67x too large. The runner
(:mod:`analysis.prediction.runner`) therefore resamples each axial slice to the spacing a
model was trained at, runs the model there and brings its probabilities back onto the input's
grid, as nnU-Net does for every case (``nnunetv2.preprocessing.resampling``: the image with a
spline, the probabilities linearly, then thresholded on the input's grid). Slices are never
mixed: only rows and columns are resampled, the slice axis is kept.

Grids are edge-aligned (``scipy.ndimage.zoom(grid_mode=True)``, as ``skimage.transform.resize``
and nnU-Net): a slice of ``n`` pixels of ``s`` mm covers ``n * s`` mm, and the new grid of
``round(n * s / t)`` pixels covers the same extent, so its pixels are ``n * s / round(n * s / t)``
mm (within half a pixel's worth of ``t`` over the slice). The way back is the same map inverted,
onto exactly the input's ``n`` pixels. Flipping a slice commutes with both maps (they are
symmetric about the slice's centre), so test-time mirroring on the network's grid is mirroring
on the input's.

Images are interpolated linearly after a Gaussian pre-filter when they shrink (sigma
``(factor - 1) / 2`` pixels of the input, ``skimage.transform.resize``'s anti-aliasing rule),
so a fine grid's noise does not alias into the coarse one; probabilities linearly without a
filter (nnU-Net's order 1 for segmentation outputs).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["SPACING_RTOL", "in_plane_shape", "needs_resampling", "resample_in_plane", "spacing_after",
           "median_spacing_xy"]

#: In-plane spacings within this relative difference of the target are used as they are: a
#: lesion's length changes by less than this (half a per cent: a tenth of a pixel over 20 pixels).
SPACING_RTOL = 0.005
#: Slices resampled at once (bounds the temporaries of the filter and the interpolation).
_CHUNK = 16


def in_plane_shape(shape_rc: Sequence[int], spacing_rc: Sequence[float], target_rc: Sequence[float]) -> tuple[int, int]:
    """``(rows, cols)`` of a slice resampled from ``spacing_rc`` to ``target_rc`` mm (edge-aligned).

    >>> in_plane_shape((128, 100), (1.0, 1.0), (0.6, 0.6))
    (213, 167)
    """
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape_rc, spacing_rc, target_rc))  # type: ignore[return-value]


def needs_resampling(spacing_rc: Sequence[float], target_rc: Sequence[float] | None,
                     rtol: float = SPACING_RTOL) -> bool:
    """Whether a slice of ``spacing_rc`` mm differs from ``target_rc`` by more than ``rtol`` on an axis
    (never for a None target).

    >>> needs_resampling((0.98, 0.98), (1.0, 1.0)), needs_resampling((0.998, 1.0), (1.0, 1.0))
    (True, False)
    """
    if target_rc is None:
        return False
    return any(abs(s - t) > rtol * t for s, t in zip(spacing_rc, target_rc))


def resample_in_plane(volume: np.ndarray, shape_rc: Sequence[int], *, order: int = 1, antialias: bool = False,
                      dtype: np.dtype | type | None = None) -> np.ndarray:
    """Each slice of ``volume`` resampled onto ``shape_rc`` pixels covering the same extent.

    Args:
        volume: ``(slices, rows, cols)``.
        shape_rc: the new ``(rows, cols)``.
        order: 1 linear (images and probabilities), 0 nearest (masks).
        antialias: Gaussian pre-filter along an axis that shrinks (images).
        dtype: the result's type (default: float32; an integer type is rounded into).

    Returns:
        ``(slices, *shape_rc)``; ``volume`` itself when the shape is already ``shape_rc``.

    Examples:
        Up and back down is the identity on a linear ramp (linear interpolation is exact on it):

        >>> ramp = np.tile(np.arange(8, dtype=np.float32), (1, 8, 1))
        >>> up = resample_in_plane(ramp, (8, 20))
        >>> bool(np.allclose(resample_in_plane(up, (8, 8))[0, :, 1:-1], ramp[0, :, 1:-1], atol=1e-5))
        True
    """
    volume = np.asarray(volume)
    rows, cols = (int(v) for v in shape_rc)
    if volume.shape[1:] == (rows, cols):
        return volume
    dtype = np.dtype(np.float32 if dtype is None else dtype)
    zoom = (1.0, rows / volume.shape[1], cols / volume.shape[2])
    sigma = (0.0, *(max(0.0, (1.0 / f - 1.0) / 2.0) if antialias else 0.0 for f in zoom[1:]))
    out = np.empty((volume.shape[0], rows, cols), dtype)
    for z0 in range(0, volume.shape[0], _CHUNK):
        chunk = np.asarray(volume[z0:z0 + _CHUNK], np.float32)
        if any(sigma):
            chunk = ndimage.gaussian_filter(chunk, sigma, mode="nearest")
        part = ndimage.zoom(chunk, zoom, order=order, mode="nearest", grid_mode=True, prefilter=False)
        if part.shape[1:] != (rows, cols):  # zoom rounds n * factor; guard a float round-off
            raise RuntimeError(f"zoom gave {part.shape[1:]}, expected {(rows, cols)}")
        out[z0:z0 + _CHUNK] = np.rint(part) if np.issubdtype(dtype, np.integer) else part
    return out


def spacing_after(shape_rc: Sequence[int], spacing_rc: Sequence[float], new_rc: Sequence[int]) -> tuple[float, float]:
    """The pixel size of ``new_rc`` pixels covering ``shape_rc`` pixels of ``spacing_rc`` mm (edge-aligned).

    >>> spacing_after((128, 128), (1.0, 1.0), (213, 213))
    (0.6009389671361502, 0.6009389671361502)
    """
    return tuple(n * s / m for n, s, m in zip(shape_rc, spacing_rc, new_rc))  # type: ignore[return-value]



def median_spacing_xy(paths: Sequence[str | os.PathLike]) -> tuple[float, float]:
    """The median in-plane pixel spacing ``(x, y)`` mm of images' canonical views (headers only):
    what a model trained on them saw (canonical cols, rows; :mod:`analysis.imaging.orientation`).

    Raises:
        InputError: an unreadable header.
        ValueError: no path given.
    """
    from analysis.imaging.io import read_header
    from analysis.imaging.orientation import Reorientation

    if not paths:
        raise ValueError("median_spacing_xy: no image given")
    zyx = np.array([Reorientation.of(read_header(p, ndim=None)).canonical_spacing_zyx for p in paths], np.float64)
    return float(np.median(zyx[:, 2])), float(np.median(zyx[:, 1]))
