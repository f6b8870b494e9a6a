"""The Keras wing's option vocabularies, as plain data: this module imports nothing, so
``cli.py`` offers them as click choices (and ``--help`` shows them) without importing
TensorFlow, and the settings that check them (:class:`bonemets_tf.train.TrainConfig`,
:class:`bonemets_tf.inference.Predictor`, :func:`bonemets_tf.gradcam.gradcam`) read the same tuples.
Model names and tasks are :mod:`bonemets_tf.models.catalog`'s.
"""
from __future__ import annotations

__all__ = ["TRAIN_PRECISIONS", "PREDICT_PRECISIONS", "STRATEGIES", "LR_SCHEDULES", "GRADCAM_METHODS"]

#: Keras dtype policies a model trains under (``train --precision``).
TRAIN_PRECISIONS: tuple[str, ...] = ("float32", "mixed_bfloat16", "mixed_float16")
#: Inference precisions: ``mixed_bfloat16`` computes in bfloat16 with float32 weights (CPUs and
#: GPUs with bf16 units); outputs are float32 either way (``predict``/``serve --precision``).
PREDICT_PRECISIONS: tuple[str, ...] = ("float32", "mixed_bfloat16")
#: tf.distribute strategies (``train --strategy``; :func:`bonemets_tf.distribute.make_strategy`).
STRATEGIES: tuple[str, ...] = ("auto", "mirrored", "multiworker")
#: Learning-rate schedules (``train --lr-schedule``): constant, or cosine decay to 1 % over all steps.
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")
#: Class activation map methods (``gradcam --method``).
GRADCAM_METHODS: tuple[str, ...] = ("gradcam", "gradcam++")
