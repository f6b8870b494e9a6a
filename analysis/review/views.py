"""The pictures of the review page: PNGs of a study's CT in the bone window, radiologically oriented,
at their physical aspect.

* A lesion card: the axial, coronal and sagittal planes through the lesion's voxel nearest its
  centroid (:func:`analysis.prediction.preview.radiological_planes`: anterior/superior up, the
  patient's right on the viewer's left), a square around it four times the lesion's largest extent
  (:data:`FIELD_MM` bounds it), the lesion outlined in
  :data:`analysis.prediction.preview.OUTLINE` red.
* The slice viewer: each axial slice of the canonical view, every lesion outlined (predicted red,
  added by a reader cyan); :func:`slice_affine` maps a pixel of it back to LPS mm.

The grey values are :func:`analysis.imaging.display.window` (:data:`~analysis.imaging.display.BONE_WINDOW`).
Pictures are resampled (nearest voxel) to square pixels, so a browser shows them at their physical
aspect without knowing the voxel size.
"""
from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np

from analysis.imaging.display import window
from analysis.imaging.orientation import Reorientation
from analysis.prediction.preview import OUTLINE, plane_pixel_mm, radiological_planes

__all__ = ["FIELD_MM", "CARD_PX", "ADDED", "lesion_views", "axial_slice", "slice_affine", "slice_count", "png",
           "centre_voxel"]

#: The field of view of a lesion card's planes (mm, square): four times the lesion's largest
#: extent, within these bounds (a 5 mm lesion fills a tenth of the picture, a 3 cm one a third).
FIELD_MM = (30.0, 120.0)
#: Pixels across a card's plane.
CARD_PX = 180
#: Outline colour of a lesion a reader added (cyan; red is the model's).
ADDED = (0.0, 1.0, 1.0)


def png(rgb: np.ndarray) -> bytes:
    """PNG bytes of a ``(rows, cols, 3)`` uint8 picture."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), "RGB").save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of a 2D mask with a 4-neighbour outside it."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _grey(plane_hu: np.ndarray) -> np.ndarray:
    g = np.rint(window(plane_hu) * 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def _paint(rgb: np.ndarray, mask: np.ndarray, colour: Sequence[float]) -> None:
    rgb[_outline(mask)] = np.rint(np.asarray(colour) * 255).astype(np.uint8)


def centre_voxel(voxels: np.ndarray, centroid_index: Sequence[float]) -> tuple[int, int, int]:
    """The lesion voxel nearest its centroid (a centroid may lie outside an irregular lesion).

    Args:
        voxels: the lesion's ``(n, 3)`` ``(k, j, i)`` indices in the stored order.
        centroid_index: its centroid, the same order.
    """
    if len(voxels) == 0:
        raise ValueError("a lesion without a voxel")
    d = ((np.asarray(voxels) - np.asarray(centroid_index)) ** 2).sum(axis=1)
    return tuple(int(v) for v in voxels[int(np.argmin(d))])


def _resample(plane: np.ndarray, pixel_mm: tuple[float, float], centre: tuple[float, float] | None,
              out_px: int | None, field_mm: float | None) -> np.ndarray:
    """Nearest-voxel resampling of a plane to square pixels: ``field_mm`` around ``centre``
    (row, col) onto ``out_px`` pixels, or the whole plane at its finest pixel size."""
    col_mm, row_mm = pixel_mm
    if field_mm is None:
        step = min(col_mm, row_mm)
        rows = np.floor((np.arange(round(plane.shape[0] * row_mm / step)) + 0.5) * step / row_mm).astype(int)
        cols = np.floor((np.arange(round(plane.shape[1] * col_mm / step)) + 0.5) * step / col_mm).astype(int)
    else:
        step = field_mm / out_px
        offsets = (np.arange(out_px) + 0.5) * step - field_mm / 2
        rows = np.floor(centre[0] + 0.5 + offsets / row_mm).astype(int)
        cols = np.floor(centre[1] + 0.5 + offsets / col_mm).astype(int)
    inside_r = (rows >= 0) & (rows < plane.shape[0])
    inside_c = (cols >= 0) & (cols < plane.shape[1])
    out = plane[np.clip(rows, 0, plane.shape[0] - 1)][:, np.clip(cols, 0, plane.shape[1] - 1)]
    outside = ~(inside_r[:, None] & inside_c[None, :])
    if outside.any():
        out = out.copy()
        out[outside] = 0 if out.dtype == bool else -1024
    return out


def lesion_views(ct: np.ndarray, labels: np.ndarray, lesion_id: int, voxels: np.ndarray, reo: Reorientation,
                 centroid_index: Sequence[float]) -> dict[str, bytes]:
    """The card's three PNGs of one lesion, without a pass over the whole volume.

    Args:
        ct: HU ``(slices, rows, cols)``, stored order.
        labels: lesion ids, same layout (the lesion is ``labels == lesion_id``; only three planes are read).
        lesion_id: the lesion.
        voxels: the lesion's ``(n, 3)`` stored ``(k, j, i)`` indices.
        reo: the stored volume's :class:`Reorientation`.
        centroid_index: the lesion's centroid, stored ``(k, j, i)`` (the planes go through its
            nearest voxel, :func:`centre_voxel`).

    Returns:
        ``{"axial", "coronal", "sagittal"}``: :data:`CARD_PX` square PNGs of the same field.
    """
    canonical = reo.index_forward(np.asarray(voxels, np.float64))
    extent_mm = (canonical.max(axis=0) - canonical.min(axis=0) + 1) * np.asarray(reo.canonical_spacing_zyx)
    field = float(np.clip(4 * extent_mm.max(), *FIELD_MM))
    centre = centre_voxel(voxels, centroid_index)
    k, j, i = (int(v) for v in np.rint(reo.index_forward(np.asarray([centre], np.float64))[0]))
    ct_c = reo.forward(ct)
    planes = radiological_planes(ct_c, (k, j, i))
    masks = radiological_planes(reo.forward(labels), (k, j, i))
    nz = ct_c.shape[0]
    # where the centre falls in each displayed plane: (row, col)
    at = {"axial": (j, i), "coronal": (nz - 1 - k, i), "sagittal": (nz - 1 - k, j)}
    pixel_mm = plane_pixel_mm(reo.canonical_geometry.spacing)
    out = {}
    for view, plane in planes.items():
        hu = _resample(np.asarray(plane), pixel_mm[view], at[view], CARD_PX, field)
        mask = _resample(np.asarray(masks[view]) == lesion_id, pixel_mm[view], at[view], CARD_PX, field)
        rgb = _grey(hu)
        _paint(rgb, mask, OUTLINE)
        out[view] = png(rgb)
    return out


def slice_count(reo: Reorientation) -> int:
    """Axial slices of the canonical view."""
    return int(reo.canonical_geometry.size[2])


def axial_slice(ct: np.ndarray, labels: np.ndarray, reo: Reorientation, k: int,
                added: Mapping[int, np.ndarray] | None = None) -> bytes:
    """PNG of canonical axial slice ``k`` (0: the most inferior) with the lesions outlined: ``labels``
    (stored order) red, ``added`` (lesion id: flat stored-order voxel indices) cyan."""
    ct_c = reo.forward(ct)
    lab = np.array(reo.forward(labels)[k])
    for lesion_id, voxels in (added or {}).items():
        native = np.stack(np.unravel_index(np.asarray(voxels), labels.shape), axis=1)
        canonical = np.rint(reo.index_forward(native.astype(np.float64))).astype(int)
        here = canonical[canonical[:, 0] == k]
        lab[here[:, 1], here[:, 2]] = lesion_id
    pixel_mm = plane_pixel_mm(reo.canonical_geometry.spacing)["axial"]
    plane = _resample(np.asarray(ct_c[k]), pixel_mm, None, None, None)
    lab = _resample(lab, pixel_mm, None, None, None)
    rgb = _grey(plane)
    for lesion in np.unique(lab[lab > 0]):
        _paint(rgb, lab == lesion, ADDED if int(lesion) in (added or {}) else OUTLINE)
    return png(rgb)


def slice_affine(reo: Reorientation) -> list[list[float]]:
    """The 3 x 4 matrix taking ``(u, v, k, 1)`` to LPS mm: ``u``, ``v`` a position in an
    :func:`axial_slice` picture in its own pixels (0 at its left/top edge), ``k`` the slice."""
    g = reo.canonical_geometry
    sx, sy, sz = g.spacing
    step = min(sx, sy)
    d = np.asarray(g.direction, np.float64).reshape(3, 3)
    # continuous canonical index: col = u * step / sx - 0.5, row = v * step / sy - 0.5, slice = k
    to_index = np.array([[step / sx, 0, 0, -0.5], [0, step / sy, 0, -0.5], [0, 0, 1, 0]], np.float64)
    affine = d @ np.diag([sx, sy, sz]) @ to_index
    affine[:, 3] += np.asarray(g.origin, np.float64)
    return affine.tolist()
