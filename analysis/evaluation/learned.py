"""Whether a trained model *learned*: the one rule both wings apply to their training records.

A model that predicts nothing (or one constant output) scores pooled Dice 0 on validation
slices with lesion (segmenters) and slice AUC 0.5 (detectors). A model learned when its best
validation value exceeds that empty level by more than :data:`LEARNED_MARGIN`. The margin also
clears the other trivial predictor: calling every pixel lesion scores Dice ``2 pi / (1 + pi)``
for a lesion-pixel share ``pi``, 0.01-0.02 on the phantoms; a Keras model trained with
``--lr 1000`` reached validation Dice 0.017 calling a third of all pixels lesion.

The Keras wing reads the value from its ``history.csv`` (:func:`bonemets_tf.run.training_status`),
the nnU-Net wing from nnU-Net's own validation of each fold
(:func:`nnunet_bridge.train.training_status`).
"""
from __future__ import annotations

__all__ = ["EMPTY_LEVEL", "LEARNED_MARGIN", "learned"]

#: What a model that predicts nothing (or one constant output) scores on validation: pooled
#: Dice 0 on validation slices with lesion (segmenters), slice AUC 0.5 (detectors).
EMPTY_LEVEL = {"segment": 0.0, "detect": 0.5}
#: A model *learned* when its best validation value exceeds :data:`EMPTY_LEVEL` by more than this.
LEARNED_MARGIN = {"segment": 0.05, "detect": 0.05}


def learned(task: str, best_value: float | None) -> bool:
    """Whether a model *learned*: its best validation value (Dice for segmenters, AUC for
    detectors) exceeds :data:`EMPTY_LEVEL` by more than :data:`LEARNED_MARGIN`.

    Args:
        task: ``"detect"`` or ``"segment"``.
        best_value: the best validation value, or None when none was recorded.

    Returns:
        False for None (nothing recorded) and for values at or below ``EMPTY_LEVEL + LEARNED_MARGIN``.

    >>> learned("segment", 0.051), learned("segment", 0.05), learned("detect", 0.56), learned("detect", None)
    (True, False, True, False)
    """
    return best_value is not None and best_value > EMPTY_LEVEL[task] + LEARNED_MARGIN[task]
