"""Running a model over cases, framework-neutral: what ``predict`` and ``nnunet predict`` share.

Both wings give this module only their network, as a callable on the *canonical* view of a
CT (:mod:`analysis.imaging.orientation`: LPS, ``arr[k]`` an axial slice, rows anterior to posterior,
columns the patient's right to left); everything around it is done here, once:

1. each case is read (a cohort image, an image file, or a DICOM series,
   :mod:`analysis.imaging.inputs`) and reoriented to the canonical view (a numpy view, no copy);
2. the segmenter runs on whole slices, or with ``--crop`` on windows around the body
   (:mod:`analysis.imaging.body`: per slab of :data:`SLAB` slices, the in-plane box of the
   largest region above -500 HU with a 10 mm margin). A window holds the box plus the
   network's receptive radius of real context and lies on the network's stride grid in the
   whole slice's coordinates (:func:`context_window`), so the part kept equals the whole-slice
   output (an ``exact`` crop; without a known radius, as for nnU-Net's sliding window, the
   crop is ``approximate``). Outside the kept part the probability is 0. Every crop is checked
   on one slice per case against the whole slice. With ``mirror`` the logits of the image and
   its three mirror images are averaged (nnU-Net's 2D test-time mirroring). A network that
   states the pixel spacing it was trained at (``Network.spacing_xy``) runs on each slice
   resampled in-plane to that spacing (:mod:`analysis.imaging.resample`), and its
   probabilities come back onto the input's grid linearly (:func:`network_grid`); the crop and
   the mirror passes happen on the network's grid, where the crop stays exact;
3. the probabilities go back to the input's exact storage order and geometry; the mask is
   ``probability >= threshold``, then 3D components smaller than ``min_size`` are removed, and
   those whose median HU is that of air or lung (:func:`analysis.prediction.folder.remove_components_in_air`:
   no bone metastasis lies there; counted in the case's record, ``removed_in_air``);
4. the case's outputs are written into its staging folder of the
   :class:`analysis.prediction.folder.PredictionFolder` (the PRED contract): ``<case>.nii.gz``,
   optionally ``probabilities/<case>.nii.gz`` (:mod:`analysis.prediction.probabilities`),
   ``preview/<case>.png`` (:mod:`analysis.prediction.preview`), ``dicom_seg/<case>.dcm`` for DICOM input
   (:mod:`analysis.imaging.dicom_seg`), and the case's rows of ``lesions.csv`` / ``patients.csv``
   (:mod:`analysis.prediction.tables`), rebuilt from every finished case at the end.

Detectors score canonical axial slices; ``slices.csv`` gives them by the stored file's axis-0
index (the rows of a file stored feet-first come out in its own order).
"""
from __future__ import annotations

import hashlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from analysis.cohort.bone_maps import PROJECT
from analysis.errors import DataProblems, InputError
from analysis.imaging.inputs import InputCase, discover_inputs, read_input
from analysis.imaging.io import Geometry, read_header
from analysis.imaging.orientation import CANONICAL, Reorientation
from analysis.lesions.overlap import dice
from analysis.prediction.folder import (DICOM_SEG, PREVIEW, PROBABILITIES, SR, PredictionFolder, check_ct, mask_path,
                                        remove_components_in_air, remove_small_components, select_cases)
from analysis.prediction.probabilities import LEVELS, quantise, write_stored
from analysis.prediction.shards import Shard, shard_cases

log = logging.getLogger(__name__)

#: Slices per body-crop slab: measured on the paper-sized phantom (analysis.imaging.body), per-slab
#: boxes of 8 / 16 / 32 slices cover 43 / 44 / 48 % of the slice against 62.5 % for one box
#: over the whole volume.
SLAB = 16
#: Margin around the body, mm (x, y).
BODY_MARGIN_MM = (10.0, 10.0)

#: ``segment(volume, z, spacing_zyx) -> probabilities``: ``volume`` canonical HU
#: ``(slices, rows, cols)`` (possibly cropped in-plane), ``z`` the centre slices to score,
#: ``spacing_zyx`` the voxel size in mm along the array axes; returns float32
#: ``(len(z), rows, cols)`` lesion probabilities.
SegmentFn = Callable[[np.ndarray, np.ndarray, Sequence[float]], np.ndarray]
#: ``detect(volume) -> (slices,)`` float32 slice probabilities of a canonical volume.
DetectFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Network:
    """A wing's network, as the runner needs it.

    Attributes:
        name: model name for records and DICOM-SEG algorithm identification.
        fingerprint: identifies the trained weights (RUN/WORK hash) for provenance.
        segment: the segmenter (None for a detector-only run).
        detect: the detector (None unless a detector or cascade).
        stride: the network's total downsampling: crop windows start on multiples of it in the
            whole slice's coordinates and span multiples of it, so the network sees the grid of
            the whole slice.
        crop: run the segmenter on windows around the body instead of whole slices (``--crop``).
        context: pixels on each side of an output pixel that it depends on (the network's
            receptive radius, rounded up to the stride): the crop window holds that much real
            context around the part that is kept, so the kept part equals the whole-slice
            output (``exact`` crop). None: unknown (nnU-Net's sliding window): the window is the
            body box, an ``approximate`` crop.
        mirror: average the network's logits over the image and its mirror images along rows,
            cols and both (4 passes), as nnU-Net's 2D test-time mirroring does; for a network that
            does not mirror itself.
        spacing_xy: the in-plane pixel spacing ``(x, y)`` mm (canonical cols, rows) the segmenter
            was trained at: each case runs resampled to it (:func:`network_grid`). None: at the
            input's own spacing (a network that resamples itself, as nnU-Net does, or
            ``--no-resample``).
        detect_spacing_xy: the same for the detector (a cascade's two RUNs may differ).
    """

    name: str
    fingerprint: str
    segment: SegmentFn | None = None
    detect: DetectFn | None = None
    stride: int = 1
    crop: bool = True
    context: int | None = None
    mirror: bool = False
    spacing_xy: tuple[float, float] | None = None
    detect_spacing_xy: tuple[float, float] | None = None

    @property
    def crop_mode(self) -> str | None:
        """``exact`` when the crop gives the whole-slice result (a known ``context``), else
        ``approximate``; None without a crop."""
        if not self.crop:
            return None
        return "exact" if self.context is not None else "approximate"


@dataclass(frozen=True)
class Outputs:
    """What to write per case besides the mask.

    Attributes:
        threshold: a voxel is lesion when its probability is >= this.
        min_size: remove 3D components (26-connected) smaller than this many voxels.
        detector_threshold: cascade: slices whose detector probability is >= this are segmented.
        probabilities: write ``probabilities/<case>.nii.gz``.
        dicom_seg: write ``dicom_seg/<case>.dcm`` (DICOM input only): one segment per lesion
            when the lesions are computed.
        sr: write ``sr/<case>.dcm``, the TID 1500 report of the lesions referencing the SEG
            (DICOM input only; :mod:`analysis.imaging.dicom_sr`).
        preview: write ``preview/<case>.png``.
        lesions: compute the case's lesion and patient rows.
        bones: ``DIR`` of bone maps ``DIR/<case>.nii.gz``; None: none.
        bones_from: ``project`` codes or ``totalsegmentator`` "total" ids.
        ct_check: refuse a case that does not look like CT in HU
            (:func:`analysis.imaging.hounsfield.require_ct`).
    """

    threshold: float = 0.5
    min_size: int = 0
    detector_threshold: float = 0.5
    probabilities: bool = False
    dicom_seg: bool = False
    sr: bool = False
    preview: bool = True
    lesions: bool = True
    bones: Path | None = None
    bones_from: str = PROJECT
    ct_check: bool = True


@dataclass(frozen=True)
class InputPlan:
    """The cases of one run, checked before any network work.

    Attributes:
        source: the cohort folder or ``--images`` PATH (resolved).
        cases: the cases to predict (this shard's).
        shapes: ``(slices, rows, cols)`` of each case, from headers.
        pixel_mm: ``(between rows, between columns)`` in mm of each case's stored slices, from
            headers: with ``shapes``, what a network that resamples will see (memory estimates).
        failures: one line per ``--images`` input that failed its cheap checks (skipped).
        strict: cohort input: a bad case stops the run (all are checked up front).
    """

    source: str
    cases: list[InputCase]
    shapes: dict[str, tuple[int, int, int]]
    failures: list[str]
    strict: bool
    pixel_mm: dict[str, tuple[float, float]] = field(default_factory=dict)

    def describe(self, cases_option: str) -> dict[str, Any]:
        """The input fields of ``predict.json``."""
        return {"input": self.source, "dataset": self.source if self.strict else None,
                "images": None if self.strict else self.source, "cases_option": cases_option if self.strict else None}


def plan_inputs(dataset: str | Path | None, images: str | Path | None, *, cases: str = "test",
                shard: Shard | None = None, series: str | None = None, dicom_seg: bool = False) -> InputPlan:
    """The cases of ``--dataset`` (a cohort; ``--cases``) or ``--images`` (:mod:`analysis.imaging.inputs`),
    restricted to ``shard``, with their cheap checks (headers, series structure).

    Raises:
        InputError: neither or both inputs; a bad cohort case (cohorts are checked whole); no
            DICOM input with ``dicom_seg``; a shard that selects nothing.
        DataProblems: every ``--images`` input failed its checks (one line each).
    """
    from analysis.cohort.layout import Cohort

    if (dataset is None) == (images is None):
        raise InputError("give either --dataset (a cohort) or --images (image files or DICOM folders)")
    failures: list[str] = []
    shapes: dict[str, tuple[int, int, int]] = {}
    pixel_mm: dict[str, tuple[float, float]] = {}
    if dataset is not None:
        cohort = Cohort(dataset)
        cohort.require_exists()
        found = [InputCase(case_id=c, kind="image", path=cohort.image_path(c))
                 for c in select_cases(cohort, cases, shard)]
        for case in found:
            geometry = check_ct(case.path)
            shapes[case.case_id] = tuple(geometry.shape)
            pixel_mm[case.case_id] = (float(geometry.spacing[1]), float(geometry.spacing[0]))
        source = str(cohort.root.resolve())
    else:
        source = str(Path(images).resolve())
        discovered = discover_inputs(images, series_uid=series, errors=failures)
        keep = set(shard_cases([c.case_id for c in discovered], shard)) if shard else None
        if keep is not None and not keep and discovered:
            raise InputError(f"--shard {shard[0]}/{shard[1]}: selects none of the {len(discovered)} case(s); "
                             f"use n <= {len(discovered)}")
        found = []
        for case in (c for c in discovered if keep is None or c.case_id in keep):
            try:
                shapes[case.case_id], pixel_mm[case.case_id] = _input_shape(case)
            except InputError as exc:
                failures.append(str(exc))
                continue
            found.append(case)
        if not found:
            raise DataProblems(failures or [f"{source}: no case to predict"])
    if dicom_seg and not any(c.kind == "dicom" for c in found):
        raise InputError(f"--dicom-seg: {source} holds no DICOM series; a DICOM Segmentation references its "
                         f"source images (NIfTI input has none)")
    return InputPlan(source=source, cases=found, shapes=shapes, failures=failures, strict=dataset is not None,
                     pixel_mm=pixel_mm)


def _input_shape(case: InputCase) -> tuple[tuple[int, int, int], tuple[float, float]]:
    """``(slices, rows, cols)`` and the pixel size ``(between rows, between columns)`` mm, from headers."""
    if case.series is not None:
        s = case.series
        return (s.n_slices, s.rows, s.columns), (float(s.pixel_spacing[0]), float(s.pixel_spacing[1]))
    geometry = read_header(case.path, ndim=None)
    if len(geometry.size) != 3:
        raise InputError(f"{case.path}: is a {len(geometry.size)}D image, expected a 3D CT")
    return tuple(geometry.shape), (float(geometry.spacing[1]), float(geometry.spacing[0]))


def sha256_of(case: InputCase) -> str:
    """sha256 of a case's input: the file, or the series' files in slice order (names and bytes)."""
    h = hashlib.sha256()
    files = [case.path] if case.series is None else sorted(set(case.series.files))
    for f in files:
        if case.series is not None:
            h.update(f.name.encode("utf-8") + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def crop_boxes(ct: np.ndarray, spacing_zyx: Sequence[float]) -> list[tuple[slice, slice, slice]]:
    """Per-slab ``(slices, rows, cols)`` boxes of the body in a canonical volume (:mod:`analysis.imaging.body`):
    the parts of each slab whose output is kept."""
    from analysis.imaging.body import slab_boxes

    return slab_boxes(ct, SLAB, margin_mm=BODY_MARGIN_MM, spacing_xy=(spacing_zyx[2], spacing_zyx[1]), stride=1)


def context_window(inner: slice, size: int, *, context: int, stride: int) -> tuple[slice, slice]:
    """The window a network runs on so that its output inside ``inner`` is its whole-slice output.

    ``inner`` grows by ``context`` pixels on each side (the network's receptive radius); the
    window then starts on a multiple of ``stride`` and spans a multiple of it (both clipped to
    the slice), so the network's pooling grid is the whole slice's grid. Where the window is
    clipped at the slice's edge the network sees what it sees on the whole slice; elsewhere the
    part within ``context`` of the window's edge depends on the zero padding there and is not
    kept.

    Args:
        inner: the part of the axis whose output is wanted.
        size: the axis' length in the whole slice.
        context: receptive radius in pixels (0: the window is ``inner`` on the stride grid).
        stride: the network's total stride.

    Returns:
        ``(window, kept)``: slices of the whole axis; ``kept`` contains ``inner``.

    Examples:
        A body box starting at an odd row, a network of stride 16 and receptive radius 20:

        >>> context_window(slice(37, 61), 128, context=20, stride=16)
        (slice(16, 96, None), slice(36, 76, None))

        Clipped at both edges of a 100-pixel axis, the window is the whole axis:

        >>> context_window(slice(10, 90), 100, context=20, stride=16)
        (slice(0, 100, None), slice(0, 100, None))
    """
    lo = max(0, inner.start - context)
    lo -= lo % stride
    want = min(size, inner.stop + context)
    hi = min(size, lo + -(-(want - lo) // stride) * stride)
    kept = slice(lo + context if lo > 0 else 0, hi - context if hi < size else size)
    return slice(lo, hi), kept


#: Mirror passes of 2D test-time mirroring (nnU-Net v2 ``_internal_maybe_mirror_and_predict``:
#: the image and its flips along every non-empty combination of the 2 in-plane axes), as
#: axes of a canonical ``(slices, rows, cols)`` volume.
MIRROR_AXES = ((), (1,), (2,), (1, 2))
#: Probabilities are clipped to [eps, 1 - eps] before their logits are averaged.
_LOGIT_EPS = 1e-7


def _segment_once(net: Network, ct: np.ndarray, spacing_zyx: Sequence[float], todo: np.ndarray,
                  crop: bool) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    prob = np.zeros(ct.shape, np.float32)
    seen = np.zeros(ct.shape, bool)
    if not crop:
        prob[todo] = net.segment(ct, todo, spacing_zyx)
        seen[todo] = True
        return prob, seen, {"pixel_fraction": 1.0, "boxes": 1}
    context = net.context or 0
    boxes = crop_boxes(ct, spacing_zyx)
    computed = 0
    for zs, rows, cols in boxes:
        z = todo[(todo >= zs.start) & (todo < zs.stop)]
        if z.size == 0:
            continue
        run_r, keep_r = context_window(rows, ct.shape[1], context=context, stride=net.stride)
        run_c, keep_c = context_window(cols, ct.shape[2], context=context, stride=net.stride)
        out = net.segment(ct[:, run_r, run_c], z, spacing_zyx)
        prob[z, keep_r, keep_c] = out[:, keep_r.start - run_r.start:keep_r.stop - run_r.start,
                                      keep_c.start - run_c.start:keep_c.stop - run_c.start]
        seen[z, keep_r, keep_c] = True
        computed += z.size * (run_r.stop - run_r.start) * (run_c.stop - run_c.start)
    total = todo.size * ct.shape[1] * ct.shape[2]
    return prob, seen, {"pixel_fraction": round(computed / total, 4), "kept_fraction": round(float(seen[todo].mean()), 4),
                        "boxes": len(boxes), "mode": net.crop_mode, "context_px": net.context}


def _logit(prob: np.ndarray) -> np.ndarray:
    p = np.clip(prob, _LOGIT_EPS, 1 - _LOGIT_EPS)
    return np.log(p) - np.log1p(-p)


def _mean_of_logits(logit_sum: np.ndarray) -> np.ndarray:
    """The probability of the mean of :data:`MIRROR_AXES`' logits (float32)."""
    return (1.0 / (1.0 + np.exp(-logit_sum / len(MIRROR_AXES)))).astype(np.float32)


def _segment(net: Network, ct: np.ndarray, spacing_zyx: Sequence[float], todo: np.ndarray,
             crop: bool) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One pass, or the mirror-averaged passes (logits averaged, as nnU-Net does) with ``net.mirror``."""
    if not net.mirror:
        return _segment_once(net, ct, spacing_zyx, todo, crop)
    logit_sum = None
    seen_all = None
    for axes in MIRROR_AXES:
        prob, seen, info = _segment_once(net, np.flip(ct, axes) if axes else ct, spacing_zyx, todo, crop)
        if axes:
            prob, seen = np.flip(prob, axes), np.flip(seen, axes)
        logit = _logit(prob)
        logit_sum = logit if logit_sum is None else logit_sum + logit
        seen_all = seen if seen_all is None else seen_all & seen
        del prob, logit
    prob = _mean_of_logits(logit_sum)
    prob[~seen_all] = 0.0
    return prob, np.ascontiguousarray(seen_all), {**info, "mirror_passes": len(MIRROR_AXES)}


def _whole_slice(net: Network, ct: np.ndarray, spacing_zyx: Sequence[float], z: np.ndarray) -> np.ndarray:
    """The whole-slice probabilities ``(rows, cols)`` of one slice ``z`` (mirror-averaged with
    ``net.mirror``), without a volume-sized array: the crop check's reference."""
    if not net.mirror:
        return np.asarray(net.segment(ct, z, spacing_zyx), np.float32)[0]
    logit_sum = np.zeros(ct.shape[1:], np.float32)
    for axes in MIRROR_AXES:
        out = np.asarray(net.segment(np.flip(ct, axes) if axes else ct, z, spacing_zyx), np.float32)[0]
        logit_sum += _logit(np.flip(out, tuple(a - 1 for a in axes)) if axes else out)
    return _mean_of_logits(logit_sum)


def segment_canonical(net: Network, ct: np.ndarray, spacing_zyx: Sequence[float],
                      slices: np.ndarray | None = None, *,
                      threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Lesion probabilities of a canonical volume: whole slices, or crop windows around the body
    with ``net.crop`` (:func:`context_window`), mirror-averaged with ``net.mirror``.

    With the crop, the middle slice to segment is also run on the whole slice and the two
    compared (``info["check"]``: the largest probability difference over the slice and the
    Dice of the two masks at ``threshold``): the crop's measured agreement, in every record.

    Args:
        ct: canonical HU ``(slices, rows, cols)``.
        slices: centre slices to segment (None: all); the others stay 0.
        threshold: the mask threshold, for the crop check's Dice.

    Returns:
        ``(probabilities, seen, info)``: float32 of ``ct``'s shape (0 where the network's
        output was not kept), the voxels whose output was kept (bool, same shape), and
        ``pixel_fraction`` (the share of slice pixels the network computed), ``boxes``,
        and with the crop its ``mode``, ``context_px`` and ``check``.
    """
    todo = np.arange(ct.shape[0]) if slices is None else np.asarray(sorted(slices), np.int64)
    if todo.size == 0:
        return np.zeros(ct.shape, np.float32), np.zeros(ct.shape, bool), {"pixel_fraction": 0.0, "boxes": 0}
    prob, seen, info = _segment(net, ct, spacing_zyx, todo, net.crop)
    if net.crop:
        z = todo[todo.size // 2: todo.size // 2 + 1]
        a, b = prob[z[0]], _whole_slice(net, ct, spacing_zyx, z)
        agreement = dice(a >= threshold, b >= threshold)
        info["check"] = {"slice": int(z[0]), "max_abs_diff": round(float(np.abs(a - b).max()), 6),
                         # null: both masks empty on that slice (the metric's NaN, undefined), not a number
                         "dice": None if math.isnan(agreement) else round(agreement, 6)}
    return prob, seen, info


@dataclass(frozen=True)
class NetworkGrid:
    """Where a network runs on one canonical volume: its own grid or the input's.

    Attributes:
        shape_rc: ``(rows, cols)`` of the network's slices.
        spacing_zyx: their voxel size in mm (the slice spacing is the input's).
        resampled: whether the slices are resampled (else the network sees the input as it is).
    """

    shape_rc: tuple[int, int]
    spacing_zyx: tuple[float, float, float]
    resampled: bool

    def record(self, input_zyx: Sequence[float], model_xy: Sequence[float] | None) -> dict[str, Any]:
        """``predict.json``'s spacing of one case: the input's, the model's and the one used, ``(x, y)`` mm."""
        return {"input_xy_mm": [round(float(input_zyx[2]), 6), round(float(input_zyx[1]), 6)],
                "model_xy_mm": None if model_xy is None else [float(v) for v in model_xy],
                "network_xy_mm": [round(float(self.spacing_zyx[2]), 6), round(float(self.spacing_zyx[1]), 6)],
                "resampled": self.resampled, "network_shape_rc": list(self.shape_rc)}


def network_grid(shape_zyx: Sequence[int], spacing_zyx: Sequence[float],
                 target_xy: Sequence[float] | None) -> NetworkGrid:
    """The grid a network trained at ``target_xy`` mm runs on for a canonical volume: the input's own
    when no target is known or the spacings agree (:func:`analysis.imaging.resample.needs_resampling`),
    else the slice's extent in pixels of (about) the target size.

    >>> network_grid((4, 128, 128), (3.0, 0.6, 0.6), (1.0, 1.0))
    NetworkGrid(shape_rc=(77, 77), spacing_zyx=(3.0, 0.9974025974025974, 0.9974025974025974), resampled=True)
    """
    from analysis.imaging.resample import in_plane_shape, needs_resampling, spacing_after

    spacing_rc = (float(spacing_zyx[1]), float(spacing_zyx[2]))
    shape_rc = (int(shape_zyx[1]), int(shape_zyx[2]))
    target_rc = None if target_xy is None else (float(target_xy[1]), float(target_xy[0]))
    if not needs_resampling(spacing_rc, target_rc):
        return NetworkGrid(shape_rc, tuple(float(s) for s in spacing_zyx), False)  # type: ignore[arg-type]
    new = in_plane_shape(shape_rc, spacing_rc, target_rc)
    after = spacing_after(shape_rc, spacing_rc, new)
    return NetworkGrid(new, (float(spacing_zyx[0]), *after), True)  # type: ignore[arg-type]


def to_network_grid(ct: np.ndarray, grid: NetworkGrid) -> np.ndarray:
    """The canonical volume on the network's grid (linear, anti-aliased, float32 whatever the stored
    type: an int16 DICOM series and its float NIfTI copy give one answer)."""
    from analysis.imaging.resample import resample_in_plane

    if not grid.resampled:
        return ct
    return resample_in_plane(ct, grid.shape_rc, order=1, antialias=True)


def from_network_grid(prob: np.ndarray, seen: np.ndarray, shape_rc: Sequence[int],
               grid: NetworkGrid) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (linear) and the looked-at voxels (nearest) back onto the input's grid."""
    from analysis.imaging.resample import resample_in_plane

    if not grid.resampled:
        return prob, seen
    back = resample_in_plane(prob, shape_rc, order=1)
    np.clip(back, 0.0, 1.0, out=back)
    return back, resample_in_plane(seen.view(np.uint8), shape_rc, order=0, dtype=np.uint8).view(bool)


def _bones(outputs: Outputs, case: str, geometry: Geometry) -> np.ndarray | None:
    if outputs.bones is None:
        return None
    from analysis.prediction.tables import bones_from

    path = Path(outputs.bones) / f"{case}.nii.gz"
    if not path.is_file():
        raise InputError(f"{path}: bone map of case {case} not found; --bones DIR needs DIR/<case>.nii.gz "
                         f"for every case")
    return bones_from(path, outputs.bones_from, geometry)


def predict_case(case: InputCase, net: Network, outputs: Outputs, staging: Path, part: dict[str, Any]) -> None:
    """Read one case, run the network on its canonical view and write its outputs into ``staging``.

    ``part`` receives the case's record (input, orientation, slices, timing, lesion rows).

    Raises:
        InputError: the case cannot be read, holds non-finite HU, does not look like CT in HU
            (unless ``outputs.ct_check`` is off), or is not stored with axial slices along axis 0
            (detectors only), or its bone map is missing/unlike it.
    """
    t0 = time.perf_counter()
    import SimpleITK as sitk

    from analysis.imaging.hounsfield import require_ct
    from analysis.imaging.io import require_finite, write_mask

    image, record = read_input(case)
    geometry = Geometry.of(image)
    if len(geometry.size) != 3:
        raise InputError(f"{case.describe()}: is a {len(geometry.size)}D image, expected a 3D CT")
    native = sitk.GetArrayFromImage(image)  # its stored type: the networks cast each batch (memory)
    del image
    require_finite(case.path, native, where=case.describe())
    require_ct(native, case.describe(), check=outputs.ct_check)
    bones = _bones(outputs, case.case_id, geometry)
    reo = Reorientation.of(geometry)
    ct = reo.forward(native)
    spacing_zyx = reo.canonical_spacing_zyx
    part.update(input={**record, "sha256": sha256_of(case)}, orientation=CANONICAL,
                stored_axes="identity" if reo.is_identity else {"perm_xyz": list(reo.perm), "flip_xyz": list(reo.flip)},
                slices=int(native.shape[0]))
    t_net = time.perf_counter()
    det_probs = None
    if net.detect is not None:
        if reo.perm[2] != 2:
            raise InputError(f"{case.describe()}: stored with axis 0 not head-to-feet ({reo.perm}); slice detection "
                             f"needs axial slices along the file's third index")
        det_grid = network_grid(ct.shape, spacing_zyx, net.detect_spacing_xy)
        det_c = np.asarray(net.detect(np.ascontiguousarray(to_network_grid(ct, det_grid))), np.float32)
        det_probs = det_c[reo.canonical_slices(np.arange(det_c.size))]  # stored slice s: canonical one's value
        part["slice_probabilities"] = [float(p) for p in det_probs]
        part["detector_spacing"] = det_grid.record(spacing_zyx, net.detect_spacing_xy)
    if net.segment is None:
        part["seconds_network"] = round(time.perf_counter() - t_net, 3)
        part["seconds"] = round(time.perf_counter() - t0, 3)
        return
    chosen = det_c_chosen(det_probs, outputs, reo)
    grid = network_grid(ct.shape, spacing_zyx, net.spacing_xy)
    part["spacing"] = grid.record(spacing_zyx, net.spacing_xy)
    prob_n, seen_n, crop = segment_canonical(net, to_network_grid(ct, grid), grid.spacing_zyx, chosen,
                                             threshold=outputs.threshold)
    prob_c, seen = from_network_grid(prob_n, seen_n, ct.shape[1:], grid)
    del prob_n, seen_n
    part["seconds_network"] = round(time.perf_counter() - t_net, 3)
    raw = reo.backward(seen & (prob_c >= outputs.threshold))  # never lesion where the network did not look
    del seen
    # the map as stored (uint8, 1/255; analysis.prediction.probabilities), cut to reproduce ``raw`` exactly:
    # a quarter of the float map's memory from here on
    stored = quantise(reo.backward(prob_c), outputs.threshold, above=raw)
    del prob_c
    mask, in_air = remove_components_in_air(remove_small_components(raw, outputs.min_size), native)
    part["removed_in_air"] = {"lesions": int(in_air.size), "ml": round(float(in_air.sum()) * geometry.voxel_volume_ml, 6)}
    segmented = int(native.shape[0] if chosen is None else len(chosen))
    part.update(segmented=segmented, skipped=int(native.shape[0]) - segmented, crop=crop,
                lesion_voxels=int(mask.sum()))
    write_mask(mask, geometry, mask_path(staging, case.case_id))
    labels, sections = _case_lesions(case, mask, native, geometry, stored, bones, outputs, part)
    if outputs.probabilities:
        write_stored(stored, geometry, staging / PROBABILITIES / f"{case.case_id}.nii.gz")
    del stored
    _case_figures(case, mask, native, geometry, labels, sections, outputs, staging, part, net)
    part["seconds"] = round(time.perf_counter() - t0, 3)


def det_c_chosen(det_probs: np.ndarray | None, outputs: Outputs, reo: Reorientation) -> np.ndarray | None:
    """Cascade: canonical indices of the slices whose stored-order detector probability is >= the threshold."""
    if det_probs is None:
        return None
    stored = np.flatnonzero(det_probs >= outputs.detector_threshold)
    return np.sort(reo.canonical_slices(stored))


def _case_lesions(case: InputCase, mask: np.ndarray, native: np.ndarray, geometry: Geometry, stored: np.ndarray,
                  bones: np.ndarray | None, outputs: Outputs,
                  part: dict[str, Any]) -> tuple[np.ndarray | None, list[Any]]:
    """The case's lesion and patient rows into ``part`` (``score`` from the stored map, 1/255
    steps); returns the lesion labels (or None) and each lesion's largest cross-section (the
    report draws it)."""
    if not outputs.lesions:
        return None, []
    from analysis.lesions import lesion_instances
    from analysis.prediction.tables import lesion_rows, lesion_sections, patient_row

    labels = lesion_instances(mask)
    sections = lesion_sections(labels, geometry)
    rows = lesion_rows(case.case_id, mask, native, geometry, probability=stored, bones=bones, labels=labels,
                       sections=sections, probability_scale=1.0 / LEVELS)  # float64: level 255 scores 1.0 exactly
    part["lesion_rows"] = rows
    part["patient"] = patient_row(case.case_id, rows, has_bones=bones is not None)
    part["lesions"] = len(rows)
    return labels[0], sections


def _case_figures(case: InputCase, mask: np.ndarray, native: np.ndarray, geometry: Geometry,
                  labels: np.ndarray | None, sections: list[Any], outputs: Outputs, staging: Path, part: dict[str, Any],
                  net: Network) -> None:
    if outputs.preview:
        from analysis.prediction.preview import write_preview

        write_preview(staging / PREVIEW / f"{case.case_id}.png", native, mask, geometry, labels,
                      title=f"{case.case_id}: {net.name}, {part.get('lesions', int(mask.any()))} lesion(s)")
    if (outputs.dicom_seg or outputs.sr) and case.series is not None:
        from analysis.imaging.dicom_seg import write_dicom_seg

        # results carry UIDs derived from the source series and the model: a resend replaces
        seed = f"{case.series.series_uid}|{net.fingerprint}"
        seg = write_dicom_seg(mask, case.series, staging / DICOM_SEG / f"{case.case_id}.dcm", model_name=net.name,
                              model_version=net.fingerprint, labels=labels, uid_seed=seed)
        part["dicom_seg"] = seg
        if outputs.sr:
            from analysis.imaging.dicom_sr import write_measurement_report

            part["sr"] = write_measurement_report(case.series, staging / SR / f"{case.case_id}.dcm",
                                                  lesions=part.get("lesion_rows", []), seg_path=seg["path"],
                                                  anchors={i + 1: c for i, c in enumerate(sections)},
                                                  model_name=net.name, model_version=net.fingerprint, uid_seed=seed)


def run_cases(folder: PredictionFolder, cases: Sequence[InputCase], net: Network, outputs: Outputs, *,
              strict: bool) -> tuple[list[dict[str, Any]], list[str], float]:
    """Predict every case of ``cases`` not yet finished in ``folder``, each case atomically.

    Args:
        strict: a failing case stops the run (cohort input, checked up front); otherwise the
            case is reported, skipped and the others are done.

    Returns:
        ``(done, failures, network_seconds)``: the part records of the cases predicted by this
        run, one line per failed case (naming its file), and the seconds spent in the networks.
    """
    from tqdm import tqdm

    done, failures, seconds = [], [], 0.0
    todo = folder.prepare([c.case_id for c in cases])
    by_id = {c.case_id: c for c in cases}
    for i, case_id in enumerate(tqdm(todo, desc="predict", unit="case", file=sys.stderr, disable=None), 1):
        case = by_id[case_id]
        try:
            with folder.case(case_id) as (staging, part):
                predict_case(case, net, outputs, staging, part)
        except InputError as exc:
            if strict:
                raise
            failures.append(str(exc))
            log.error("%s: skipped (%s)", case_id, exc)
            continue
        done.append(part)
        seconds += part.get("seconds_network", 0.0)
        log.info("predict: %s done (%d/%d, %d slices, %.1f s)", case_id, i, len(todo), part["slices"], part["seconds"])
    return done, failures, seconds


def lesion_tables() -> list[tuple[str, Callable[[dict], str]]]:
    """Builders of the merged ``lesions.csv`` and ``patients.csv`` (for :meth:`PredictionFolder.finish`)."""
    from analysis.prediction.tables import LESION_COLUMNS, LESIONS_CSV, PATIENT_COLUMNS, PATIENTS_CSV, csv_text

    def lesions(parts: dict[str, dict[str, Any]]) -> str:
        return csv_text(LESION_COLUMNS, (r for c in sorted(parts) for r in parts[c].get("lesion_rows", [])))

    def patients(parts: dict[str, dict[str, Any]]) -> str:
        return csv_text(PATIENT_COLUMNS, (parts[c]["patient"] for c in sorted(parts) if "patient" in parts[c]))

    return [(LESIONS_CSV, lesions), (PATIENTS_CSV, patients)]
