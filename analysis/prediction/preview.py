"""A one-look PNG of a prediction: bone-window MIPs with the lesions outlined and numbered.

What a reader looks at before opening a viewer: a coronal and a sagittal maximum-intensity
projection (MIP) of the CT in the bone window of :mod:`analysis.imaging.display` (-500..1500 HU),
side by side at their physical aspect ratio, with each lesion's projection outlined in
red and its ``lesion_id`` (as in ``lesions.csv``, :mod:`analysis.prediction.tables`) written in
yellow at its projected centroid.

Display conventions (radiological, whatever the file's storage order: the volume is first
put in the canonical LPS view of :mod:`analysis.imaging.orientation`):

* coronal: superior up, the patient's right on the viewer's left (as if facing the patient);
* sagittal: superior up, anterior on the viewer's left (seen from the patient's left);
* axial (:func:`radiological_axial`, for other figures such as Grad-CAM overlays and the
  report's qualitative figure): anterior up, the patient's right on the viewer's left
  (seen from the feet). This is exactly the canonical LPS slice ``canonical[k]`` shown
  with ``imshow`` (row 0 at the top).

Display coordinates used by :func:`label_positions` are ``(col, row)`` pixel indices of
the displayed panel images (row 0 at the top), so a test can check placement without
reading text off the PNG.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from analysis.imaging.display import window
from analysis.imaging.io import Geometry, atomic_file
from analysis.imaging.orientation import Reorientation
from analysis.lesions import lesion_instances

__all__ = ["write_preview", "preview_panels", "label_positions", "panel_layout",
           "radiological_axial", "radiological_planes", "plane_pixel_mm", "PreviewPanels", "pyplot", "save_png"]

#: Colour of lesion outlines and numbers (pure red is absent from a grey CT, so tests find it).
OUTLINE = (1.0, 0.0, 0.0)
NUMBER = (1.0, 1.0, 0.0)
DPI = 100
#: Height in inches of the panels; widths follow the physical aspect ratio.
PANEL_HEIGHT_IN = 7.0
TITLE_IN = 0.45
GAP_IN = 0.25
PAD_IN = 0.1


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | os.PathLike) -> Path:
    """Save a figure as PNG atomically (black background, :data:`DPI`) and close it; the
    figure is closed on failure too. Returns the path (permissions as the umask leaves 0o666)."""
    try:
        path = Path(path)
        with atomic_file(path, suffix=".tmp.png") as tmp:
            fig.savefig(tmp, format="png", facecolor="black", dpi=DPI)
    finally:
        pyplot().close(fig)
    return path


@dataclass
class PreviewPanels:
    """The two displayed projections and what is drawn on them.

    Attributes:
        coronal, sagittal: float32 MIPs in HU ``(rows, cols)`` as displayed (row 0 at the top).
        coronal_mask, sagittal_mask: bool projections of the lesion mask, same layout.
        pixel_mm: ``{"coronal": (col_mm, row_mm), "sagittal": (col_mm, row_mm)}`` pixel sizes.
        labels: ``{"coronal": [(id, col, row), ...], "sagittal": [...]}`` number positions.
    """

    coronal: np.ndarray
    sagittal: np.ndarray
    coronal_mask: np.ndarray
    sagittal_mask: np.ndarray
    pixel_mm: dict[str, tuple[float, float]]
    labels: dict[str, list[tuple[int, float, float]]]


def label_positions(lesion_ids: np.ndarray, geometry: Geometry) -> dict[str, list[tuple[int, float, float]]]:
    """Where each lesion's number goes: its centroid projected onto both panels.

    Args:
        lesion_ids: ``(slices, rows, cols)`` labels ``0..n`` in the stored file's order
            (:func:`analysis.lesions.lesion_instances` of the stored mask, so the
            numbers match ``lesions.csv``).
        geometry: the stored file's geometry.

    Returns:
        ``{"coronal": [(id, col, row), ...], "sagittal": [...]}`` in display pixel
        coordinates (see the module docstring), ids ascending.
    """
    r = Reorientation.of(geometry)
    flat = np.flatnonzero(lesion_ids)
    ids = np.asarray(lesion_ids).ravel()[flat].astype(np.int64)
    out: dict[str, list[tuple[int, float, float]]] = {"coronal": [], "sagittal": []}
    if ids.size == 0:
        return out
    n = int(ids.max())
    counts = np.bincount(ids, minlength=n + 1)
    coords = np.unravel_index(flat, np.shape(lesion_ids))
    mean = np.stack([np.bincount(ids, weights=c.astype(np.float64), minlength=n + 1) for c in coords], axis=1)
    present = np.flatnonzero(counts[1:]) + 1
    centroid = r.index_forward(mean[present] / counts[present, None])     # canonical (z, y, x)
    nz = r.canonical_geometry.shape[0]
    for lid, (cz, cy, cx) in zip(present.tolist(), centroid):
        row = float(nz - 1 - cz)
        out["coronal"].append((lid, float(cx), row))
        out["sagittal"].append((lid, float(cy), row))
    return out


def preview_panels(ct: np.ndarray, mask: np.ndarray, geometry: Geometry,
                   lesion_ids: np.ndarray | None = None) -> PreviewPanels:
    """The coronal and sagittal MIPs, lesion projections and number positions.

    Args:
        ct: ``(slices, rows, cols)`` HU in the stored file's order.
        mask: ``(slices, rows, cols)`` lesion mask, same order (non-zero is lesion).
        geometry: the stored file's geometry.
        lesion_ids: labels of ``mask`` as numbered in ``lesions.csv``; None computes them
            with :func:`~analysis.lesions.lesion_instances` on the stored mask
            (26-connectivity), which is what :func:`analysis.prediction.tables.lesion_rows` does.

    Returns:
        The :class:`PreviewPanels`.
    """
    for name, arr in (("ct", ct), ("mask", mask), ("lesion_ids", lesion_ids)):
        if arr is not None and tuple(np.shape(arr)) != geometry.shape:
            raise ValueError(f"{name}: shape {np.shape(arr)} differs from the geometry's (slices, rows, cols) "
                             f"{geometry.shape}")
    if lesion_ids is None:
        lesion_ids, _ = lesion_instances(mask, 26)
    r = Reorientation.of(geometry)
    ct_c = r.forward(ct)
    m_c = r.forward(np.asarray(mask) != 0)
    # canonical axes (z up the body, y to posterior, x to the patient's left):
    # coronal = MIP along y, sagittal = MIP along x; flip z so superior is row 0
    coronal = _superior_up(ct_c.max(axis=1)).astype(np.float32)
    sagittal = _superior_up(ct_c.max(axis=2)).astype(np.float32)
    pixel_mm = plane_pixel_mm(r.canonical_geometry.spacing)
    return PreviewPanels(
        coronal=coronal, sagittal=sagittal,
        coronal_mask=_superior_up(m_c.any(axis=1)).copy(), sagittal_mask=_superior_up(m_c.any(axis=2)).copy(),
        pixel_mm={"coronal": pixel_mm["coronal"], "sagittal": pixel_mm["sagittal"]},
        labels=label_positions(lesion_ids, geometry))


def _superior_up(plane: np.ndarray) -> np.ndarray:
    """A coronal or sagittal plane of a canonical volume (axis 0 from feet to head) with superior at row 0."""
    return plane[::-1]


def plane_pixel_mm(spacing_xyz: Sequence[float]) -> dict[str, tuple[float, float]]:
    """``(col_mm, row_mm)`` of the pixels of each displayed plane of a canonical volume with voxel
    size ``spacing_xyz`` (ITK order: the canonical geometry's spacing).

    >>> plane_pixel_mm((0.8, 0.7, 2.5))
    {'axial': (0.8, 0.7), 'coronal': (0.8, 2.5), 'sagittal': (0.7, 2.5)}
    """
    sx, sy, sz = (float(v) for v in spacing_xyz)
    return {"axial": (sx, sy), "coronal": (sx, sz), "sagittal": (sy, sz)}


def radiological_planes(canonical: np.ndarray, centre: Sequence[int]) -> dict[str, np.ndarray]:
    """The axial, coronal and sagittal planes of a canonical volume through voxel ``centre``,
    oriented for display as the module docstring says (row 0 at the top): axial anterior up and
    the patient's right on the viewer's left; coronal superior up, the patient's right on the
    left; sagittal superior up, anterior on the left.

    Args:
        canonical: ``(slices, rows, cols)`` in the canonical view (:class:`Reorientation`), any
            trailing axes (e.g. colour) kept.
        centre: canonical ``(k, j, i)`` voxel index.

    Returns:
        ``{"axial", "coronal", "sagittal"}`` views (no copies); pixel sizes from :func:`plane_pixel_mm`.
    """
    k, j, i = (int(v) for v in centre)
    return {"axial": canonical[k], "coronal": _superior_up(canonical[:, j, :]),
            "sagittal": _superior_up(canonical[:, :, i])}


def panel_layout(panels: PreviewPanels) -> tuple[tuple[float, float], list[tuple[float, float, float, float]]]:
    """Figure size in inches and the two axes rectangles (left, bottom, width, height) in figure fractions.

    Each panel's width/height ratio is its physical one, so pixels are drawn at the
    physical aspect ratio.
    """
    sizes = []
    for img, key in ((panels.coronal, "coronal"), (panels.sagittal, "sagittal")):
        col_mm, row_mm = panels.pixel_mm[key]
        sizes.append((img.shape[1] * col_mm, img.shape[0] * row_mm))
    height_mm = max(h for _, h in sizes)
    scale = PANEL_HEIGHT_IN / height_mm
    widths = [w * scale for w, _ in sizes]
    heights = [h * scale for _, h in sizes]
    fig_w = 2 * PAD_IN + widths[0] + GAP_IN + widths[1]
    fig_h = 2 * PAD_IN + PANEL_HEIGHT_IN + TITLE_IN
    rects = []
    left = PAD_IN
    for w, h in zip(widths, heights):
        bottom = PAD_IN + (PANEL_HEIGHT_IN - h)
        rects.append((left / fig_w, bottom / fig_h, w / fig_w, h / fig_h))
        left += w + GAP_IN
    return (fig_w, fig_h), rects


def write_preview(path: str | os.PathLike, ct: np.ndarray, mask: np.ndarray, geometry: Geometry,
                  lesion_ids: np.ndarray | None = None, *, title: str) -> Path:
    """Write the preview PNG atomically (temporary file in the same folder, then rename).

    Args:
        path: output ``.png``.
        ct, mask, geometry, lesion_ids: as for :func:`preview_panels` (stored file's order).
        title: one line above the panels (case id, model, lesion count...).

    Returns:
        The path written (permissions as the umask leaves 0o666).
    """
    panels = preview_panels(ct, mask, geometry, lesion_ids)
    plt = pyplot()
    from matplotlib import patheffects

    outline = [patheffects.withStroke(linewidth=2, foreground="black")]  # numbers stay legible on bone
    (fig_w, fig_h), rects = panel_layout(panels)
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=DPI, facecolor="black")
    try:
        views = (("coronal", panels.coronal, panels.coronal_mask, ("R", "L")),
                 ("sagittal", panels.sagittal, panels.sagittal_mask, ("A", "P")))
        for rect, (key, img, lesion_mask, (left_mark, right_mark)) in zip(rects, views):
            ax = fig.add_axes(rect)
            ax.imshow(window(img), cmap="gray", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
            if lesion_mask.any():
                ax.contour(lesion_mask.astype(np.float32), levels=[0.5], colors=[OUTLINE], linewidths=1.0)
            for lid, col, row in panels.labels[key]:
                ax.text(col, row, str(lid), color=NUMBER, fontsize=8, ha="center", va="center", fontweight="bold",
                        path_effects=outline)
            for x, mark, ha in ((0.01, left_mark, "left"), (0.99, right_mark, "right")):
                ax.text(x, 0.5, mark, transform=ax.transAxes, color="white", fontsize=9, ha=ha, va="center")
            ax.text(0.5, 0.99, "S", transform=ax.transAxes, color="white", fontsize=9, ha="center", va="top")
            ax.text(0.5, 0.01, f"{key} MIP", transform=ax.transAxes, color="white", fontsize=8,
                    ha="center", va="bottom")
            ax.set_xlim(-0.5, img.shape[1] - 0.5)
            ax.set_ylim(img.shape[0] - 0.5, -0.5)
            ax.set_axis_off()
        fig.text(0.5, 1 - (PAD_IN + TITLE_IN / 2) / fig_h, title, color="white", fontsize=11,
                 ha="center", va="center")
    except BaseException:
        plt.close(fig)
        raise
    return save_png(fig, path)


def radiological_axial(native_slice: np.ndarray, geometry: Geometry) -> np.ndarray:
    """An axial slice of a stored volume, oriented for radiological display.

    Args:
        native_slice: ``volume[k]`` of a stored ``(slices, rows, cols)`` volume whose
            axis 0 runs head-feet (axial storage; any in-plane order or flips), or a stack
            ``(rows, cols, ...)`` with trailing channels (e.g. a Grad-CAM overlay).
        geometry: the stored volume's geometry.

    Returns:
        A ``(rows, cols)`` view to show with ``imshow`` (row 0 at the top): anterior up,
        the patient's right on the viewer's left. Pixel size is then
        ``(row_mm, col_mm)`` = canonical ``(spacing_y, spacing_x)``:
        ``imshow(..., aspect=row_mm / col_mm)``.

    Raises:
        ValueError: the volume's axis 0 is not the head-feet axis (sagittal or coronal
            storage: take the slice from the canonical view instead).
    """
    r = Reorientation.of(geometry)
    order, flipped = r.numpy_axes()
    if order[0] != 0:
        raise ValueError(f"direction {geometry.direction}: array axis 0 is not the head-feet axis; "
                         f"take axial slices from Reorientation.forward(volume) instead")
    arr = np.asarray(native_slice)
    if tuple(arr.shape[:2]) != geometry.shape[1:]:
        raise ValueError(f"slice shape {arr.shape} differs from the geometry's (rows, cols) {geometry.shape[1:]}")
    out = arr.transpose([order[1] - 1, order[2] - 1] + list(range(2, arr.ndim)))
    in_plane = [a - 1 for a in flipped if a > 0]
    return np.flip(out, axis=in_plane) if in_plane else out
