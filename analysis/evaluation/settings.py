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
  slices give the same masks, an approximate one does not.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from analysis.prediction.folder import read_record

__all__ = ["MODEL_COLUMNS", "model_rows", "differences"]

#: Columns of ``models.csv``.
MODEL_COLUMNS = ("model", "task", "framework", "crop", "crop_mode", "crop_context_px", "crop_max_abs_diff",
                 "crop_min_dice", "mirroring", "mirror_passes", "precision", "threshold", "threshold_source",
                 "folds", "tile_step", "min_size_voxels", "network", "fingerprint")


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
        ))
    return rows


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
    approximate = sorted(r[0] for r in chosen if r[4] == "approximate")
    if approximate:
        lines.append(f"an approximate crop (masks differ from whole slices near its edges) was used for "
                     f"{', '.join(approximate)}")
    return lines
