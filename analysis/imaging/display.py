"""The one bone window every figure shows a CT in: previews, the report's qualitative
figure and the Grad-CAM overlays.

This is a display setting only. The window the Keras models apply to their input is a
layer inside each model (``bonemets_tf.layers.HUWindow``); it happens to have the same
values, but changing one does not change the other.
"""
from __future__ import annotations

import numpy as np

__all__ = ["BONE_WINDOW", "window"]

#: Display bone window ``(level, width)`` in HU: -500..1500 HU. Bone windows of
#: W 1500-2000 / L 300-500 are common; this one keeps osteoblastic metastases
#: (654 +/- 176 HU) distinguishable from cortex (+400 to +1000 HU) and enostoses
#: (1190 +/- 239 HU; Ulano et al., AJR 2016) instead of clipping them all to white.
BONE_WINDOW: tuple[float, float] = (500.0, 2000.0)


def window(ct: np.ndarray, level: float = BONE_WINDOW[0], width: float = BONE_WINDOW[1]) -> np.ndarray:
    """Map HU linearly to grey values: ``level - width/2`` is 0, ``level + width/2`` is 1.

    Args:
        ct: HU, any shape.
        level: window centre in HU.
        width: window width in HU (> 0).

    Returns:
        float64 array of ``ct``'s shape in [0, 1] (clipped outside the window).

    Raises:
        ValueError: ``width <= 0``.

    Examples:
        >>> window(np.array([-1000, -500, 500, 1500, 3000])).tolist()
        [0.0, 0.0, 0.5, 1.0, 1.0]
        >>> window(np.array([0, 50, 100]), level=50, width=100).tolist()
        [0.0, 0.5, 1.0]
    """
    if width <= 0:
        raise ValueError(f"window width must be > 0 HU, got {width}")
    low = level - width / 2.0
    return np.clip((np.asarray(ct, dtype=np.float64) - low) / width, 0.0, 1.0)
