"""Training losses, metrics and the learning-rate schedule, Keras-serializable under ``bonemets``.

Tensors: ``y_true``/``y_pred`` are ``(batch, 1)`` for detectors and
``(batch, rows, cols, 1)`` for segmenters. ``y_pred`` holds probabilities in [0, 1], or
logits where a class says ``from_logits=True`` (what ``train`` uses since issue #16).

Why logits: on probabilities, cross-entropy must clip ``p`` to ``[EPS, 1 - EPS]``; once a
model's lesion logits fall below ``log(EPS) ~ -16`` the clipped BCE has zero gradient and
the soft Dice's gradient is scaled by ``sigmoid'(z) < EPS``, so a segmenter that predicts
nothing stays there for good. This is how the demo's ResUNet died on an AVX-512 CPU (seed 0:
training Dice 0.18, 0.49, then 0.000 for four epochs, loss flat at 0.50; reproduced in
BENCHMARKS.md "Training robustness"). On logits, ``d BCE / dz = sigmoid(z) - t`` stays -1 at
every missed lesion pixel (the usual stable form, ``max(z, 0) - z t + log(1 + exp(-|z|))``).
"""
from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from bonemets_tf.layers import PACKAGE

EPS = 1e-7


@keras.saving.register_keras_serializable(package=PACKAGE)
class DiceBCELoss(keras.losses.Loss):
    """Soft Dice loss plus binary cross-entropy, the usual segmentation loss.

    ``loss = BCE + 1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)``, sums over pixels; ``s``
    (smooth) keeps the Dice term defined for empty masks (empty reference and empty
    prediction give Dice 1, loss term 0).

    Per sample (``batch_dice=False``, the behaviour before issue #16), every crop without
    lesion scores Dice 1 for an empty prediction, so about two thirds of the demo's crops
    reward "predict nothing". With ``batch_dice=True`` the Dice sums run over the whole
    batch (nnU-Net's ``batch_dice``, Isensee et al., Nat. Methods 2021), so an empty
    prediction of a batch that holds lesion costs the full Dice term; the loss is then the
    same value for every sample of the batch.

    Args:
        smooth: additive smoothing of the soft Dice, in pixels.
        from_logits: ``y_pred`` holds logits (stable BCE, no clipping; see the module docstring).
        batch_dice: one soft Dice over the batch instead of one per sample.
    """

    def __init__(self, smooth: float = 1.0, from_logits: bool = False, batch_dice: bool = False,
                 name: str = "dice_bce", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.smooth = float(smooth)
        self.from_logits = bool(from_logits)
        self.batch_dice = bool(batch_dice)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        axes = tuple(range(1, len(y_pred.shape)))
        if self.from_logits:
            bce = ops.mean(ops.relu(y_pred) - y_pred * y_true + ops.log1p(ops.exp(-ops.abs(y_pred))), axis=axes)
            prob = ops.sigmoid(y_pred)
        else:
            prob = ops.clip(y_pred, EPS, 1.0 - EPS)
            bce = -ops.mean(y_true * ops.log(prob) + (1.0 - y_true) * ops.log(1.0 - prob), axis=axes)
        inter, sum_t, sum_p = (ops.sum(v, axis=axes) for v in (y_true * prob, y_true, prob))
        if self.batch_dice:
            inter, sum_t, sum_p = ops.sum(inter), ops.sum(sum_t), ops.sum(sum_p)
        dice = (2.0 * inter + self.smooth) / (sum_t + sum_p + self.smooth)
        return bce + 1.0 - dice

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "smooth": self.smooth, "from_logits": self.from_logits,
                "batch_dice": self.batch_dice}


@keras.saving.register_keras_serializable(package=PACKAGE)
class WeightedBCELoss(keras.losses.Loss):
    """Binary cross-entropy with positive samples weighted by ``pos_weight``.

    ``loss = -(w t log p + (1 - t) log(1 - p))``. Training sets ``w = (1 - f) / f`` for a
    sampled positive fraction ``f``, so both classes contribute equally.

    Args:
        pos_weight: weight of the positive class (> 0).
        from_logits: ``y_pred`` holds logits: ``w t softplus(-z) + (1 - t) softplus(z)``.
    """

    def __init__(self, pos_weight: float = 1.0, from_logits: bool = False, name: str = "weighted_bce",
                 **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.pos_weight = float(pos_weight)
        self.from_logits = bool(from_logits)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        if self.from_logits:
            loss = self.pos_weight * y_true * _softplus(-y_pred) + (1.0 - y_true) * _softplus(y_pred)
        else:
            y_pred = ops.clip(y_pred, EPS, 1.0 - EPS)
            loss = -(self.pos_weight * y_true * ops.log(y_pred) + (1.0 - y_true) * ops.log(1.0 - y_pred))
        return ops.mean(loss, axis=tuple(range(1, len(y_pred.shape))))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "pos_weight": self.pos_weight, "from_logits": self.from_logits}


def _softplus(x):
    """``log(1 + exp(x))`` without overflow."""
    return ops.relu(x) + ops.log1p(ops.exp(-ops.abs(x)))


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


@keras.saving.register_keras_serializable(package=PACKAGE)
class DiceScore(keras.metrics.Metric):
    """Dice of thresholded predictions pooled over every pixel seen (e.g. a validation epoch).

    ``2 |P and T| / (|P| + |T|)`` with ``P = y_pred >= threshold``. Empty reference and
    empty prediction: 1.0 (perfect agreement); one empty, the other not: 0.0.

    Args:
        threshold: probability threshold.
        from_logits: ``y_pred`` holds logits (compared with ``logit(threshold)``).
    """

    def __init__(self, threshold: float = 0.5, from_logits: bool = False, name: str = "dice", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.threshold = float(threshold)
        self.from_logits = bool(from_logits)
        self.intersection = self.add_variable(shape=(), initializer="zeros", name="intersection")
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        t = ops.cast(ops.cast(y_true, "float32") > 0.5, "float32")
        cut = _logit(self.threshold) if self.from_logits else self.threshold
        p = ops.cast(ops.cast(y_pred, "float32") >= cut, "float32")
        self.intersection.assign_add(ops.sum(t * p))
        self.total.assign_add(ops.sum(t) + ops.sum(p))

    def result(self):
        return ops.where(self.total > 0, 2.0 * self.intersection / ops.maximum(self.total, 1.0), 1.0)

    def reset_state(self):
        self.intersection.assign(0.0)
        self.total.assign(0.0)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "threshold": self.threshold, "from_logits": self.from_logits}


@keras.saving.register_keras_serializable(package=PACKAGE)
class PositiveFraction(keras.metrics.Metric):
    """Share of outputs at or above ``threshold`` (pixels for segmenters, slices for detectors).

    0 or 1 over a whole epoch of training batches means the model's calls are constant: it
    predicts nothing (or everything). The collapse guard of :mod:`bonemets_tf.train` reads it.

    Args:
        threshold: probability threshold.
        from_logits: ``y_pred`` holds logits.
    """

    def __init__(self, threshold: float = 0.5, from_logits: bool = False, name: str = "pos_frac",
                 **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.threshold = float(threshold)
        self.from_logits = bool(from_logits)
        self.positive = self.add_variable(shape=(), initializer="zeros", name="positive")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        cut = _logit(self.threshold) if self.from_logits else self.threshold
        p = ops.cast(ops.cast(y_pred, "float32") >= cut, "float32")
        self.positive.assign_add(ops.sum(p))
        self.count.assign_add(ops.cast(ops.size(p), "float32"))

    def result(self):
        return self.positive / ops.maximum(self.count, 1.0)

    def reset_state(self):
        self.positive.assign(0.0)
        self.count.assign(0.0)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "threshold": self.threshold, "from_logits": self.from_logits}


@keras.saving.register_keras_serializable(package=PACKAGE)
class RankAUC(keras.metrics.Metric):
    """Exact ROC AUC (Mann-Whitney, ties count one half) over every output seen, up to ``capacity``.

    Keras's ``AUC`` buckets scores at ``num_thresholds`` (200) fixed probabilities, so a
    detector whose outputs all lie within one bucket of 0.005 scores exactly 0.5 whatever
    their order. That is what a briefly trained EfficientNet-B0 does on the phantom (every
    validation probability near 0.3): its validation AUC read 0.500 in every epoch, so the
    first epoch was kept as the best and the collapse guard saw "constant output", while the
    rank AUC of the same outputs was above 0.6. This metric keeps the scores (logits or
    probabilities: the AUC is the same) and ranks them: mid-ranks via ``searchsorted``.
    Scores beyond ``capacity`` per epoch are ignored. One replica only (the buffer would be
    summed across replicas): ``train`` uses Keras's ``AUC`` under a multi-replica strategy.

    Args:
        capacity: most scores kept per epoch.
    """

    def __init__(self, capacity: int = 32768, name: str = "auc", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.capacity = int(capacity)
        # one spare slot at the end takes the scores beyond capacity (never read)
        self.scores = self.add_variable(shape=(self.capacity + 1,), initializer="zeros", name="scores")
        self.labels = self.add_variable(shape=(self.capacity + 1,), initializer="zeros", name="labels")
        self.n = self.add_variable(shape=(), initializer="zeros", name="n")

    def update_state(self, y_true, y_pred, sample_weight=None):
        s = ops.reshape(ops.cast(y_pred, "float32"), (-1,))
        t = ops.reshape(ops.cast(ops.cast(y_true, "float32") > 0.5, "float32"), (-1,))
        start = ops.cast(self.n, "int32")
        index = start + ops.arange(ops.shape(s)[0], dtype="int32")
        keep = index < self.capacity
        index = ops.reshape(ops.where(keep, index, self.capacity), (-1, 1))
        self.scores.assign(ops.scatter_update(self.scores, index, s))
        self.labels.assign(ops.scatter_update(self.labels, index, t))
        self.n.assign(ops.minimum(self.n + ops.cast(ops.shape(s)[0], "float32"), float(self.capacity)))

    def result(self):
        valid = ops.arange(self.capacity + 1, dtype="float32") < self.n
        big = ops.max(ops.abs(self.scores)) + 1.0
        s = ops.where(valid, self.scores, big)  # unused slots rank after every real score
        ordered = ops.sort(s)
        rank = (ops.cast(ops.searchsorted(ordered, s, side="left"), "float32")
                + ops.cast(ops.searchsorted(ordered, s, side="right"), "float32") + 1.0) / 2.0
        pos = ops.where(valid, self.labels, 0.0)
        n_pos = ops.sum(pos)
        n_neg = self.n - n_pos
        u = ops.sum(rank * pos) - n_pos * (n_pos + 1.0) / 2.0
        return ops.where((n_pos > 0) & (n_neg > 0), u / ops.maximum(n_pos * n_neg, 1.0), 0.5)

    def reset_state(self):
        for v in (self.scores, self.labels, self.n):
            v.assign(ops.zeros_like(v))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "capacity": self.capacity}


@keras.saving.register_keras_serializable(package=PACKAGE)
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up, then a constant rate or a cosine decay, times a fixed scale.

    ``lr(step) = scale * base(step) * min(1, (step + 1) / warmup_steps)`` with ``base`` =
    ``lr`` (constant) or ``alpha lr + (1 - alpha) lr (1 + cos(pi min(step, decay) / decay)) / 2``
    (cosine, SGDR without restarts, Loshchilov & Hutter 2017). A linear warm-up keeps the
    first Adam steps, taken while BatchNorm statistics and Adam's second moments are still
    settling, from throwing the freshly initialised model far away (Goyal et al. 2017,
    arXiv 1706.02677). ``scale`` is how the collapse guard lowers the rate.

    Args:
        lr: peak learning rate.
        decay_steps: cosine: steps to decay over (None: constant).
        alpha: cosine: final rate as a fraction of ``lr``.
        warmup_steps: steps of linear warm-up (0: none).
        scale: factor on the whole curve.
    """

    def __init__(self, lr: float, decay_steps: int | None = None, alpha: float = 0.01, warmup_steps: int = 0,
                 scale: float = 1.0) -> None:
        self.lr, self.decay_steps, self.alpha = float(lr), decay_steps, float(alpha)
        self.warmup_steps, self.scale = int(warmup_steps), float(scale)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        rate = ops.convert_to_tensor(self.lr, "float32")
        if self.decay_steps:
            done = ops.minimum(step, float(self.decay_steps)) / float(self.decay_steps)
            rate = self.lr * (self.alpha + (1.0 - self.alpha) * 0.5 * (1.0 + ops.cos(math.pi * done)))
        if self.warmup_steps > 0:
            rate = rate * ops.minimum(1.0, (step + 1.0) / float(self.warmup_steps))
        return rate * self.scale

    def get_config(self) -> dict[str, Any]:
        return {"lr": self.lr, "decay_steps": self.decay_steps, "alpha": self.alpha,
                "warmup_steps": self.warmup_steps, "scale": self.scale}
