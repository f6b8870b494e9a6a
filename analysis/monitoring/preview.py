"""``preview.png`` of a follow-up: the baseline and the registered follow-up side by side.

The conventions of ``predict``'s previews (:mod:`analysis.prediction.preview`): bone-window
(:data:`analysis.imaging.display.BONE_WINDOW`) maximum-intensity projections, radiological
orientation whatever the storage order (the volume is first put in the canonical LPS view of
:mod:`analysis.imaging.orientation`): coronal, superior up, the patient's right on the viewer's
left. Both panels are in the baseline's grid, so a lesion sits at the same place in both. Each
lesion is outlined in the colour of its status (:data:`STATUS_COLOURS`) and numbered as the
``lesion`` column of ``lesions.csv``: on the baseline panel the baseline lesions (resolved
included), on the follow-up panel the follow-up lesions (new included).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from analysis.imaging.display import window
from analysis.imaging.io import Geometry
from analysis.imaging.orientation import Reorientation
from analysis.lesions import GROWN, INDETERMINATE, NEW, RESOLVED, SHRUNK, STABLE, STATUS_CODES
from analysis.prediction.preview import DPI, pyplot, save_png

__all__ = ["STATUS_COLOURS", "write_followup_preview", "coronal_panel"]

#: Outline colour of each status (RGB in [0, 1]), in the order of their codes (the legend's order).
STATUS_COLOURS: dict[str, tuple[float, float, float]] = {
    STABLE: (1.0, 1.0, 0.0), GROWN: (1.0, 0.5, 0.0), SHRUNK: (0.0, 0.8, 1.0), NEW: (1.0, 0.0, 0.0),
    RESOLVED: (0.0, 0.9, 0.0), INDETERMINATE: (0.7, 0.7, 0.7)}
PANEL_HEIGHT_IN = 7.0


def coronal_panel(volume: np.ndarray, geometry: Geometry, *, reduce: str = "max") -> tuple[np.ndarray, tuple[float, float]]:
    """The coronal projection of a stored ``(slices, rows, cols)`` volume as displayed (row 0
    superior, column 0 the patient's right) and its pixel size ``(col_mm, row_mm)``.

    Args:
        volume: HU (``reduce="max"``: a MIP) or a label map (``reduce="any"``: projected labels,
            the largest code along each ray).
        geometry: the volume's geometry.
    """
    r = Reorientation.of(geometry)
    canonical = r.forward(volume)                   # (z up, y to posterior, x to the patient's left)
    panel = canonical.max(axis=1)[::-1]
    sx, _, sz = r.canonical_geometry.spacing
    return np.ascontiguousarray(panel), (sx, sz)


def number_positions(numbers: np.ndarray, geometry: Geometry) -> list[tuple[int, float, float]]:
    """``(number, col, row)`` of each numbered lesion's (or track's) centroid projected on the
    coronal panel."""
    r = Reorientation.of(geometry)
    canonical = r.forward(numbers)
    nz = canonical.shape[0]
    out = []
    for k in np.unique(canonical[canonical > 0]).tolist():
        z, _, x = np.nonzero(canonical == k)
        out.append((int(k), float(x.mean()), float(nz - 1 - z.mean())))
    return out


def write_followup_preview(path: str | os.PathLike, baseline_ct: np.ndarray, registered_ct: np.ndarray,
                           geometry: Geometry, panels: list[tuple[np.ndarray, np.ndarray]], *, title: str) -> Path:
    """Write the preview PNG atomically.

    Args:
        path: output ``.png``.
        baseline_ct, registered_ct: ``(slices, rows, cols)`` HU on the baseline grid.
        geometry: the baseline's geometry.
        panels: for the baseline and the follow-up panel, ``(status_codes, lesion_numbers)``:
            two ``(slices, rows, cols)`` maps on the baseline grid, the status code
            (:data:`analysis.lesions.change.STATUS_CODES`) and the ``lesions.csv`` number of each voxel.
        title: one line above the panels.
    """
    plt = pyplot()
    from matplotlib import patheffects

    names = {code: name for name, code in STATUS_CODES.items()}
    images = [coronal_panel(baseline_ct, geometry), coronal_panel(registered_ct, geometry)]
    (h, w), (col_mm, row_mm) = images[0][0].shape, images[0][1]
    panel_w = PANEL_HEIGHT_IN * (w * col_mm) / (h * row_mm)
    fig_w, fig_h = 2 * panel_w + 0.45, PANEL_HEIGHT_IN + 0.9
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=DPI, facecolor="black")
    stroke = [patheffects.withStroke(linewidth=2, foreground="black")]
    try:
        for k, ((img, _), (codes, numbers), label) in enumerate(zip(images, panels, ("baseline", "follow-up (registered)"))):
            ax = fig.add_axes(((0.15 + k * (panel_w + 0.15)) / fig_w, 0.35 / fig_h, panel_w / fig_w,
                               PANEL_HEIGHT_IN / fig_h))
            ax.imshow(window(img), cmap="gray", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
            projected, _ = coronal_panel(codes, geometry)
            for code in np.unique(projected[projected > 0]).tolist():
                ax.contour((projected == code).astype(np.float32), levels=[0.5],
                           colors=[STATUS_COLOURS[names[code]]], linewidths=1.2)
            for number, col, row in number_positions(numbers, geometry):
                ax.text(col, row, str(number), color="white", fontsize=8, ha="center", va="center",
                        fontweight="bold", path_effects=stroke)
            for x, mark, ha in ((0.01, "R", "left"), (0.99, "L", "right")):
                ax.text(x, 0.5, mark, transform=ax.transAxes, color="white", fontsize=9, ha=ha, va="center")
            ax.text(0.5, 0.01, f"{label}, coronal MIP", transform=ax.transAxes, color="white", fontsize=8,
                    ha="center", va="bottom")
            ax.set_xlim(-0.5, img.shape[1] - 0.5)
            ax.set_ylim(img.shape[0] - 0.5, -0.5)
            ax.set_axis_off()
        fig.text(0.5, 1 - 0.25 / fig_h, title, color="white", fontsize=11, ha="center", va="center")
        for i, (name, colour) in enumerate(STATUS_COLOURS.items()):
            fig.text((i + 0.5) / len(STATUS_COLOURS), 0.15 / fig_h, name, color=colour, fontsize=9, ha="center",
                     va="center")
    except BaseException:
        plt.close(fig)
        raise
    return save_png(fig, path)
