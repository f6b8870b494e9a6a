"""Keras layers that every deployed bonemets model carries inside its graph.

Models take raw Hounsfield units, so an exported model needs no project code to run:
:class:`HUWindow` maps HU to the network's input range, :class:`PadToMultiple` and
:class:`CropLike` let segmenters accept any slice size. All layers are registered as
Keras serializable under the package name ``"bonemets"``, store every constructor
argument and implement ``get_config``; importing this module is what makes a saved
``model.keras`` loadable.

Tensors are channels-last: ``(batch, rows, cols, channels)``.
"""
from __future__ import annotations

from typing import Any

import keras
from keras import ops

#: Default bone window (level, width) in HU. Bone windows of W 1500-2000 / L 300-500 are
#: common; L 500 / W 2000 spans -500..1500 HU, which keeps untreated osteoblastic
#: metastases (654 +/- 176 HU) and enostoses (1190 +/- 239 HU; Ulano et al., AJR 2016)
#: apart instead of clipping both to white.
BONE_WINDOW = (500.0, 2000.0)  # the network's input preprocessing; figures use analysis.imaging.display

PACKAGE = "bonemets"


@keras.saving.register_keras_serializable(package=PACKAGE)
class HUWindow(keras.layers.Layer):
    """Clip Hounsfield units to a window and scale linearly to ``[0, scale]``.

    ``y = scale * clip((x - (level - width / 2)) / width, 0, 1)``. It computes in
    float32 whatever the mixed-precision policy (HU need more than bfloat16's 8 bits
    of mantissa); the next layer casts to the compute dtype.

    Args:
        level: window centre in HU.
        width: window width in HU (> 0).
        scale: value that the top of the window maps to (1 for most models; 255 for
            EfficientNet, which rescales by 1/255 internally).
    """

    def __init__(self, level: float = BONE_WINDOW[0], width: float = BONE_WINDOW[1],
                 scale: float = 1.0, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if width <= 0:
            raise ValueError(f"HUWindow width must be > 0, got {width}")
        self.level = float(level)
        self.width = float(width)
        self.scale = float(scale)

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        low = self.level - self.width / 2.0
        return self.scale * ops.clip((x - low) / self.width, 0.0, 1.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "level": self.level, "width": self.width, "scale": self.scale}


@keras.saving.register_keras_serializable(package=PACKAGE)
class PadToMultiple(keras.layers.Layer):
    """Pad rows and cols at the bottom/right with ``value`` up to a multiple of ``multiple``.

    Lets a segmenter with total stride ``multiple`` run on any slice size; pair it with
    :class:`CropLike` on the output.

    Args:
        multiple: required divisor of rows and cols.
        value: padding value (0 = bottom of the HU window, i.e. air after windowing).
    """

    def __init__(self, multiple: int, value: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.multiple = int(multiple)
        self.value = float(value)

    def call(self, inputs):
        shape = ops.shape(inputs)
        pad_r = (-shape[1]) % self.multiple
        pad_c = (-shape[2]) % self.multiple
        return ops.pad(inputs, [[0, 0], [0, pad_r], [0, pad_c], [0, 0]], constant_values=self.value)

    def compute_output_shape(self, input_shape):
        def up(n):
            return None if n is None else -(-n // self.multiple) * self.multiple
        return (input_shape[0], up(input_shape[1]), up(input_shape[2]), input_shape[3])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "multiple": self.multiple, "value": self.value}


@keras.saving.register_keras_serializable(package=PACKAGE)
class CropLike(keras.layers.Layer):
    """Crop ``inputs[0]`` to the rows and cols of ``inputs[1]`` (top-left anchored).

    Undoes :class:`PadToMultiple`: ``CropLike()([prediction, original_input])``.
    """

    def call(self, inputs):
        x, reference = inputs
        shape = ops.shape(reference)
        return x[:, : shape[1], : shape[2], :]

    def compute_output_shape(self, input_shapes):
        x, reference = input_shapes
        return (x[0], reference[1], reference[2], x[3])


@keras.saving.register_keras_serializable(package=PACKAGE)
class ResizeLike(keras.layers.Layer):
    """Resize ``inputs[0]`` to the rows and cols of ``inputs[1]`` (bilinear by default).

    Unlike ``UpSampling2D(interpolation="bilinear")``, this traces with unknown rows and
    cols, so a model using it exports to a SavedModel that takes any slice size. Used to
    bring attention coefficients back onto the skip connection's grid (Oktay et al. 2018).

    Args:
        interpolation: ``"bilinear"`` or ``"nearest"``.
    """

    def __init__(self, interpolation: str = "bilinear", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"interpolation {interpolation!r}: expected 'bilinear' or 'nearest'")
        self.interpolation = interpolation

    def call(self, inputs):
        import tensorflow as tf  # bonemets_tf is the TensorFlow wing; the op needs dynamic sizes

        x, reference = inputs
        out = tf.image.resize(x, tf.shape(reference)[1:3], method=self.interpolation)
        return tf.cast(out, x.dtype)

    def compute_output_shape(self, input_shapes):
        x, reference = input_shapes
        return (x[0], reference[1], reference[2], x[3])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "interpolation": self.interpolation}
