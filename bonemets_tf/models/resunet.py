"""ResUNet segmenter after Zhang, Liu & Wang 2018 ("Road extraction by deep residual
U-Net", arXiv 1711.10684): pre-activation residual units.

A residual unit is ``BN-ReLU-Conv3x3(stride s) -> BN-ReLU-Conv3x3`` plus a shortcut
``Conv1x1(stride s)-BN``; downsampling is the stride 2 of the first conv (no pooling).
Encoder 64/128/256, bridge 512, decoder units 256/128/64 after nearest-neighbour 2x
upsampling and concatenation with the skip. 8,231,745 parameters at full width (paper:
7.7M, +6.9%). Input ``(rows, cols, context)`` raw HU of any size (padded to a multiple
of 8 internally); output ``(batch, rows, cols, 1)`` lesion probability.
"""
from __future__ import annotations

from typing import Callable

import keras

from bonemets_tf.models.common import scaled
from bonemets_tf.models.unet import segmenter_front, segmenter_head

FILTERS = (64, 128, 256, 512)
STRIDE = 2 ** (len(FILTERS) - 1)


def _bn_relu_conv(x, filters: int, *, strides: int = 1, name: str):
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return keras.layers.Conv2D(filters, 3, strides=strides, padding="same", name=f"{name}_conv")(x)


def _shortcut(x, filters: int, *, strides: int, name: str):
    s = keras.layers.Conv2D(filters, 1, strides=strides, name=f"{name}_short_conv")(x)
    return keras.layers.BatchNormalization(name=f"{name}_short_bn")(s)


def residual_unit(x, filters: int, *, strides: int = 1, name: str):
    """Pre-activation residual unit (Zhang et al. 2018, Fig. 1b / He et al. 2016)."""
    y = _bn_relu_conv(x, filters, strides=strides, name=f"{name}_1")
    y = _bn_relu_conv(y, filters, name=f"{name}_2")
    return keras.layers.Add(name=f"{name}_add")([_shortcut(x, filters, strides=strides, name=name), y])


def build(name: str, *, context: int, width: float,
          gate: Callable | None = None) -> keras.Model:
    """ResUNet graph; ``gate(skip, coarse, level)`` (attention) filters skips when given."""
    f = [scaled(n, width) for n in FILTERS]
    inputs, x = segmenter_front(context, STRIDE)
    # first unit: the input is not activated (Zhang et al. 2018, Table 1, level 1)
    y = keras.layers.Conv2D(f[0], 3, padding="same", name="enc1_1_conv")(x)
    y = _bn_relu_conv(y, f[0], name="enc1_2")
    x = keras.layers.Add(name="enc1_add")([_shortcut(x, f[0], strides=1, name="enc1"), y])
    skips = [x]
    for level in range(1, len(f) - 1):
        x = residual_unit(x, f[level], strides=2, name=f"enc{level + 1}")
        skips.append(x)
    x = residual_unit(x, f[-1], strides=2, name="bridge")
    for level in reversed(range(len(skips))):
        skip = gate(skips[level], x, level) if gate is not None else skips[level]
        x = keras.layers.UpSampling2D(2, name=f"up{level + 1}")(x)
        x = keras.layers.Concatenate(name=f"cat{level + 1}")([x, skip])
        x = residual_unit(x, f[level], name=f"dec{level + 1}")
    return segmenter_head(inputs, x, name)


def resunet(*, context: int = 1, width: float = 1.0, image_size: int | None = None) -> keras.Model:
    """Build the ResUNet; ``width`` multiplies every filter count (``image_size`` unused)."""
    return build("resunet", context=context, width=width)
