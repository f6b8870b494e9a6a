"""The model registry: the single source of truth for ``--arch``, ``models`` and tests.

Each :class:`ModelSpec` joins a :data:`~bonemets_tf.models.catalog.CATALOG` entry (name,
task, published size; importable without TensorFlow) to its builder. Builders share one
keyword signature ``builder(*, context, width, image_size) -> keras.Model``; every model
takes raw HU ``(batch, rows, cols, context)`` float32 and outputs float32 probabilities:
``(batch, 1)`` for detectors, ``(batch, rows, cols, 1)`` for segmenters.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras

from analysis.errors import InputError
from bonemets_tf.models import detectors
from bonemets_tf.models.catalog import CATALOG, CatalogEntry
from bonemets_tf.models.resattunet import resattunet
from bonemets_tf.models.resunet import resunet
from bonemets_tf.models.unet import unet

log = logging.getLogger(__name__)

Builder = Callable[..., keras.Model]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its catalog entry plus the function that builds it."""

    entry: CatalogEntry
    builder: Builder

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def task(self) -> str:
        return self.entry.task

    @property
    def paper_params(self) -> int | None:
        return self.entry.paper_params

    @property
    def stride(self) -> int:
        return self.entry.stride


_BUILDERS: dict[str, Builder] = {
    "efficientnet": detectors.efficientnet,
    "resnet34": detectors.resnet34,
    "densenet": detectors.densenet,
    "unet": unet,
    "resunet": resunet,
    "resattunet": resattunet,
}

REGISTRY: dict[str, ModelSpec] = {name: ModelSpec(entry, _BUILDERS[name]) for name, entry in CATALOG.items()}


def get_spec(name: str) -> ModelSpec:
    """The registered model ``name``.

    Raises:
        InputError: unknown name.
    """
    if name not in REGISTRY:
        raise InputError(f"--arch {name!r}: unknown model; expected one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def build_model(name: str, *, context: int = 1, width: float = 1.0, image_size: int = 256,
                weights: str | Path | None = None) -> keras.Model:
    """Build a registered model, optionally loading a local weights file.

    Args:
        name: registry name (``--arch``).
        context: adjacent axial slices given as channels (odd, >= 1).
        width: filter-count multiplier (> 0); must be 1 for non-scalable models.
        image_size: detector input side after the in-model resize (segmenters ignore it).
        weights: a ``.weights.h5`` (or ``.keras``) file saved from the same architecture.

    Raises:
        InputError: unknown name, bad option, or weights that do not fit the model.
    """
    spec = get_spec(name)
    if context < 1 or context % 2 == 0:
        raise InputError(f"--context {context}: expected an odd number of slices >= 1")
    if width <= 0:
        raise InputError(f"--width {width}: expected a positive multiplier")
    if width != 1.0 and not spec.entry.scalable:
        raise InputError(f"--width {width}: {name} is built at its published width only; use --width 1")
    if spec.task == "detect" and image_size < 32:
        raise InputError(f"--image-size {image_size}: detectors need at least 32 pixels")
    model = spec.builder(context=context, width=width, image_size=image_size)
    if weights is not None:
        load_weights(model, weights)
    return model


def load_weights(model: keras.Model, path: str | Path, *, option: str = "--weights") -> None:
    """Load weights from a local file into ``model``.

    Args:
        model: the built model.
        path: a ``.weights.h5`` file, or a ``.keras`` model of the same architecture.
        option: the command-line option that named the file, for error messages.

    Raises:
        InputError: missing file or weights of a different architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{option} {path}: file not found")
    try:
        if path.name.endswith(".keras"):
            source = keras.models.load_model(path, compile=False)
            model.set_weights(source.get_weights())
        else:
            model.load_weights(path)
    except (ValueError, KeyError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{option} {path}: does not fit {model.name} ({first})") from None
    log.info("loaded weights from %s", path)
