"""Published results of Pawan, Rich et al. (medRxiv 10.1101/2024.11.01.24316594), as data.

Used by reports to put the paper's numbers next to ours. Percentages as printed in the
paper (0-100); per-slice Dice as fractions. Our model folder names are matched to the
paper's names case-insensitively, ignoring '-', '_' and spaces (``paper_name``).
"""
from __future__ import annotations

import re

CITATION = ("Pawan, Rich et al., Deep learning-based detection and segmentation of osseous "
            "metastatic prostate cancer lesions on CT (medRxiv 10.1101/2024.11.01.24316594)")

#: Detectors, test set: precision, recall, F1, AUC in percent.
DETECTION = {
    "EfficientNet": {"precision": 88.34, "recall": 78.60, "f1": 82.23, "auc": 71.21},
    "DenseNet": {"precision": 87.41, "recall": 54.93, "f1": 64.25, "auc": 63.26},
    "ResNet34": {"precision": 85.35, "recall": 65.20, "f1": 72.06, "auc": 66.81},
}

#: Segmenters, test set: Dice, precision, recall in percent; parameters as printed.
SEGMENTATION = {
    "UNet": {"dice": 55.89, "precision": 57.10, "recall": 68.63, "parameters": "6.7M"},
    "ResUNet": {"dice": 58.97, "precision": 63.86, "recall": 64.27, "parameters": "7.7M"},
    "ResAttUNet": {"dice": 61.65, "precision": 62.20, "recall": 72.62, "parameters": "8M"},
    "nnUNetv2": {"dice": 73.37, "precision": 73.56, "recall": 83.22, "parameters": "30.6M"},
}

#: Per-slice Dice, mean and sd.
SLICE_DICE = {"UNet": (0.56, 0.24), "ResUNet": (0.58, 0.27), "ResAttUNet": (0.60, 0.28), "nnUNetv2": (0.74, 0.21)}

#: Pairwise paired t-tests between segmenters: all p < 0.01.
TTEST_NOTE = "all pairwise paired t-tests p < 0.01"

#: Radiomics ICC per feature class for nnUNetv2 (the only model the paper reports).
ICC = {"nnUNetv2": {"firstorder": 1.0, "glcm": 0.91, "gldm": 0.95, "glrlm": 0.95, "glszm": 0.94, "ngtdm": 0.95}}

_ALIASES = {"nnunet": "nnUNetv2", "nnunetv2": "nnUNetv2", "efficientnetb0": "EfficientNet",
            "densenet121": "DenseNet", "resnet": "ResNet34"}


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).lower()


def paper_name(model: str) -> str | None:
    """The paper's name for one of our model folders, or None when the paper has no such model."""
    key = _norm(model)
    for name in (*DETECTION, *SEGMENTATION):
        if _norm(name) == key:
            return name
    return _ALIASES.get(key)
