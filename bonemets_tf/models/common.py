"""Building blocks shared by the model families."""
from __future__ import annotations

import keras


def scaled(filters: int, width: float) -> int:
    """``filters`` multiplied by ``width``, rounded, at least 1."""
    return max(1, int(round(filters * width)))


def conv_bn_relu(x, filters: int, *, kernel: int = 3, strides: int = 1, name: str):
    """Conv (no bias) - BatchNorm - ReLU, the post-activation unit of UNet and ResNet."""
    x = keras.layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                            name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def sigmoid_output(x, *, name: str = "probability"):
    """1-channel sigmoid output in float32 (kept float32 under mixed precision)."""
    return keras.layers.Activation("sigmoid", dtype="float32", name=name)(x)
