"""Residual attention UNet: :mod:`resunet` plus additive attention gates on the three
skip connections (Oktay et al. 2018, "Attention U-Net", arXiv 1804.03999, Eq. 1-2).

Gate: ``alpha = sigmoid(psi(ReLU(W_x x + W_g g)))`` with ``W_x`` a strided 1x1 conv that
brings the skip ``x`` onto the grid of the coarser gating signal ``g`` (the decoder
feature one level below), ``W_g`` and ``psi`` 1x1 convs, ``F_int`` = half the skip's
filters; ``alpha`` is resized bilinearly onto ``x``'s grid (:class:`~bonemets_tf.layers.ResizeLike`,
which, unlike bilinear ``UpSampling2D``, exports with any slice size) and multiplies ``x``. 8,361,220 parameters
at full width (paper: 8.0M, +4.5%).
"""
from __future__ import annotations

import keras

from bonemets_tf.layers import ResizeLike
from bonemets_tf.models import resunet as _resunet


def attention_gate(x, g, level: int):
    """Additive attention gate; returns ``x * alpha`` with ``x``'s shape."""
    name = f"att{level + 1}"
    inter = max(1, x.shape[-1] // 2)
    theta_x = keras.layers.Conv2D(inter, 1, strides=2, use_bias=False, name=f"{name}_wx")(x)
    phi_g = keras.layers.Conv2D(inter, 1, name=f"{name}_wg")(g)
    f = keras.layers.ReLU(name=f"{name}_relu")(keras.layers.Add(name=f"{name}_add")([theta_x, phi_g]))
    alpha = keras.layers.Conv2D(1, 1, activation="sigmoid", name=f"{name}_psi")(f)
    alpha = ResizeLike("bilinear", name=f"{name}_alpha")([alpha, x])
    return keras.layers.Multiply(name=f"{name}_gated")([x, alpha])


def resattunet(*, context: int = 1, width: float = 1.0, image_size: int | None = None) -> keras.Model:
    """Build the residual attention UNet; ``width`` multiplies every filter count."""
    return _resunet.build("resattunet", context=context, width=width, gate=attention_gate)
