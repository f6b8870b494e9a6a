"""Fine-tuning with lineage: ``train --init-from RUN`` starts from a RUN's weights and architecture.

A fine-tune inherits from its parent RUN everything its weights were shaped by:

* the architecture (:data:`INHERITED`: task, arch, width, context; for detectors also the
  in-model resize side ``image_size``). An option given explicitly with another value is
  refused in one line; not given, it is taken from the parent. A segmenter's
  ``image_size`` is only its training crop side (the network is fully convolutional), so a
  fine-tune may change it;
* the preprocessing, which is part of the model (the HU window layer,
  :mod:`bonemets_tf.layers`), so it comes with the weights;
* the in-plane pixel spacing the parent was trained at (``config.json["spacing"]``, when the
  parent records one): the child records the same, so ``predict`` resamples new CT to the
  grid the weights learnt on.

The child's ``config.json`` says where it comes from (:func:`lineage_record`): ``init_from``
(the parent RUN's folder, fingerprint, model name and dataset) and ``lineage`` (every
ancestor, oldest first, ending with the parent). Its model name (:func:`model_name`) shows the
lineage wherever a model is named (:attr:`bonemets_tf.run.RunInfo.name`): ``predict.json``,
the DICOM SEG/SR's algorithm name, the node's log, the ``analyze`` report's model table.
"""
from __future__ import annotations

import os
from typing import Any

from analysis.errors import InputError
from bonemets_tf.models.catalog import DETECT
from bonemets_tf.run import RunInfo, read_run

#: Settings a fine-tune takes from its parent; an explicit different value is refused.
INHERITED = ("task", "arch", "width", "context")


def parent_run(path: str | os.PathLike) -> RunInfo:
    """The parent RUN of ``--init-from`` (a RUN folder; a SavedModel has no weights to train).

    Raises:
        InputError: not a RUN folder written by ``train`` (:func:`bonemets_tf.run.read_run`).
    """
    return read_run(path, option="--init-from")


def inherited_settings(parent: RunInfo, given: dict[str, Any]) -> dict[str, Any]:
    """``given`` (the options set explicitly) completed with the parent's architecture.

    Args:
        parent: the ``--init-from`` RUN.
        given: training settings by :class:`~bonemets_tf.train.TrainConfig` field name, only
            those the user set (defaults left out).

    Returns:
        ``given`` plus :data:`INHERITED` (and a detector's ``image_size``) from the parent,
        and ``init_from`` set to the parent's folder.

    Raises:
        InputError: an explicit setting differs from the parent's, or ``weights`` is given too.
    """
    if given.get("weights") is not None:
        raise InputError("--init-from and --weights exclude each other (a fine-tune starts from its parent's weights)")
    settings = parent.config.get("settings", {})
    keys = INHERITED + (("image_size",) if parent.task == DETECT else ())
    out = dict(given)
    for key in keys:
        theirs = parent.task if key == "task" else settings.get(key)
        if key in given and given[key] is not None and given[key] != theirs:
            option = "--" + key.replace("_", "-")
            raise InputError(f"{option} {given[key]}: --init-from {parent.path} is a {parent.arch} with {key} "
                             f"{theirs}; a fine-tune keeps its parent's architecture (drop {option})")
        out[key] = theirs
    out.setdefault("image_size", settings.get("image_size"))
    out["init_from"] = str(parent.path)
    return out


def lineage_record(parent: RunInfo) -> dict[str, Any]:
    """The child's ``config.json`` entries ``init_from`` and ``lineage`` (module docstring)."""
    entry = {"run": str(parent.path), "fingerprint": parent.fingerprint(), "name": parent.name,
             "arch": parent.arch, "dataset": parent.config.get("settings", {}).get("dataset")}
    ancestors = parent.config.get("lineage")
    ancestors = [a for a in ancestors if isinstance(a, dict)] if isinstance(ancestors, list) else []
    record: dict[str, Any] = {"init_from": entry, "lineage": [*ancestors, entry]}
    spacing = parent.config.get("spacing")
    if isinstance(spacing, dict):
        record["spacing"] = {**spacing, "source": f"inherited from --init-from {parent.path} "
                                                  f"({spacing.get('source', 'recorded')})"}
    return record

