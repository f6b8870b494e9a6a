"""Analytic FLOPs of the registry UNet (framework-free, used by both benchmark sides).

The layout mirrors :mod:`bonemets_tf.models.unet` (``FILTERS`` 64/128/256/512, three
poolings, two Conv-BN-ReLU per encoder level and bridge, one per decoder level, 2x2
stride-2 transposed convolutions, 1x1 logit). A convolution producing an ``H x W x Cout``
map from ``Cin`` channels with a ``k x k`` kernel costs ``2 * H * W * Cin * Cout * k * k``
FLOPs (one multiply and one add per MAC); normalisation, activations and pooling are
ignored (< 2 % here). A training step costs 3x the forward pass (forward, plus input and
weight gradients), the usual convention (Kaplan et al. 2020, arXiv 2001.08361).
"""
from __future__ import annotations

FILTERS = (64, 128, 256, 512)


def conv_flops(h: int, w: int, cin: int, cout: int, k: int) -> int:
    """FLOPs of a stride-1 'same' ``k x k`` convolution with an ``h x w`` output."""
    return 2 * h * w * cin * cout * k * k


def unet_forward_flops(size: int, context: int = 1, filters: tuple[int, ...] = FILTERS) -> int:
    """Forward FLOPs of one ``size x size x context`` slice (``size`` a multiple of 8)."""
    total, cin, s = 0, context, size
    for n in filters[:-1]:                       # encoder: two 3x3 convs per level
        total += conv_flops(s, s, cin, n, 3) + conv_flops(s, s, n, n, 3)
        cin, s = n, s // 2
    total += conv_flops(s, s, cin, filters[-1], 3) + conv_flops(s, s, filters[-1], filters[-1], 3)
    cin = filters[-1]
    for n in reversed(filters[:-1]):             # decoder: 2x2/2 transposed conv, concat, one 3x3 conv
        total += 2 * s * s * cin * n * 4         # each input pixel writes a 2x2 x n patch
        s *= 2
        total += conv_flops(s, s, 2 * n, n, 3)
        cin = n
    total += conv_flops(s, s, cin, 1, 1)         # logit
    return total
