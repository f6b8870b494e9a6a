"""Training losses and the validation Dice metric, Keras-serializable under ``bonemets``.

Tensors: ``y_true``/``y_pred`` are ``(batch, 1)`` for detectors and
``(batch, rows, cols, 1)`` for segmenters, probabilities in [0, 1].
"""
from __future__ import annotations

from typing import Any

import keras
from keras import ops

from bonemets_tf.layers import PACKAGE

EPS = 1e-7


@keras.saving.register_keras_serializable(package=PACKAGE)
class DiceBCELoss(keras.losses.Loss):
    """Soft Dice loss plus binary cross-entropy, the usual segmentation loss.

    ``loss = BCE + 1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` per sample, summed over
    pixels; ``s`` (smooth) keeps the Dice term defined for empty masks (empty reference
    and empty prediction give Dice 1, loss term 0).

    Args:
        smooth: additive smoothing of the soft Dice, in pixels.
    """

    def __init__(self, smooth: float = 1.0, name: str = "dice_bce", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.smooth = float(smooth)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.clip(ops.cast(y_pred, "float32"), EPS, 1.0 - EPS)
        axes = tuple(range(1, len(y_pred.shape)))
        bce = -ops.mean(y_true * ops.log(y_pred) + (1.0 - y_true) * ops.log(1.0 - y_pred), axis=axes)
        inter = ops.sum(y_true * y_pred, axis=axes)
        dice = (2.0 * inter + self.smooth) / (ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes) + self.smooth)
        return bce + 1.0 - dice

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "smooth": self.smooth}


@keras.saving.register_keras_serializable(package=PACKAGE)
class WeightedBCELoss(keras.losses.Loss):
    """Binary cross-entropy with positive samples weighted by ``pos_weight``.

    ``loss = -(w t log p + (1 - t) log(1 - p))``. Training sets ``w = (1 - f) / f`` for a
    sampled positive fraction ``f``, so both classes contribute equally.

    Args:
        pos_weight: weight of the positive class (> 0).
    """

    def __init__(self, pos_weight: float = 1.0, name: str = "weighted_bce", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.pos_weight = float(pos_weight)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.clip(ops.cast(y_pred, "float32"), EPS, 1.0 - EPS)
        loss = -(self.pos_weight * y_true * ops.log(y_pred) + (1.0 - y_true) * ops.log(1.0 - y_pred))
        return ops.mean(loss, axis=tuple(range(1, len(y_pred.shape))))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "pos_weight": self.pos_weight}


@keras.saving.register_keras_serializable(package=PACKAGE)
class DiceScore(keras.metrics.Metric):
    """Dice of thresholded predictions pooled over every pixel seen (e.g. a validation epoch).

    ``2 |P and T| / (|P| + |T|)`` with ``P = y_pred >= threshold``. Empty reference and
    empty prediction: 1.0 (perfect agreement); one empty, the other not: 0.0.

    Args:
        threshold: probability threshold.
    """

    def __init__(self, threshold: float = 0.5, name: str = "dice", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.threshold = float(threshold)
        self.intersection = self.add_variable(shape=(), initializer="zeros", name="intersection")
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        t = ops.cast(ops.cast(y_true, "float32") > 0.5, "float32")
        p = ops.cast(ops.cast(y_pred, "float32") >= self.threshold, "float32")
        self.intersection.assign_add(ops.sum(t * p))
        self.total.assign_add(ops.sum(t) + ops.sum(p))

    def result(self):
        return ops.where(self.total > 0, 2.0 * self.intersection / ops.maximum(self.total, 1.0), 1.0)

    def reset_state(self):
        self.intersection.assign(0.0)
        self.total.assign(0.0)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "threshold": self.threshold}
