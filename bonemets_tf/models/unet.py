"""UNet segmenter (Ronneberger et al. 2015, arXiv 1505.04597), sized to the paper's 6.7M.

Input ``(rows, cols, context)`` raw HU of any size (padded internally to a multiple of
8 and cropped back); output ``(batch, rows, cols, 1)`` lesion probability.

Sizing: the paper reports 6.7M parameters but not the layout. Encoder levels of
64/128/256 filters with two Conv-BN-ReLU each, a 512-filter bridge, 2x2 transposed-conv
upsampling and ONE Conv-BN-ReLU per decoder level gives 6,928,705 parameters (+3.4%);
the textbook two decoder convs would give 7.71M (+15%) and a 32-filter, 4-pooling UNet
7.77M (see ../shared/notes/domain-facts.md). Three poolings also match ResUNet's depth.
"""
from __future__ import annotations

import keras

from bonemets_tf.layers import CropLike, HUWindow, PadToMultiple
from bonemets_tf.models.common import conv_bn_relu, scaled, sigmoid_output

FILTERS = (64, 128, 256, 512)
STRIDE = 2 ** (len(FILTERS) - 1)


def segmenter_front(context: int, stride: int):
    """Raw-HU input, windowing and padding shared by all segmenters: ``(inputs, x)``."""
    inputs = keras.Input((None, None, context), name="ct_hu")
    x = HUWindow(name="hu_window")(inputs)
    return inputs, PadToMultiple(stride, name="pad")(x)


def segmenter_head(inputs, x, name: str) -> keras.Model:
    """1x1 conv, sigmoid and crop back to the input's rows and cols."""
    x = keras.layers.Conv2D(1, 1, name="logit")(x)
    x = sigmoid_output(x, name="sigmoid")
    return keras.Model(inputs, CropLike(dtype="float32", name="probability")([x, inputs]), name=name)


def unet(*, context: int = 1, width: float = 1.0, image_size: int | None = None) -> keras.Model:
    """Build the UNet; ``width`` multiplies every filter count (``image_size`` unused)."""
    f = [scaled(n, width) for n in FILTERS]
    inputs, x = segmenter_front(context, STRIDE)
    skips = []
    for level, n in enumerate(f[:-1]):
        x = conv_bn_relu(x, n, name=f"enc{level + 1}a")
        x = conv_bn_relu(x, n, name=f"enc{level + 1}b")
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{level + 1}")(x)
    x = conv_bn_relu(x, f[-1], name="bridge_a")
    x = conv_bn_relu(x, f[-1], name="bridge_b")
    for level in reversed(range(len(skips))):
        x = keras.layers.Conv2DTranspose(f[level], 2, strides=2, name=f"up{level + 1}")(x)
        x = keras.layers.Concatenate(name=f"cat{level + 1}")([x, skips[level]])
        x = conv_bn_relu(x, f[level], name=f"dec{level + 1}")
    return segmenter_head(inputs, x, "unet")
