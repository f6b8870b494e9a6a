"""A quality-control report of a cohort to look at before training: one HTML page with PNGs.

``validate DATASET --report OUT`` writes ``OUT/index.html``, ``OUT/qc.csv`` and two PNGs per
case: ``<case>_views.png`` (axial, coronal and sagittal slices through the largest lesion's
centroid, the volume's centre when there is none, the label filled in translucent red and
outlined) and ``<case>_mip.png`` (a coronal maximum-intensity projection with every lesion's
projection outlined and numbered as :func:`analysis.lesions.lesion_instances` numbers them).
Each case is put in the canonical LPS view first (:mod:`analysis.imaging.orientation`), so the
display is radiological whatever the storage order: axial anterior up and the patient's right
on the viewer's left (seen from the feet); coronal superior up, the patient's right on the
left; sagittal superior up, anterior on the left. The CT is shown in the display bone window
of :mod:`analysis.imaging.display`, pixels at their physical aspect ratio.

One row per case: size, spacing, storage orientation, HU range, lesion count and volume,
bone volume and how much of the label lies on the bone map ("on bone"), the volume of the
hard-negative map (``negativesTr``, outlined in cyan on the views; a map that overlaps the label
or does not fit its image makes the case a problem row), and flags for what
usually is a mistake (:func:`case_flags`, :func:`spacing_flags`):

- ``empty label``: no lesion voxel (a lesion-free patient, or a label that was lost);
- ``off bone``: a lesion with less than :data:`analysis.lesions.MIN_ON_BONE` of its voxels on the bone map;
- ``in air``: a lesion whose median HU is below
  :data:`analysis.imaging.hounsfield.AIR_OR_LUNG_HU` (air or aerated lung, -500 HU);
- ``leaves body``: label voxels outside the body (:func:`analysis.imaging.body.body_mask`);
- ``spacing``: an axis' spacing more than :data:`SPACING_FACTOR` times off the cohort's median;
- ``left-right flip?``: the label lies on the bone map only when mirrored about the body's
  mid-sagittal plane (the bone map's asymmetry decides), or the bone map matches the CT's
  dense bone clearly better mirrored than as stored. A symmetric skeleton cannot tell a flip,
  so no flag is no proof; a flag is worth a look.
"""
from __future__ import annotations

import html
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from analysis.cohort.case import label_problems, negatives_problems
from analysis.cohort.layout import Cohort
from analysis.errors import InputError
from analysis.imaging.body import body_mask
from analysis.imaging.display import window
from analysis.imaging.hounsfield import AIR_OR_LUNG_HU
from analysis.imaging.io import Geometry, atomic_directory, read_array
from analysis.imaging.orientation import Reorientation
from analysis.lesions import DEFAULT_BONE_HU, MIN_ON_BONE, lesion_instances, on_bone_fractions
from analysis.imaging.records import csv_text

log = logging.getLogger(__name__)

__all__ = ["QcRow", "QcReport", "case_flags", "spacing_flags", "orientation_code", "mirror_lr", "write_qc_report"]

#: An axis whose spacing is more than this factor above or below the cohort's median is flagged.
SPACING_FACTOR = 1.5
#: A left-right flip is suspected when the mirrored label's share on bone exceeds the stored
#: label's by at least this much and the stored label is mostly off the bone.
FLIP_GAIN = 0.3
#: Height of each image panel in pixels; widths follow the physical aspect ratio.
PANEL_PX = 240
DPI = 100
FILL = (1.0, 0.0, 0.0)
#: Hard negatives (``negativesTr``) are outlined in this colour.
NEGATIVE = (0.0, 0.8, 1.0)
NUMBER = (1.0, 1.0, 0.0)
#: Lesions numbered on a MIP at most (the outline shows them all).
MAX_NUMBERS = 40


@dataclass
class QcRow:
    """One case of the report.

    Attributes:
        case: the case id.
        size: voxels ``(x, y, z)`` as stored; spacing: mm ``(x, y, z)``.
        orientation: the stored axes' patient directions, e.g. ``"LPS"`` or ``"RAS"``.
        hu_min, hu_max: the CT's range.
        lesions: lesion count (26-connected); lesion_ml: their total volume.
        bone_ml: volume of the bone map (None without one).
        on_bone: share of lesion voxels on the bone map (None without a bone map or lesion).
        negatives_ml: volume of the hard-negative map (``negativesTr``; None without one).
        flags: what looks wrong, one short line each.
        problem: why the case could not be read (then only ``case`` and ``problem`` are set).
    """

    case: str
    size: tuple[int, ...] = ()
    spacing: tuple[float, ...] = ()
    orientation: str = ""
    hu_min: float = float("nan")
    hu_max: float = float("nan")
    lesions: int = 0
    lesion_ml: float = 0.0
    bone_ml: float | None = None
    on_bone: float | None = None
    negatives_ml: float | None = None
    flags: list[str] = field(default_factory=list)
    problem: str = ""


@dataclass
class QcReport:
    """What :func:`write_qc_report` wrote."""

    index: Path
    rows: list[QcRow]

    @property
    def n_flagged(self) -> int:
        return sum(1 for r in self.rows if r.flags or r.problem)


def orientation_code(geometry: Geometry) -> str:
    """The patient direction each stored index axis ``x, y, z`` runs to (DICOM LPS letters).

    >>> orientation_code(Geometry((4, 4, 4), (1, 1, 1), (0, 0, 0), (-1, 0, 0, 0, -1, 0, 0, 0, 1)))
    'RAS'
    """
    d = np.asarray(geometry.direction, np.float64).reshape(3, 3)
    letters = ("RL", "AP", "IS")
    out = []
    for j in range(3):
        p = int(np.argmax(np.abs(d[:, j])))
        out.append(letters[p][1] if d[p, j] > 0 else letters[p][0])
    return "".join(out)


def mirror_lr(volume: np.ndarray, centre_col: float) -> np.ndarray:
    """A canonical ``(slices, rows, cols)`` volume mirrored left-right about column ``centre_col``.

    Column ``j`` of the result is column ``2 * centre_col - j`` (rounded) of ``volume``;
    columns mirrored from outside the volume are 0.

    >>> mirror_lr(np.arange(5).reshape(1, 1, 5), 1.0)[0, 0].tolist()
    [2, 1, 0, 0, 0]
    """
    cols = volume.shape[2]
    src = np.rint(2.0 * centre_col - np.arange(cols)).astype(np.int64)
    valid = (src >= 0) & (src < cols)
    out = np.zeros_like(volume)
    out[..., valid] = volume[..., src[valid]]
    return out


def _share(mask: np.ndarray, where: np.ndarray) -> float:
    n = int(np.count_nonzero(mask))
    return float(np.count_nonzero(mask & where)) / n if n else 0.0


def _listed(items: list[str], shown: int = 4) -> str:
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def case_flags(ct: np.ndarray, label: np.ndarray, bones: np.ndarray | None) -> tuple[list[str], dict[str, float | None]]:
    """What looks wrong in one case (see the module docstring), from its canonical arrays.

    Args:
        ct: HU ``(slices, rows, cols)`` in the canonical LPS view (columns run from the
            patient's right to left).
        label: 0/1 lesion mask, same view.
        bones: bone codes (0 = no bone), same view; None without a bone map.

    Returns:
        ``(flags, figures)``: the flags, one short line each, and ``{"on_bone": share of
        lesion voxels on the bone map or None, "on_bone_mirrored": same for the mirrored
        label or None}``.
    """
    lesion = label != 0
    ids, n = lesion_instances(lesion, 26)
    flags: list[str] = []
    figures: dict[str, float | None] = {"on_bone": None, "on_bone_mirrored": None}
    if n == 0:
        return ["empty label"], figures
    body = body_mask(ct, pool=1)
    outside = int(np.count_nonzero(lesion & ~body))
    if outside:
        flags.append(f"leaves body: {outside} label voxel(s) outside the body")
    lesion_ids = ids[lesion]
    order = np.argsort(lesion_ids, kind="stable")
    groups = np.split(ct[lesion][order], np.cumsum(np.bincount(lesion_ids, minlength=n + 1)[1:])[:-1])
    in_air = [f"#{i} ({float(np.median(g)):.0f} HU)" for i, g in enumerate(groups, start=1)
              if float(np.median(g)) < AIR_OR_LUNG_HU]
    if in_air:
        flags.append(f"in air: lesion {_listed(in_air)} median below {AIR_OR_LUNG_HU:.0f} HU")
    if bones is None:
        return flags, figures
    bone = bones != 0
    on = on_bone_fractions(ids, n, bone)
    off = [f"#{i} ({100 * s:.0f}% on bone)" for i, s in enumerate(on.tolist(), start=1) if s < MIN_ON_BONE]
    if off:
        flags.append(f"off bone: lesion {_listed(off)}")
    centre = float(np.nonzero(body)[2].mean()) if body.any() else (ct.shape[2] - 1) / 2.0
    stored, mirrored = _share(lesion, bone), _share(mirror_lr(lesion, centre), bone)
    figures.update(on_bone=stored, on_bone_mirrored=mirrored)
    if stored < MIN_ON_BONE and mirrored - stored >= FLIP_GAIN:
        flags.append(f"left-right flip? the label is {100 * stored:.0f}% on bone, {100 * mirrored:.0f}% when mirrored")
    dense = ct > DEFAULT_BONE_HU  # the project's bone threshold (analysis.lesions)
    as_is, flipped = _share(bone, dense), _share(mirror_lr(bone, centre), dense)
    if flipped - as_is >= FLIP_GAIN / 2 and as_is < 0.6:
        flags.append(f"left-right flip? the bone map is {100 * as_is:.0f}% on dense bone, "
                     f"{100 * flipped:.0f}% when mirrored")
    return flags, figures


def spacing_flags(spacings: Sequence[Sequence[float]]) -> list[str | None]:
    """For each case, a flag when an axis' spacing is far from the cohort's median (else None).

    >>> spacing_flags([(1, 1, 3), (1, 1, 3), (1, 1, 5)])
    [None, None, 'spacing: z 5 mm vs cohort median 3 mm']
    """
    if not spacings:
        return []
    arr = np.asarray(spacings, np.float64)
    median = np.median(arr, axis=0)
    out: list[str | None] = []
    for row in arr:
        ratio = row / median
        far = [f"{'xyz'[a]} {row[a]:.3g} mm vs cohort median {median[a]:.3g} mm" for a in range(3)
               if ratio[a] > SPACING_FACTOR or ratio[a] < 1 / SPACING_FACTOR]
        out.append(f"spacing: {'; '.join(far)}" if far else None)
    return out


# --- figures ------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _focus(ids: np.ndarray, n: int, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The canonical index of the largest lesion's centroid (rounded), or the volume's centre."""
    if n == 0:
        return tuple(s // 2 for s in shape)  # type: ignore[return-value]
    counts = np.bincount(ids.ravel(), minlength=n + 1)
    counts[0] = 0
    k, i, j = np.nonzero(ids == int(np.argmax(counts)))
    return int(round(k.mean())), int(round(i.mean())), int(round(j.mean()))


def _figure(panels: list[tuple[np.ndarray, float, str]]):
    """A black figure with the panels side by side at PANEL_PX height, physical aspect kept.

    Each panel is ``(image rows x cols, row_mm / col_mm, name)``; returns ``(fig, axes)``.
    """
    plt = _plt()
    widths = [img.shape[1] / (img.shape[0] * aspect) * PANEL_PX for img, aspect, _ in panels]
    gap, pad = 8, 4
    fig_w, fig_h = sum(widths) + gap * (len(panels) - 1) + 2 * pad, PANEL_PX + 2 * pad + 18
    fig = plt.figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI, facecolor="black")
    axes, left = [], pad
    for w in widths:
        axes.append(fig.add_axes((left / fig_w, pad / fig_h, w / fig_w, PANEL_PX / fig_h)))
        left += w + gap
    return fig, axes


def _show(ax, img: np.ndarray, marks: tuple[str, str], name: str) -> None:
    ax.imshow(window(img), cmap="gray", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xlim(-0.5, img.shape[1] - 0.5)
    ax.set_ylim(img.shape[0] - 0.5, -0.5)
    ax.set_axis_off()
    for x, mark, ha in ((0.01, marks[0], "left"), (0.99, marks[1], "right")):
        ax.text(x, 0.5, mark, transform=ax.transAxes, color="white", fontsize=8, ha=ha, va="center")
    ax.text(0.5, 1.01, name, transform=ax.transAxes, color="white", fontsize=8, ha="center", va="bottom")


def _overlay(ax, mask: np.ndarray, colour: tuple[float, float, float] = FILL) -> None:
    if mask.any():
        rgba = np.zeros(mask.shape + (4,), np.float32)
        rgba[mask] = (*colour, 0.35)
        ax.imshow(rgba, aspect="auto", interpolation="nearest")
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=0.8)


def _save(fig, path: Path) -> None:
    plt = _plt()
    try:
        fig.savefig(path, format="png", facecolor="black", dpi=DPI)
    finally:
        plt.close(fig)


def write_views(path: Path, ct: np.ndarray, label: np.ndarray, ids: np.ndarray, n: int,
                spacing_zyx: tuple[float, float, float], negatives: np.ndarray | None = None) -> None:
    """``<case>_views.png``: axial, coronal, sagittal through the largest lesion (canonical arrays);
    the lesions in red, hard negatives (``negatives``, when given) in cyan."""
    k, i, j = _focus(ids, n, ct.shape)
    sz, sy, sx = spacing_zyx
    lesion = label != 0
    hard = np.zeros_like(lesion) if negatives is None else negatives != 0
    cuts = [(lambda v: v[k], sy / sx, f"axial {k}", ("R", "L")),
            (lambda v: v[:, i, :][::-1], sz / sx, f"coronal {i}", ("R", "L")),
            (lambda v: v[:, :, j][::-1], sz / sy, f"sagittal {j}", ("A", "P"))]
    fig, axes = _figure([(cut(ct), aspect, name) for cut, aspect, name, _ in cuts])
    for ax, (cut, _, name, marks) in zip(axes, cuts):
        _show(ax, cut(ct), marks, name)
        _overlay(ax, cut(lesion))
        _overlay(ax, cut(hard), NEGATIVE)
    _save(fig, path)


def write_mip(path: Path, ct: np.ndarray, ids: np.ndarray, n: int, spacing_zyx: tuple[float, float, float]) -> None:
    """``<case>_mip.png``: coronal MIP, every lesion's projection outlined and numbered."""
    sz, _, sx = spacing_zyx
    mip = ct.max(axis=1)[::-1]
    fig, (ax,) = _figure([(mip, sz / sx, f"coronal MIP, {n} lesion(s)")])
    _show(ax, mip, ("R", "L"), f"coronal MIP, {n} lesion(s)")
    for lesion_id in range(1, n + 1):
        proj = (ids == lesion_id).any(axis=1)[::-1]
        ax.contour(proj.astype(np.float32), levels=[0.5], colors=[FILL], linewidths=0.8)
        if lesion_id <= MAX_NUMBERS:
            rows, cols = np.nonzero(proj)
            ax.text(cols.mean(), rows.mean(), str(lesion_id), color=NUMBER, fontsize=7, ha="center", va="center")
    _save(fig, path)


# --- the report ---------------------------------------------------------------------------


def _case_row(cohort: Cohort, case: str, out: Path) -> QcRow:
    img_path, lab_path = cohort.image_path(case), cohort.label_path(case)
    ct, geometry = read_array(img_path)
    label, label_geometry = read_array(lab_path)
    problems = label_problems(lab_path, label, label_geometry, geometry)
    if problems:
        raise InputError(problems[0])
    bones = None
    if cohort.has_bones(case):
        bones, bone_geometry = read_array(cohort.bones_path(case))
        if geometry.mismatch(bone_geometry):
            raise InputError(f"{cohort.bones_path(case)}: {geometry.mismatch(bone_geometry)} of its image")
    negatives = None
    if cohort.has_negatives(case):
        negatives, negatives_geometry = read_array(cohort.negatives_path(case))
        problems = negatives_problems(cohort.negatives_path(case), negatives, negatives_geometry, geometry, label)
        if problems:
            raise InputError(problems[0])
    try:
        r = Reorientation.of(geometry)
    except ValueError as exc:
        raise InputError(f"{img_path}: {exc}") from None
    ct_c, label_c = r.forward(ct), r.forward(label != 0)
    bones_c = r.forward(bones) if bones is not None else None
    ids, n = lesion_instances(label_c, 26)
    flags, figures = case_flags(ct_c, label_c, bones_c)
    spacing_zyx = r.canonical_spacing_zyx
    negatives_c = None if negatives is None else r.forward(negatives != 0)
    write_views(out / f"{case}_views.png", ct_c, label_c, ids, n, spacing_zyx, negatives_c)
    write_mip(out / f"{case}_mip.png", ct_c, ids, n, spacing_zyx)
    voxel_ml = geometry.voxel_volume_ml
    return QcRow(case=case, size=geometry.size, spacing=geometry.spacing, orientation=orientation_code(geometry),
                 hu_min=float(ct.min()), hu_max=float(ct.max()), lesions=n,
                 lesion_ml=float(np.count_nonzero(label_c)) * voxel_ml,
                 bone_ml=None if bones_c is None else float(np.count_nonzero(bones_c)) * voxel_ml,
                 on_bone=figures["on_bone"], flags=flags,
                 negatives_ml=None if negatives_c is None else float(np.count_nonzero(negatives_c)) * voxel_ml)


CSV_COLUMNS = ("case", "size", "spacing_mm", "orientation", "hu_min", "hu_max", "lesions", "lesion_ml", "bone_ml",
               "on_bone", "hard_negatives_ml", "flags", "problem")


def _fmt(values: Sequence[float], digits: int = 3) -> str:
    return " x ".join(f"{v:.{digits}g}" for v in values)


def _csv_row(r: QcRow) -> dict[str, object]:
    return {"case": r.case, "size": _fmt(r.size, 6) if r.size else None, "spacing_mm": _fmt(r.spacing) if r.spacing else None,
            "orientation": r.orientation or None, "hu_min": None if r.problem else r.hu_min,
            "hu_max": None if r.problem else r.hu_max, "lesions": None if r.problem else r.lesions,
            "lesion_ml": None if r.problem else round(r.lesion_ml, 3),
            "bone_ml": None if r.bone_ml is None else round(r.bone_ml, 3),
            "on_bone": None if r.on_bone is None else round(r.on_bone, 4),
            "hard_negatives_ml": None if r.negatives_ml is None else round(r.negatives_ml, 3), "flags": "; ".join(r.flags) or None,
            "problem": r.problem or None}


_STYLE = """
body { font-family: sans-serif; background: #111; color: #ddd; margin: 16px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #444; padding: 3px 7px; text-align: right; }
td.case, td.flags, th { text-align: left; }
tr.flagged td.flags { color: #ffb347; }
.case-block { margin: 14px 0; padding: 6px 8px; border-top: 2px solid #333; }
.case-block h2 { font-size: 15px; margin: 4px 0; }
.case-block ul { margin: 2px 0 6px 0; color: #ffb347; font-size: 13px; }
.case-block .images { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; }
a { color: #8cf; }
.problems { color: #ff6b6b; font-size: 13px; }
"""


def _html(cohort: Cohort, rows: list[QcRow], problems: Sequence[str], sizes: dict[str, tuple[int, int]]) -> str:
    e = html.escape
    head = ("<tr><th>case</th><th>size x,y,z</th><th>spacing mm</th><th>orient.</th><th>HU range</th>"
            "<th>lesions</th><th>lesion ml</th><th>bone ml</th><th>on bone</th><th>hard neg. ml</th><th>flags</th></tr>")
    body = []
    for r in rows:
        if r.problem:
            body.append(f'<tr class="flagged"><td class="case">{e(r.case)}</td><td colspan="9"></td>'
                        f'<td class="flags">{e(r.problem)}</td></tr>')
            continue
        on_bone = "" if r.on_bone is None else f"{100 * r.on_bone:.0f}%"
        bone_ml = "" if r.bone_ml is None else f"{r.bone_ml:.1f}"
        negatives_ml = "" if r.negatives_ml is None else f"{r.negatives_ml:.2f}"
        body.append(f'<tr class="{"flagged" if r.flags else "ok"}"><td class="case"><a href="#{e(r.case)}">{e(r.case)}</a></td>'
                    f"<td>{_fmt(r.size, 6)}</td><td>{_fmt(r.spacing)}</td><td>{e(r.orientation)}</td>"
                    f"<td>{r.hu_min:.0f} .. {r.hu_max:.0f}</td><td>{r.lesions}</td><td>{r.lesion_ml:.2f}</td>"
                    f'<td>{bone_ml}</td><td>{on_bone}</td><td>{negatives_ml}</td><td class="flags">{e("; ".join(r.flags))}</td></tr>')
    blocks = []
    for r in rows:
        if r.problem:
            continue
        flags = "".join(f"<li>{e(f)}</li>" for f in r.flags)
        imgs = "".join(f'<img src="{e(name)}" width="{sizes[name][0]}" height="{sizes[name][1]}" alt="{e(name)}">'
                       for name in (f"{r.case}_views.png", f"{r.case}_mip.png"))
        blocks.append(f'<div class="case-block" id="{e(r.case)}"><h2>{e(r.case)}</h2>'
                      f'{"<ul>" + flags + "</ul>" if flags else ""}<div class="images">{imgs}</div></div>')
    problem_list = "".join(f"<li>{e(p)}</li>" for p in problems)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>QC report: {e(cohort.root.name)}</title><style>{_STYLE}</style></head><body>\n"
            f"<h1>Quality control: {e(str(cohort.root))}</h1>\n"
            f"<p>{len(rows)} cases, {sum(1 for r in rows if r.flags or r.problem)} flagged. Views: radiological "
            f"(axial seen from the feet, patient's right on the left), bone window; label in red, hard negatives (negativesTr) in cyan.</p>\n"
            + (f'<ul class="problems">{problem_list}</ul>\n' if problem_list else "")
            + f"<table>{head}{''.join(body)}</table>\n{''.join(blocks)}\n</body></html>\n")


def _png_size(path: Path) -> tuple[int, int]:
    with open(path, "rb") as fh:
        head = fh.read(24)
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def write_qc_report(dataset: str | os.PathLike, out: str | os.PathLike, *, problems: Sequence[str] = (),
                    overwrite: bool = False) -> QcReport:
    """Write the QC report of a cohort (see the module docstring), one case in memory at a time.

    Every case with both an image and a label is shown; a case that cannot be read is a row
    naming its problem. The folder is built in a temporary sibling and moved into place.

    Args:
        dataset: the cohort folder.
        out: the report folder (``index.html``, ``qc.csv``, ``<case>_views.png``, ``<case>_mip.png``).
        problems: lines to list at the top (``validate``'s problems).
        overwrite: replace an existing non-empty ``out``.

    Returns:
        The :class:`QcReport`.

    Raises:
        InputError: the dataset folder does not exist, or ``out`` exists, is not empty and
            ``overwrite`` is False.
    """
    cohort = Cohort(dataset)
    if not cohort.root.is_dir():
        raise InputError(f"{cohort.root}: dataset folder not found")
    cases = sorted(set(cohort.image_cases()) & set(cohort.label_cases()))
    out = Path(out)
    rows: list[QcRow] = []
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for case in cases:
            try:
                rows.append(_case_row(cohort, case, tmp))
            except InputError as exc:
                rows.append(QcRow(case=case, problem=str(exc)))
            log.info("QC %s: %s", case, "; ".join(rows[-1].flags) or rows[-1].problem or "no flag")
        readable = [r for r in rows if not r.problem]
        for r, flag in zip(readable, spacing_flags([r.spacing for r in readable])):
            if flag:
                r.flags.append(flag)
        sizes = {p.name: _png_size(p) for p in tmp.glob("*.png")}
        with open(tmp / "index.html", "w", encoding="utf-8") as fh:
            fh.write(_html(cohort, rows, problems, sizes))
        with open(tmp / "qc.csv", "w", encoding="utf-8", newline="") as fh:
            fh.write(csv_text(CSV_COLUMNS, [_csv_row(r) for r in rows]))
    return QcReport(index=out / "index.html", rows=rows)
