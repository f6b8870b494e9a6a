"""Keras/TensorFlow side of bonemets: the paper's three detectors and three UNet-family
segmenters, a slice cache with a tf.data pipeline, and training.

Modules:
    layers        Keras layers that deployed models carry (HU windowing, padding).
    models        the model registry (``models.catalog`` names and tasks without TensorFlow;
                  ``models.registry`` builders) and one module per model family.
    cache         per-case memory-mapped slice cache built from a cohort.
    data          tf.data pipelines (patient-level splits, balancing, augmentation).
    losses        losses and metrics (Dice + BCE, class-weighted BCE, Dice score).
    train         ``TrainConfig`` and :func:`train`, which writes a RUN folder.

Importing this package imports neither TensorFlow nor torch; the submodules that need
TensorFlow import it themselves.
"""
from __future__ import annotations
