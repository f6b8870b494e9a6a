"""One prediction request for both wings: what ``predict`` (Keras) and ``nnunet predict``
(nnU-Net) share, declared, checked, run and recorded once.

A wing builds a :class:`PredictRequest` from its command line (the shared click options are
one decorator in ``cli.py``) or from a study stage, adds only what is its own (Keras: the
RUN or SavedModel, ``--threshold auto``, the cascade, precision, the memory check; nnU-Net:
folds, device, mirroring, the predictor) and hands both to :func:`predict_folder`, which:

1. checks the request and plans the inputs (:func:`analysis.prediction.runner.plan_inputs`:
   a cohort's ``--cases`` or new patients' ``--images``, the shard, the DICOM series);
2. opens the PRED folder (:class:`analysis.prediction.folder.PredictionFolder`) with the
   settings that decide its content (the wing's model settings plus the request's);
3. opens the wing's network only then (heavy imports after the cheap checks) and runs the
   cases (:func:`analysis.prediction.runner.run_cases`);
4. writes ``predict.json`` with the common record (inputs, shard, cases, failures,
   orientation, output options, timing, versions) merged with the wing's own.

The same shape as TotalSegmentator's ``python_api``, which mirrors its command line one to one.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

from analysis.cohort.bone_maps import BONE_MAP_KINDS, PROJECT
from analysis.errors import DataProblems, InputError
from analysis.imaging.orientation import CANONICAL
from analysis.prediction.folder import PredictionFolder
from analysis.prediction.runner import InputPlan, Network, Outputs, lesion_tables, plan_inputs, run_cases
from analysis.prediction.shards import Shard, check_shard, parse_shard
from analysis.imaging.records import versions

log = logging.getLogger(__name__)

__all__ = ["CONNECTIVITY", "PredictRequest", "WingRun", "PredictResult", "plan_request", "predict_folder",
           "raise_failures", "training_budget"]

#: Connectivity of the 3D lesions (``--min-size``, lesion tables).
CONNECTIVITY = 26


@dataclass(frozen=True)
class PredictRequest:
    """What both wings' prediction commands share (``predict`` and ``nnunet predict``).

    Attributes:
        cases: ``test``, ``all``, ``train`` or ``ID,ID,...`` (cohort input; see
            :meth:`analysis.cohort.layout.Cohort.select`).
        shard: ``(i, n)``: only ``sorted(cases)[i::n]`` (0-based), so n processes fill one folder.
        series: SeriesInstanceUID to use among a folder's DICOM series.
        probabilities: also write ``probabilities/<case>.nii.gz`` (uint8, scale 1/255).
        dicom_seg: also write ``dicom_seg/<case>.dcm`` for DICOM input.
        sr: also write ``sr/<case>.dcm`` for DICOM input, a TID 1500 measurement report of the
            lesions (:mod:`analysis.imaging.dicom_sr`), with the SEG it references.
        preview: write ``preview/<case>.png``.
        crop: run the segmenter on the body's bounding box (per slab) instead of whole slices.
            Off by default in both wings: whole slices give the exact result; the crop is a
            shortcut whose masks differ near the box's edge (BENCHMARKS.md, "New patients").
        bones: folder of bone maps ``<case>.nii.gz`` for the lesion table's bone columns.
        bones_from: what the bone maps hold, one of :data:`analysis.cohort.bone_maps.BONE_MAP_KINDS`:
            ``project`` (the cohort's bone codes) or ``totalsegmentator`` ("total" ids).
        min_size: remove 3D lesions (26-connected) smaller than this many voxels; 0 keeps all.
        overwrite: replace a folder written with other settings, or redo finished cases.
        ct_check: refuse a case that does not look like CT in HU
            (:func:`analysis.imaging.hounsfield.require_ct`); False (``--no-ct-check``) for genuine
            CT without air, such as a tightly cropped volume.
    """

    cases: str = "test"
    shard: Shard | None = None
    series: str | None = None
    probabilities: bool = False
    dicom_seg: bool = False
    sr: bool = False
    preview: bool = True
    crop: bool = False
    bones: str | None = None
    bones_from: str = PROJECT
    min_size: int = 0
    overwrite: bool = False
    ct_check: bool = True

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "PredictRequest":
        """The request from a mapping that may hold other (wing) keys too; ``shard`` may be ``"I/N"``.

        >>> PredictRequest.from_options({"cases": "all", "shard": "1/4", "folds": [0]}).shard
        (1, 4)
        """
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in options.items() if k in names}
        if isinstance(values.get("shard"), str):
            values["shard"] = parse_shard(values["shard"])
        elif values.get("shard") is not None:
            values["shard"] = tuple(values["shard"])
        return cls(**values)

    def check(self) -> None:
        """Raise :class:`InputError` (one line, naming the option) for an out-of-range value."""
        if self.min_size < 0:
            raise InputError(f"--min-size {self.min_size}: expected >= 0 voxels (0 disables it)")
        if self.shard is not None:
            check_shard(self.shard)
        if self.bones_from not in BONE_MAP_KINDS:
            raise InputError(f"--bones-from {self.bones_from}: expected one of {', '.join(BONE_MAP_KINDS)}")
        if self.bones is not None and not Path(self.bones).is_dir():
            raise InputError(f"--bones {self.bones}: not a folder; expected DIR/<case>.nii.gz bone maps")

    def settings(self, *, segment: bool = True) -> dict[str, Any]:
        """The request's part of the settings that decide a PRED folder's content (compared on a rerun:
        not the cases, the shard or ``overwrite``)."""
        if not segment:
            return {"series": self.series}
        return {"min_size_voxels": self.min_size,
                **{k: getattr(self, k) for k in ("probabilities", "dicom_seg", "preview", "crop", "series", "bones",
                                                 "bones_from")},
                **({"sr": True} if self.sr else {})}

    def outputs(self, *, threshold: float, detector_threshold: float = 0.5) -> Outputs:
        """What the runner writes per case besides the mask."""
        return Outputs(threshold=float(threshold), min_size=self.min_size, detector_threshold=detector_threshold,
                       probabilities=self.probabilities, dicom_seg=self.dicom_seg, sr=self.sr, preview=self.preview,
                       lesions=True, bones=None if self.bones is None else Path(self.bones), bones_from=self.bones_from,
                       ct_check=self.ct_check)

    def to_json(self) -> dict[str, Any]:
        """The request as JSON (``predict.json["request"]``)."""
        return {**asdict(self), "shard": None if self.shard is None else list(self.shard)}


@dataclass(frozen=True)
class WingRun:
    """What a wing adds to a request.

    Attributes:
        mode: ``segment``, ``detect`` or ``cascade``.
        settings: the wing's settings that decide the folder's content (model, thresholds,
            folds, mirroring, precision, ...); merged with the request's.
        network: ``network(inputs)``: a context manager giving the wing's
            :class:`~analysis.prediction.runner.Network`, opened after every cheap check
            (``inputs`` gives the cases and their shapes, for a memory check).
        outputs: per-case outputs (threshold, min size, ...): usually
            :meth:`PredictRequest.outputs`.
        record: ``record()``: the wing's own fields of ``predict.json`` (model, training,
            thresholds and their source, folds, device, precision, ...), called after the run.
        inference: ``inference()``: the wing's inference settings for ``predict.json["inference"]``
            (``precision``, ``threshold``, ``threshold_source``, ``mirroring``, ``folds``,
            ``tile_step``), beside the crop and min size the request and the network give.
        versions: the wing's distributions for ``predict.json["versions"]``.
        slices_name: ``slices.csv`` (detector) or ``detector_slices.csv`` (cascade); None: none.
        summary: ``summary(parts)``: fields over every finished case added to the record.
    """

    mode: str
    settings: dict[str, Any]
    network: Callable[[InputPlan], ContextManager[Network]]
    outputs: Outputs
    record: Callable[[], dict[str, Any]]
    inference: Callable[[], dict[str, Any]] = dict
    versions: tuple[str, ...] = ()
    slices_name: str | None = None
    summary: Callable[[dict[str, dict[str, Any]]], dict[str, Any]] | None = None

    @property
    def segments(self) -> bool:
        return self.mode != "detect"


def training_budget(*, width: float | None, steps: int | None, batch_size: int | None,
                    patch: tuple[int, ...] | list[int] | None, plan: str | None = None,
                    spacing_xy: Sequence[float] | None = None) -> dict[str, Any]:
    """What a model was trained with, for ``predict.json["budget"]`` (both wings write one; ``analyze``
    puts it in ``models.csv`` and says above its segmentation table whether the rows are comparable).

    Args:
        width: feature-width multiplier (1: the published width).
        steps: training steps (iterations) over the whole run.
        batch_size: samples per step.
        patch: the training crop or patch, ``(rows, cols)`` voxels.
        plan: nnU-Net's plans identifier (None for the Keras wing).
        spacing_xy: the in-plane pixel spacing ``(x, y)`` mm the model was trained at, which
            prediction resamples each slice to (the Keras RUN's ``config.json["spacing"]``,
            nnU-Net's plan's ``spacing``); None when unknown.

    Returns:
        ``{"width", "steps", "batch_size", "samples", "patch", "plan", "spacing_xy_mm"}``; ``samples``
        is ``steps * batch_size`` (None when either is unknown).

    >>> training_budget(width=0.25, steps=240, batch_size=16, patch=(64, 64))["samples"]
    3840
    """
    samples = None if steps is None or batch_size is None else int(steps) * int(batch_size)
    return {"width": None if width is None else float(width), "steps": None if steps is None else int(steps),
            "batch_size": None if batch_size is None else int(batch_size), "samples": samples,
            "patch": None if patch is None else [int(p) for p in patch], "plan": plan,
            "spacing_xy_mm": None if spacing_xy is None else [float(v) for v in spacing_xy]}


@dataclass(frozen=True)
class PredictResult:
    """What :func:`predict_folder` did.

    Attributes:
        out: the PRED folder.
        record: the ``predict.json`` record written.
        done: the part records of the cases this run predicted.
        failures: one line per case that could not be predicted (``--images``).
    """

    out: Path
    record: dict[str, Any]
    done: list[dict[str, Any]]
    failures: list[str]


def plan_request(request: PredictRequest, dataset: str | os.PathLike | None,
                 images: str | os.PathLike | None) -> InputPlan:
    """Check ``request`` and plan its inputs (no output is written).

    Raises:
        InputError: a bad option, neither or both of ``dataset``/``images``, bad cohort cases.
        DataProblems: every ``--images`` input failed its cheap checks.
    """
    request.check()
    return plan_inputs(dataset, images, cases=request.cases, shard=request.shard, series=request.series,
                       dicom_seg=request.dicom_seg or request.sr)


def predict_folder(request: PredictRequest, wing: WingRun, out: str | os.PathLike, *,
                   inputs: InputPlan) -> PredictResult:
    """Run a wing's network over the planned inputs into the PRED folder ``out`` and write its record.

    Args:
        request: the shared options (checked by :func:`plan_request`).
        wing: the wing's model, network and record.
        out: ``PRED/NAME``.
        inputs: from :func:`plan_request`.

    Returns:
        The folder, the record written, the cases done and the failures. The caller raises
        :class:`DataProblems` for the failures (:func:`raise_failures`) after its own logging.

    Raises:
        InputError: ``out`` written with other settings (without ``overwrite``), a bad case of
            a cohort (cohorts stop at the first bad case).
    """
    settings = {"mode": wing.mode, **wing.settings, "input": inputs.source, "orientation": CANONICAL,
                **request.settings(segment=wing.segments)}
    folder = PredictionFolder(out, settings, overwrite=request.overwrite)
    t0 = time.perf_counter()
    with wing.network(inputs) as net:
        done, failures, seconds = run_cases(folder, inputs.cases, net, wing.outputs, strict=inputs.strict)
    inference = {**_inference(request, net), **wing.inference()} if wing.segments else wing.inference()
    failures = inputs.failures + failures
    slices = sum((p["slices"] if net.detect is not None else 0)
                 + (p.get("segmented", 0) if net.segment is not None else 0) for p in done)
    timing = {"seconds_network": round(seconds, 3), "network_slices": slices,
              "slices_per_s": round(slices / seconds, 3) if seconds > 0 else None,
              "seconds_total": round(time.perf_counter() - t0, 3)}
    record = {"mode": wing.mode, **wing.record(), **_common_record(request, inputs, wing, done, failures),
              "inference": inference, "timing": timing, "versions": versions(*wing.versions, "numpy")}

    def summary(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {**(wing.summary(parts) if wing.summary else {}),
                **({"removed_in_air": removed_in_air(parts)} if wing.segments else {}),
                **({"crop_agreement": crop_agreement(parts)} if wing.segments and request.crop else {})}

    written = folder.finish(record, slices_name=wing.slices_name,
                            tables=lesion_tables() if wing.segments else (), summary=summary)
    log.info("predict: %d case(s) in %.1f s (%d slices through the networks in %.1f s); wrote %s", len(done),
             timing["seconds_total"], slices, seconds, folder.out)
    return PredictResult(out=folder.out, record=written, done=done, failures=failures)


def _common_record(request: PredictRequest, inputs: InputPlan, wing: WingRun, done: list[dict[str, Any]],
                   failures: list[str]) -> dict[str, Any]:
    segment = wing.segments
    return {
        **inputs.describe(request.cases),
        "shard": None if request.shard is None else {"index": request.shard[0], "count": request.shard[1]},
        "cases_run": [p["case"] for p in done],
        "failed": failures,
        "orientation": CANONICAL,
        "min_size_voxels": request.min_size if segment else None,
        "connectivity": CONNECTIVITY,
        "crop": request.crop if segment else None,
        "outputs": {k: getattr(request, k) for k in ("probabilities", "dicom_seg", "sr", "preview")} if segment else None,
        "bones": {"folder": request.bones, "kind": request.bones_from} if request.bones else None,
        "request": request.to_json(),
    }


def _inference(request: PredictRequest, net: Network) -> dict[str, Any]:
    """The request's and the network's part of ``predict.json["inference"]``."""
    return {"crop": request.crop, "crop_mode": net.crop_mode, "crop_context_px": net.context if net.crop else None,
            "mirroring": net.mirror, "mirror_passes": 4 if net.mirror else 1, "min_size_voxels": request.min_size}


def crop_agreement(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The crop's measured agreement with whole slices over every finished case: each case's check
    slice (:func:`analysis.prediction.runner.segment_canonical`), the largest probability
    difference and the smallest Dice of the two masks (None where both masks were empty).

    >>> crop_agreement({"a": {"crop": {"check": {"max_abs_diff": 0.002, "dice": 1.0}}},
    ...                 "b": {"crop": {"check": {"max_abs_diff": 0.0, "dice": None}}}})
    {'cases': 2, 'max_abs_diff': 0.002, 'min_dice': 1.0}
    """
    checks = [p["crop"]["check"] for p in parts.values() if isinstance(p.get("crop"), dict) and "check" in p["crop"]]
    dice = [c["dice"] for c in checks if c.get("dice") is not None]
    return {"cases": len(checks), "max_abs_diff": max((c["max_abs_diff"] for c in checks), default=None),
            "min_dice": min(dice, default=None)}


def removed_in_air(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The predicted components removed for lying in air or lung over every finished case
    (:func:`analysis.prediction.folder.remove_components_in_air`): how many, their ml, the rule.

    >>> removed_in_air({"a": {"removed_in_air": {"lesions": 2, "ml": 0.5}}, "b": {}})
    {'lesions': 2, 'ml': 0.5, 'cases': ['a'], 'rule': 'median HU below -500 (air or aerated lung)'}
    """
    from analysis.imaging.hounsfield import AIR_OR_LUNG_HU

    hits = {c: p["removed_in_air"] for c, p in sorted(parts.items()) if p.get("removed_in_air", {}).get("lesions")}
    return {"lesions": sum(int(h["lesions"]) for h in hits.values()),
            "ml": round(sum(float(h["ml"]) for h in hits.values()), 6), "cases": list(hits),
            "rule": f"median HU below {AIR_OR_LUNG_HU:.0f} (air or aerated lung)"}


def raise_failures(result: PredictResult) -> None:
    """Raise :class:`DataProblems` (one line per failed case) when some cases could not be predicted."""
    if result.failures:
        raise DataProblems(result.failures)
