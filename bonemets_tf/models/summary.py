"""Table of registered models with their parameter counts (``python cli.py models``)."""
from __future__ import annotations

from typing import Any

from bonemets_tf.models.registry import REGISTRY, build_model


def model_table() -> list[dict[str, Any]]:
    """One row per registered model: name, task, params (built at full width, 1 channel,
    image size 256), paper_params, stride, scalable, description."""
    import keras

    rows = []
    for name, spec in REGISTRY.items():
        model = build_model(name)
        rows.append({"name": name, "task": spec.task, "params": int(model.count_params()),
                     "paper_params": spec.paper_params, "stride": spec.stride,
                     "scalable": spec.entry.scalable, "description": spec.entry.description})
        del model
        keras.backend.clear_session()
    return rows
