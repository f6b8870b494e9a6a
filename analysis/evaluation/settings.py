"""How each model was run: the inference settings of every PRED folder, side by side.

``analyze`` compares models on the same patients; two rows are like for like only when the
models were run alike. This module reads each model's ``predict.json`` (its ``inference``
block, written by :func:`analysis.prediction.request.predict_folder`; older records fall
back to their top-level keys) into ``models.csv`` and says which settings that change results
differ between the models compared:

* ``mirroring``: test-time mirroring averages 4 passes (nnU-Net's default; ``predict
  --mirror`` for Keras);
* the threshold: a fixed probability (``predict --threshold P``; nnU-Net's argmax of two
  classes is the fixed 0.5) or one calibrated on validation patients (``--threshold auto``);
* an approximate crop (nnU-Net ``--crop``): the exact crop of the Keras segmenters and whole
  slices give the same masks, an approximate one does not;
* the pixel spacing a model ran at: the one it was trained at (the Keras wing resamples each slice
  to its RUN's recorded spacing, nnU-Net's preprocessing to its plan's) or the input's own
  (``predict --no-resample``, or a RUN that records none).

It also reads what each model was trained with (``predict.json["budget"]``,
:func:`analysis.prediction.request.training_budget`: width, steps, batch, samples seen, crop or
patch, nnU-Net's plan, the pixel spacing trained at) and says in one sentence (:func:`budget_sentence`) whether the
segmenters compared were trained at a comparable budget.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from analysis.prediction.folder import read_record

__all__ = ["MODEL_COLUMNS", "model_rows", "differences", "budget_sentence", "SAMPLES_TOLERANCE"]

#: Columns of ``models.csv``.
MODEL_COLUMNS = ("model", "task", "framework", "crop", "crop_mode", "crop_context_px", "crop_max_abs_diff",
                 "crop_min_dice", "mirroring", "mirror_passes", "precision", "threshold", "threshold_source",
                 "folds", "tile_step", "min_size_voxels", "network", "fingerprint", "train_width", "train_steps",
                 "train_batch", "train_samples", "train_patch", "plan", "train_spacing_mm", "spacing_used")
#: Training budgets count as comparable when the samples seen differ by at most this fraction
#: of the largest (and width, crop/patch and training pixel spacing are equal).
SAMPLES_TOLERANCE = 0.1


def _framework(record: dict[str, Any]) -> str:
    model = record.get("model") or {}
    if model.get("framework"):
        return str(model["framework"])
    return "Keras" if record else ""


def model_rows(predictions: Path, models: Sequence[str], tasks: dict[str, str]) -> list[tuple]:
    """One ``models.csv`` row per model from ``PRED/<model>/predict.json`` (empty cells where a
    record is missing or older than the setting). ``network`` is the model's own name, which
    shows a fine-tune's lineage (``unet fine-tuned from 1a2b3c4d``: ``train --init-from``);
    ``fingerprint`` identifies its weights."""
    rows = []
    for model in models:
        record = read_record(predictions / model, missing_ok=True) or {}
        inf = record.get("inference") or {}
        agreement = record.get("crop_agreement") or {}
        folds = inf.get("folds", record.get("folds"))
        budget = record.get("budget") if isinstance(record.get("budget"), dict) else {}
        patch = budget.get("patch")
        rows.append((
            model, tasks.get(model, record.get("mode", "")), _framework(record),
            inf.get("crop", record.get("crop")), inf.get("crop_mode"), inf.get("crop_context_px"),
            agreement.get("max_abs_diff"), agreement.get("min_dice"),
            inf.get("mirroring", record.get("mirroring")), inf.get("mirror_passes"),
            inf.get("precision", record.get("precision")), inf.get("threshold", record.get("threshold")),
            inf.get("threshold_source", record.get("threshold_source")),
            None if folds is None else ";".join(str(f) for f in folds), inf.get("tile_step"),
            inf.get("min_size_voxels", record.get("min_size_voxels")),
            (record.get("model") or {}).get("name"), (record.get("model") or {}).get("fingerprint"),
            budget.get("width"), budget.get("steps"), budget.get("batch_size"), budget.get("samples"),
            None if not patch else "x".join(str(int(p)) for p in patch), budget.get("plan"),
            _spacing_text(budget.get("spacing_xy_mm")), _spacing_used(inf),
        ))
    return rows


def _spacing_text(xy: Any) -> str | None:
    """``"1x1"``: a training pixel spacing ``(x, y)`` mm as ``models.csv`` writes it (None: unknown)."""
    if not isinstance(xy, (list, tuple)) or len(xy) != 2:
        return None
    return "x".join(f"{float(v):.4g}" for v in xy)


def _spacing_used(inference: dict[str, Any]) -> str | None:
    """``"training"`` when the model ran resampled to the pixel spacing it was trained at,
    ``"input's own"`` when not, None for a record older than the setting."""
    used = ((inference.get("spacing") or {}).get("model") or {}).get("used")
    if not isinstance(used, str):
        return None
    return "training" if used.startswith("model's") else "input's own"


def _threshold_kind(row: tuple) -> str | None:
    threshold, source = row[11], row[12]
    if threshold is None and source is None:
        return None
    if isinstance(source, str) and source.startswith("auto"):
        return "calibrated on validation patients"
    return f"fixed {threshold:g}" if isinstance(threshold, (int, float)) else "fixed"


def differences(rows: Sequence[tuple], compared: Sequence[str]) -> list[str]:
    """One line per setting that changes results and differs among the ``compared`` models.

    >>> rows = [("unet", "segment", "Keras", False, None, None, None, None, False, 1, "float32", 0.5, "option",
    ...          None, None, 0),
    ...         ("nnunet", "segment", "nnU-Net v2", False, None, None, None, None, True, 4, "float32", 0.5,
    ...          "nnU-Net: argmax of the two classes", "0", 0.5, 0)]
    >>> differences(rows, ["unet", "nnunet"])
    ['mirroring differs: off for unet; on for nnunet']
    """
    chosen = [r for r in rows if r[0] in set(compared)]
    lines = []

    def say(what: str, values: dict[str, Any], show) -> None:
        known = {m: v for m, v in values.items() if v is not None}
        if len(set(known.values())) > 1:
            groups: dict[Any, list[str]] = {}
            for m, v in known.items():
                groups.setdefault(v, []).append(m)
            lines.append(f"{what} differs: " + "; ".join(f"{show(v)} for {', '.join(sorted(ms))}"
                                                        for v, ms in sorted(groups.items(), key=lambda kv: str(kv[0]))))

    say("mirroring", {r[0]: r[8] for r in chosen}, lambda v: "on" if v else "off")
    say("the threshold", {r[0]: _threshold_kind(r) for r in chosen}, str)
    say("the pixel spacing run at", {r[0]: _cell(r, 25) for r in chosen},
        lambda v: "each model's training spacing" if v == "training" else "each input's own")
    approximate = sorted(r[0] for r in chosen if r[4] == "approximate")
    if approximate:
        lines.append(f"an approximate crop (masks differ from whole slices near its edges) was used for "
                     f"{', '.join(approximate)}")
    return lines


def _budget_phrase(row: tuple) -> str:
    width, steps, batch, samples, patch, plan = row[18:24]
    if samples is None and width is None:
        return f"{row[0]}: training budget not recorded"
    unit = "patches" if plan else "crops"
    parts = [f"width {width:g}" if isinstance(width, (int, float)) else "width unknown"]
    if samples is not None:
        parts.append(f"{samples:,} samples seen ({steps:,} steps of {batch} {unit}"
                     + (f" of {patch.replace('x', chr(215))}" if patch else "") + ")")
    if plan:
        parts.append(f"plan {plan}")
    spacing = _cell(row, 24)
    if spacing:
        parts.append(f"trained at {spacing.replace('x', chr(215))} mm pixels")
    return f"{row[0]}: " + ", ".join(parts)


def _cell(row: tuple, i: int) -> Any:
    """``row[i]``, or None for a row shorter than the current columns."""
    return row[i] if len(row) > i else None


def budget_sentence(rows: Sequence[tuple], compared: Sequence[str]) -> str:
    """One sentence naming each compared model's width, samples seen, plan and training pixel
    spacing, and whether their training budgets are comparable: the same width, crop/patch and
    pixel spacing, and samples seen within :data:`SAMPLES_TOLERANCE` of the largest. Empty when
    no compared model is in ``rows``.

    >>> rows = [("unet",) + (None,) * 17 + (0.25, 240, 16, 3840, "64x64", None, "1x1", "training"),
    ...         ("nnunet",) + (None,) * 17 + (0.25, 240, 16, 3840, "64x64", "nnUNetPlans_w0.25_b16_p64x64", "1x1",
    ...                                      "training")]
    >>> print(budget_sentence(rows, ["unet", "nnunet"]))
    Training budgets: unet: width 0.25, 3,840 samples seen (240 steps of 16 crops of 64×64), trained at 1×1 mm pixels; nnunet: width 0.25, 3,840 samples seen (240 steps of 16 patches of 64×64), plan nnUNetPlans_w0.25_b16_p64x64, trained at 1×1 mm pixels. Comparable: the same width, crop, pixel spacing and samples seen.
    """
    chosen = [r for r in rows if r[0] in set(compared)]
    if not chosen:
        return ""
    text = "Training budgets: " + "; ".join(_budget_phrase(r) for r in chosen) + "."
    problems = []
    for what, i in (("width", 18), ("crop", 22), ("pixel spacing", 24)):
        values = {_cell(r, i) for r in chosen}
        if None in values or len(values) > 1:
            problems.append(f"{what} differs" if None not in values else f"{what} not recorded for every model")
    samples = [r[21] for r in chosen]
    if any(s is None for s in samples):
        problems.append("samples seen not recorded for every model")
    elif max(samples) > 0 and (max(samples) - min(samples)) / max(samples) > SAMPLES_TOLERANCE:
        low, high = min(chosen, key=lambda r: r[21]), max(chosen, key=lambda r: r[21])
        problems.append(f"samples seen differ ({high[0]} {high[21]:,} vs {low[0]} {low[21]:,})")
    if problems:
        return text + " **Not comparable budgets**: " + "; ".join(problems) + "."
    return text + " Comparable: the same width, crop, pixel spacing and samples seen."
