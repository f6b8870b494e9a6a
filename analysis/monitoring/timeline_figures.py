"""``timeline``'s figures: each scan's preview and ``timeline.png``.

* **A scan's preview** (``preview_tK.png``): the scan registered into the first scan's frame, a coronal
  bone-window MIP in radiological orientation (:func:`analysis.monitoring.preview.coronal_panel`, the
  conventions of ``predict`` and ``followup``), each lesion outlined in the colour of its track's status
  against the previous scan (:data:`COLOURS`) and numbered with its track id: the same number at the
  same place in every scan's preview.
* **timeline.png**: above, the total lesion volume (ml, left axis) and the lesion count (right axis)
  at each scan's date, each scan's PCWG3 state written under its date; below, a swimmer plot: one row
  per track, a line while it has a lesion, a marker at each scan coloured by its status there (open:
  no lesion, e.g. resolved; ``?``: outside that scan's field of view).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from analysis.imaging.display import window
from analysis.imaging.io import Geometry, atomic_file
from analysis.monitoring.preview import STATUS_COLOURS, coronal_panel, number_positions
from analysis.prediction.preview import DPI, pyplot, save_png

__all__ = ["COLOURS", "STATUS_NUMBERS", "write_scan_preview", "write_timeline_figure"]

#: Outline and marker colour of each status (RGB in [0, 1]): followup's, plus the first scan's
#: lesions (white) and indeterminate ones (grey).
COLOURS: dict[str, tuple[float, float, float]] = {**STATUS_COLOURS, "baseline": (1.0, 1.0, 1.0),
                                                  "indeterminate": (0.6, 0.6, 0.6)}
#: A code per status for the per-voxel maps the previews draw (0: no lesion).
STATUS_NUMBERS: dict[str, int] = {name: i for i, name in enumerate(COLOURS, start=1)}
PANEL_HEIGHT_IN = 6.0
MIN_WIDTH_IN = 4.5


def write_scan_preview(path: str | os.PathLike, ct: np.ndarray, geometry: Geometry, codes: np.ndarray,
                       numbers: np.ndarray, *, title: str) -> Path:
    """Write one scan's preview PNG atomically.

    Args:
        path: output ``.png``.
        ct: ``(slices, rows, cols)`` HU on the first scan's grid (the scan registered into it).
        geometry: the first scan's geometry.
        codes: :data:`STATUS_NUMBERS` of each voxel's track status, same layout (0: no lesion).
        numbers: the track id of each voxel, same layout (0: no lesion).
        title: one line above the panel.
    """
    from matplotlib import patheffects

    plt = pyplot()
    names = {code: name for name, code in STATUS_NUMBERS.items()}
    img, (col_mm, row_mm) = coronal_panel(ct, geometry)
    h, w = img.shape
    panel_w = PANEL_HEIGHT_IN * (w * col_mm) / (h * row_mm)
    fig_w, fig_h = max(panel_w + 0.3, MIN_WIDTH_IN), PANEL_HEIGHT_IN + 1.1
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=DPI, facecolor="black")
    stroke = [patheffects.withStroke(linewidth=2, foreground="black")]
    try:
        ax = fig.add_axes(((fig_w - panel_w) / 2 / fig_w, 0.35 / fig_h, panel_w / fig_w, PANEL_HEIGHT_IN / fig_h))
        ax.imshow(window(img), cmap="gray", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        projected, _ = coronal_panel(codes, geometry)
        for code in np.unique(projected[projected > 0]).tolist():
            ax.contour((projected == code).astype(np.float32), levels=[0.5], colors=[COLOURS[names[code]]],
                       linewidths=1.2)
        for number, col, row in number_positions(numbers, geometry):
            ax.text(col, row, str(number), color="white", fontsize=8, ha="center", va="center", fontweight="bold",
                    path_effects=stroke)
        for x, mark, ha in ((0.01, "R", "left"), (0.99, "L", "right")):
            ax.text(x, 0.5, mark, transform=ax.transAxes, color="white", fontsize=9, ha=ha, va="center")
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_axis_off()
        fig.text(0.5, 1 - 0.4 / fig_h, title, color="white", fontsize=9, ha="center", va="center", wrap=True)
        present = [n for n in COLOURS if STATUS_NUMBERS[n] in set(np.unique(projected).tolist())]
        for i, name in enumerate(present):
            fig.text((i + 0.5) / max(len(present), 1), 0.15 / fig_h, name, color=COLOURS[name], fontsize=8,
                     ha="center", va="center")
    except BaseException:
        plt.close(fig)
        raise
    return save_png(fig, path)


def write_timeline_figure(path: str | os.PathLike, scans: Sequence[dict[str, Any]],
                          tracks: Sequence[dict[str, Any]]) -> Path:
    """Write ``timeline.png`` atomically (white background: a chart, not an image).

    Args:
        path: output ``.png``.
        scans: ``timeline.csv``'s rows (``date`` a :class:`datetime.date`, ``lesions``, ``total_ml``, ``state``).
        tracks: ``tracks.csv``'s rows (``track``, ``scan``, ``present``, ``status``, ``event``).
    """
    plt = pyplot()
    dates = [s["date"] for s in scans]
    ids = sorted({int(t["track"]) for t in tracks})
    height = 3.2 + 0.22 * max(len(ids), 4)
    fig, (top, swim) = plt.subplots(2, 1, figsize=(9.0, height), dpi=DPI, sharex=True,
                                    gridspec_kw={"height_ratios": [3.2, 0.22 * max(len(ids), 4)]})
    try:
        x = np.array([np.datetime64(d) for d in dates])
        top.plot(x, [s["total_ml"] for s in scans], "o-", color="tab:red", label="total volume (ml)")
        top.set_ylabel("total volume (ml)", color="tab:red")
        count = top.twinx()
        count.plot(x, [s["lesions"] for s in scans], "s--", color="tab:blue", label="lesions")
        count.set_ylabel("lesions", color="tab:blue")
        top.set_title("tumour burden and PCWG3 state per scan")
        top.set_ylim(0, 1.45 * max([s["total_ml"] for s in scans] + [1e-3]))
        count.set_ylim(0, 1.45 * max([s["lesions"] for s in scans] + [1]))
        for xi, s in zip(x, scans):
            top.annotate(s["state"], (xi, 1), xycoords=("data", "axes fraction"), xytext=(0, -3),
                         textcoords="offset points", fontsize=7, ha="center", va="top", color="black",
                         bbox={"facecolor": "white", "edgecolor": "0.7", "boxstyle": "round,pad=0.2"})
        by_track: dict[int, dict[int, dict[str, Any]]] = {}
        for t in tracks:
            by_track.setdefault(int(t["track"]), {})[int(t["scan"])] = t
        for row, track in enumerate(ids):
            steps = by_track[track]
            for k in sorted(steps):  # a line while the track has a lesion at both ends of an interval
                if k + 1 in steps and int(steps[k]["present"]) and int(steps[k + 1]["present"]):
                    swim.plot([x[k], x[k + 1]], [row, row], "-", color="0.6", linewidth=2, zorder=1)
            for k, t in sorted(steps.items()):
                status = t["status"] or ("baseline" if k == 0 else "")
                if int(t["present"]):
                    swim.scatter([x[k]], [row], color=[COLOURS.get(status, (0.2, 0.2, 0.2))], s=36, zorder=2,
                                 edgecolors="black", linewidths=0.5)
                elif t["event"] == "outside field of view":
                    swim.text(x[k], row, "?", ha="center", va="center", fontsize=8)
                elif t["event"].startswith("merged into") or status:
                    swim.scatter([x[k]], [row], facecolors="none", edgecolors=[COLOURS.get(status, (0.4, 0.4, 0.4))],
                                 s=36, zorder=2)
        swim.set_yticks(range(len(ids)), [str(i) for i in ids], fontsize=7)
        swim.set_ylim(len(ids) - 0.5 if ids else 0.5, -0.5)
        swim.set_ylabel("track")
        swim.set_xticks(x, [d.isoformat() for d in dates], rotation=30, fontsize=8)
        handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, markeredgecolor="black", label=n)
                   for n, c in COLOURS.items()]
        swim.legend(handles=handles, fontsize=7, ncol=len(handles), loc="upper center", bbox_to_anchor=(0.5, -0.35),
                    frameon=False)
        fig.tight_layout()
        path = Path(path)
        with atomic_file(path, suffix=".tmp.png") as tmp:
            fig.savefig(tmp, format="png", facecolor="white", dpi=DPI)
    finally:
        plt.close(fig)
    return path

