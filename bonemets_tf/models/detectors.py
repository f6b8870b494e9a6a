"""Slice-level lesion detectors: EfficientNet-B0, ResNet34 and DenseNet-121.

Each is built as ONE flat functional graph ``raw HU -> Resizing -> HUWindow -> backbone
-> global average pool -> Dense(1, sigmoid)``: the keras.applications backbones are
called on the windowed tensor through ``input_tensor`` so their layers join the graph
instead of nesting as a sub-model (Grad-CAM tools such as tf-keras-vis fail on nested
backbones). Input ``(rows, cols, context)`` raw HU of any size; the model resizes to
``image_size`` itself, so a deployed detector takes whole slices. Output ``(batch, 1)``:
probability that the slice contains lesion. Random initialisation (no downloads).
"""
from __future__ import annotations

import keras

from bonemets_tf.layers import HUWindow
from bonemets_tf.models.common import conv_bn_relu, scaled, sigmoid_output


def _front(context: int, image_size: int, *, scale: float = 1.0):
    inputs = keras.Input((None, None, context), name="ct_hu")
    x = keras.layers.Resizing(image_size, image_size, interpolation="bilinear", name="resize")(inputs)
    x = HUWindow(scale=scale, name="hu_window")(x)
    return inputs, x


def _head(inputs, features, name: str) -> keras.Model:
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(features)
    x = keras.layers.Dense(1, name="logit")(x)
    return keras.Model(inputs, sigmoid_output(x), name=name)


def efficientnet(*, context: int = 1, width: float = 1.0, image_size: int = 256) -> keras.Model:
    """EfficientNet-B0 (Tan & Le 2019) from keras.applications, random init.

    Keras's EfficientNet rescales by 1/255 internally, so the window maps to [0, 255].
    ``width`` must be 1 (the published network).
    """
    inputs, x = _front(context, image_size, scale=255.0)
    backbone = keras.applications.EfficientNetB0(include_top=False, weights=None, input_tensor=x,
                                                 input_shape=(image_size, image_size, context))
    return _head(inputs, backbone.output, "efficientnet")


def densenet(*, context: int = 1, width: float = 1.0, image_size: int = 256) -> keras.Model:
    """DenseNet-121 (Huang et al. 2017) from keras.applications, random init; ``width`` must be 1."""
    inputs, x = _front(context, image_size)
    backbone = keras.applications.DenseNet121(include_top=False, weights=None, input_tensor=x,
                                              input_shape=(image_size, image_size, context))
    return _head(inputs, backbone.output, "densenet")


def resnet34(*, context: int = 1, width: float = 1.0, image_size: int = 256) -> keras.Model:
    """ResNet34 (He et al. 2016): 7x7/2 stem, max pool, basic blocks [3, 4, 6, 3].

    Written directly in Keras layers (keras.applications has no ResNet34), with the same
    layer structure and parameter count as keras_hub's ``ResNetBackbone(block_type=
    "basic_block", stackwise_num_blocks=[3, 4, 6, 3], use_pre_activation=False)``:
    21,295,424 backbone parameters with one input channel (a test checks this). A 1x1
    projection shortcut is used where the stride or the width changes.
    """
    inputs, x = _front(context, image_size)
    x = conv_bn_relu(x, scaled(64, width), kernel=7, strides=2, name="stem")
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for stage, (filters, blocks, stride) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), (1, 2, 2, 2))):
        for block in range(blocks):
            x = _basic_block(x, scaled(filters, width), stride if block == 0 else 1,
                             name=f"stage{stage + 1}_block{block + 1}")
    return _head(inputs, x, "resnet34")


def _basic_block(x, filters: int, stride: int, *, name: str):
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj_conv")(x)
        shortcut = keras.layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    y = conv_bn_relu(x, filters, strides=stride, name=f"{name}_1")
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_2_conv")(y)
    y = keras.layers.BatchNormalization(name=f"{name}_2_bn")(y)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)
