"""Names, tasks and published sizes of the registered models, as plain data.

This module imports no TensorFlow, so ``cli.py`` can offer ``--arch`` choices and
``--help`` without paying for a TensorFlow import. :mod:`bonemets_tf.models.registry`
attaches a builder to each entry; a test checks that both list the same models.
"""
from __future__ import annotations

from dataclasses import dataclass

DETECT = "detect"
SEGMENT = "segment"
#: The tasks a model does (``train --task``): slice detection or pixel segmentation.
TASKS: tuple[str, ...] = (DETECT, SEGMENT)


@dataclass(frozen=True)
class CatalogEntry:
    """What is known about a model without building it.

    Attributes:
        name: registry name, the value of ``--arch``.
        task: ``"detect"`` (slice-level lesion probability, output ``(batch, 1)``) or
            ``"segment"`` (pixel probability, output ``(batch, rows, cols, 1)``).
        paper_params: parameter count reported by Pawan, Rich et al. (None: not reported).
        stride: total downsampling factor; segmenters pad inputs to a multiple of it
            internally, so any slice size is accepted.
        scalable: whether ``width`` scales its filter counts (the stock
            keras.applications detectors are built at their published width only).
        description: one line for ``python cli.py models``.
    """

    name: str
    task: str
    paper_params: int | None
    stride: int
    scalable: bool
    description: str


CATALOG: dict[str, CatalogEntry] = {e.name: e for e in (
    CatalogEntry("efficientnet", DETECT, None, 32, False,
                 "EfficientNet-B0 (keras.applications), sigmoid head"),
    CatalogEntry("resnet34", DETECT, None, 32, True,
                 "ResNet34, basic blocks [3, 4, 6, 3] (He et al. 2016), sigmoid head"),
    CatalogEntry("densenet", DETECT, None, 32, False,
                 "DenseNet-121 (keras.applications), sigmoid head"),
    CatalogEntry("unet", SEGMENT, 6_700_000, 8, True,
                 "UNet (Ronneberger et al. 2015), 64-512 filters, 3 poolings"),
    CatalogEntry("resunet", SEGMENT, 7_700_000, 8, True,
                 "ResUNet, pre-activation residual units (Zhang et al. 2018)"),
    CatalogEntry("resattunet", SEGMENT, 8_000_000, 8, True,
                 "ResUNet with additive attention gates (Oktay et al. 2018)"),
)}


def names(task: str | None = None) -> list[str]:
    """Registered model names, in registry order, optionally only those of ``task``."""
    return [n for n, e in CATALOG.items() if task is None or e.task == task]
