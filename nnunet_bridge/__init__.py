"""nnU-Net v2 (PyTorch) on the project's cohort, driven through nnU-Net's Python API.

Modules:
    env: the work-folder layout and the ONE scoped context manager that sets nnU-Net's
        environment variables (``nnUNet_raw`` ...) and restores the previous ones.
    convert: cohort training patients -> a 2D nnU-Net raw dataset (one image per axial
        slice) and patient-grouped ``splits_final.json``.
    trainers: the single trainer class ``nnUNetTrainerBonemets`` (epochs and iterations as
        options), found by nnU-Net by name through ``nnUNet_extTrainer``.
    train: fingerprint / plan / preprocess and per-fold training.
    predict: ensemble prediction of whole CT volumes back to NIfTI masks.

Importing this package (or any of its modules) imports neither torch, nnunetv2 nor
TensorFlow: torch and nnunetv2 are imported inside the functions that need them, after the
environment is set, and TensorFlow is never imported.
"""
from __future__ import annotations
