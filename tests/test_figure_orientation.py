"""The report's qualitative figure is drawn in radiological convention whatever the storage
order: the same patient stored LPS and RAS gives the same displayed slice."""
from __future__ import annotations

import numpy as np

from analysis.evaluation.analyze import _radiological
from analysis.imaging.io import Geometry


def test_the_qualitative_figure_is_radiological_for_lps_and_ras_storage():
    rng = np.random.default_rng(0)
    ct = rng.normal(size=(5, 6, 7))
    gt = ct > 1
    lps = Geometry(size=(7, 6, 5), spacing=(0.7, 0.9, 3.0), origin=(0, 0, 0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    ras = Geometry(size=(7, 6, 5), spacing=(0.7, 0.9, 3.0), origin=(4.2, 4.5, 0),
                   direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    shown = []
    for geometry, view in ((lps, lambda a: a), (ras, lambda a: a[:, ::-1, ::-1])):
        figure = {"gt": view(gt)[2], "ct": view(ct)[2], "pred": {"m": view(gt)[2]}, "spacing": geometry.spacing,
                  "geometry": geometry}
        shown.append(_radiological(figure))
    for key in ("gt", "ct"):
        np.testing.assert_array_equal(shown[0][key], shown[1][key])
    np.testing.assert_array_equal(shown[0]["ct"], ct[2])  # LPS storage is already radiological
    np.testing.assert_array_equal(shown[1]["pred"]["m"], gt[2])
    assert "geometry" not in shown[1] and shown[1]["spacing"] == (0.7, 0.9, 3.0)
