"""Running a model over cases, framework-neutral: what ``predict`` and ``nnunet predict`` share.

Both wings give this module only their network, as a callable on the *canonical* view of a
CT (:mod:`analysis.imaging.orientation`: LPS, ``arr[k]`` an axial slice, rows anterior to posterior,
columns the patient's right to left); everything around it is done here, once:

1. each case is read (a cohort image, an image file, or a DICOM series,
   :mod:`analysis.imaging.inputs`) and reoriented to the canonical view (a numpy view, no copy);
2. optionally cropped to the body (:mod:`analysis.imaging.body`): per slab of :data:`SLAB` slices,
   the in-plane box of the largest region above -500 HU with a 10 mm margin, padded to the
   network's stride; the network sees the whole volume cropped in-plane to that box, for the
   slab's centre slices, so context slices stay intact. Outside the box the probability is 0;
3. the probabilities go back to the input's exact storage order and geometry; the mask is
   ``probability >= threshold``, then 3D components smaller than ``min_size`` are removed;
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
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from analysis.errors import DataProblems, InputError
from analysis.imaging.inputs import InputCase, discover_inputs, read_input
from analysis.imaging.io import Geometry, read_header
from analysis.imaging.orientation import CANONICAL, Reorientation
from analysis.prediction.folder import (
    DICOM_SEG,
    PREVIEW,
    PROBABILITIES,
    SR,
    PredictionFolder,
    check_ct,
    mask_path,
    remove_small_components,
    select_cases,
)
from analysis.prediction.probabilities import SLOPE, quantise, write_stored
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
        stride: crop boxes are padded to a multiple of this (the network's downsampling).
        crop: crop to the body before the network (``--no-crop`` turns it off).
    """

    name: str
    fingerprint: str
    segment: SegmentFn | None = None
    detect: DetectFn | None = None
    stride: int = 1
    crop: bool = True


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
    bones_from: str = "project"


@dataclass(frozen=True)
class InputPlan:
    """The cases of one run, checked before any network work.

    Attributes:
        source: the cohort folder or ``--images`` PATH (resolved).
        cases: the cases to predict (this shard's).
        shapes: ``(slices, rows, cols)`` of each case, from headers.
        failures: one line per ``--images`` input that failed its cheap checks (skipped).
        strict: cohort input: a bad case stops the run (all are checked up front).
    """

    source: str
    cases: list[InputCase]
    shapes: dict[str, tuple[int, int, int]]
    failures: list[str]
    strict: bool

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
    if dataset is not None:
        cohort = Cohort(dataset)
        cohort.require_exists()
        found = [InputCase(case_id=c, kind="image", path=cohort.image_path(c))
                 for c in select_cases(cohort, cases, shard)]
        for case in found:
            shapes[case.case_id] = tuple(check_ct(case.path).shape)
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
                shapes[case.case_id] = _input_shape(case)
            except InputError as exc:
                failures.append(str(exc))
                continue
            found.append(case)
        if not found:
            raise DataProblems(failures or [f"{source}: no case to predict"])
    if dicom_seg and not any(c.kind == "dicom" for c in found):
        raise InputError(f"--dicom-seg: {source} holds no DICOM series; a DICOM Segmentation references its "
                         f"source images (NIfTI input has none)")
    return InputPlan(source=source, cases=found, shapes=shapes, failures=failures, strict=dataset is not None)


def _input_shape(case: InputCase) -> tuple[int, int, int]:
    if case.series is not None:
        return (case.series.n_slices, case.series.rows, case.series.columns)
    geometry = read_header(case.path, ndim=None)
    if len(geometry.size) != 3:
        raise InputError(f"{case.path}: is a {len(geometry.size)}D image, expected a 3D CT")
    return tuple(geometry.shape)


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


def crop_boxes(ct: np.ndarray, spacing_zyx: Sequence[float], stride: int) -> list[tuple[slice, slice, slice]]:
    """Per-slab ``(slices, rows, cols)`` boxes of the body in a canonical volume (:mod:`analysis.imaging.body`)."""
    from analysis.imaging.body import slab_boxes

    return slab_boxes(ct, SLAB, margin_mm=BODY_MARGIN_MM, spacing_xy=(spacing_zyx[2], spacing_zyx[1]), stride=stride)


def segment_canonical(net: Network, ct: np.ndarray, spacing_zyx: Sequence[float],
                      slices: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Lesion probabilities of a canonical volume, cropped to the body unless ``net.crop`` is off.

    Args:
        ct: canonical HU ``(slices, rows, cols)``.
        slices: centre slices to segment (None: all); the others stay 0.

    Returns:
        ``(probabilities, seen, info)``: float32 of ``ct``'s shape (0 where the network did not
        look), the voxels the network looked at (bool, same shape), and the fraction of slice
        pixels it saw (``pixel_fraction``) and the number of crop boxes.
    """
    prob = np.zeros(ct.shape, np.float32)
    seen = np.zeros(ct.shape, bool)
    todo = np.arange(ct.shape[0]) if slices is None else np.asarray(sorted(slices), np.int64)
    if todo.size == 0:
        return prob, seen, {"pixel_fraction": 0.0, "boxes": 0}
    if not net.crop:
        prob[todo] = net.segment(ct, todo, spacing_zyx)
        seen[todo] = True
        return prob, seen, {"pixel_fraction": 1.0, "boxes": 1}
    boxes = crop_boxes(ct, spacing_zyx, net.stride)
    for zs, rows, cols in boxes:
        z = todo[(todo >= zs.start) & (todo < zs.stop)]
        if z.size == 0:
            continue
        prob[z, rows, cols] = net.segment(ct[:, rows, cols], z, spacing_zyx)
        seen[z, rows, cols] = True
    return prob, seen, {"pixel_fraction": round(float(seen[todo].mean()), 4), "boxes": len(boxes)}


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
        InputError: the case cannot be read, holds non-finite HU, or is not stored with
            axial slices along axis 0 (detectors only), or its bone map is missing/unlike it.
    """
    t0 = time.perf_counter()
    import SimpleITK as sitk

    from analysis.imaging.io import count_nonfinite, nonfinite_error, require_finite, write_mask

    image, record = read_input(case)
    geometry = Geometry.of(image)
    if len(geometry.size) != 3:
        raise InputError(f"{case.describe()}: is a {len(geometry.size)}D image, expected a 3D CT")
    native = sitk.GetArrayFromImage(image)  # its stored type: the networks cast each batch (memory)
    del image
    require_finite(native, case.describe())
    if case.kind == "image" and np.issubdtype(native.dtype, np.floating):
        bad = count_nonfinite(case.path)  # ITK reads NaN in NIfTI as 0: ask nibabel
        if bad:
            raise nonfinite_error(case.path, bad)
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
        det_c = np.asarray(net.detect(np.ascontiguousarray(ct)), np.float32)
        det_probs = det_c[reo.canonical_slices(np.arange(det_c.size))]  # stored slice s: canonical one's value
        part["slice_probabilities"] = [float(p) for p in det_probs]
    if net.segment is None:
        part["seconds_network"] = round(time.perf_counter() - t_net, 3)
        part["seconds"] = round(time.perf_counter() - t0, 3)
        return
    chosen = det_c_chosen(det_probs, outputs, reo)
    prob_c, seen, crop = segment_canonical(net, ct, spacing_zyx, chosen)
    part["seconds_network"] = round(time.perf_counter() - t_net, 3)
    raw = reo.backward(seen & (prob_c >= outputs.threshold))  # never lesion where the network did not look
    del seen
    # the map as stored (uint8, 1/255; analysis.prediction.probabilities), cut to reproduce ``raw`` exactly:
    # a quarter of the float map's memory from here on
    stored = quantise(reo.backward(prob_c), outputs.threshold, above=raw)
    del prob_c
    mask = remove_small_components(raw, outputs.min_size)
    segmented = int(native.shape[0] if chosen is None else len(chosen))
    part.update(segmented=segmented, skipped=int(native.shape[0]) - segmented, crop=crop,
                lesion_voxels=int(mask.sum()))
    write_mask(mask, geometry, mask_path(staging, case.case_id))
    labels = _case_lesions(case, mask, native, geometry, stored, bones, outputs, part)
    if outputs.probabilities:
        write_stored(stored, geometry, staging / PROBABILITIES / f"{case.case_id}.nii.gz")
    del stored
    _case_figures(case, mask, native, geometry, labels, outputs, staging, part, net)
    part["seconds"] = round(time.perf_counter() - t0, 3)


def det_c_chosen(det_probs: np.ndarray | None, outputs: Outputs, reo: Reorientation) -> np.ndarray | None:
    """Cascade: canonical indices of the slices whose stored-order detector probability is >= the threshold."""
    if det_probs is None:
        return None
    stored = np.flatnonzero(det_probs >= outputs.detector_threshold)
    return np.sort(reo.canonical_slices(stored))


def _case_lesions(case: InputCase, mask: np.ndarray, native: np.ndarray, geometry: Geometry, stored: np.ndarray,
                  bones: np.ndarray | None, outputs: Outputs, part: dict[str, Any]) -> np.ndarray | None:
    """The case's lesion and patient rows into ``part`` (``score`` from the stored map, 1/255
    steps); returns the lesion labels (or None)."""
    if not outputs.lesions:
        return None
    from analysis.lesions import lesion_instances
    from analysis.prediction.tables import lesion_rows, patient_row

    labels = lesion_instances(mask)
    rows = lesion_rows(case.case_id, mask, native, geometry, probability=stored, bones=bones, labels=labels,
                       probability_scale=float(SLOPE))
    part["lesion_rows"] = rows
    part["patient"] = patient_row(case.case_id, rows, has_bones=bones is not None)
    part["lesions"] = len(rows)
    return labels[0]


def _case_figures(case: InputCase, mask: np.ndarray, native: np.ndarray, geometry: Geometry,
                  labels: np.ndarray | None, outputs: Outputs, staging: Path, part: dict[str, Any],
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
