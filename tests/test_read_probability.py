"""The one probability-map reader (analysis.prediction.probabilities.read_probability), used by analyze.

The stored format's definition decides its range rule: values within RANGE_TOL outside
[0, 1] are probabilities (clipped, as quantise does on writing), further out is an error;
a map written by write_probability reads back unchanged.
"""
from __future__ import annotations

import numpy as np
import pytest

from analysis.errors import InputError
from analysis.imaging.io import Geometry, write_array
from analysis.prediction.probabilities import LEVELS, RANGE_TOL, read_probability, write_probability

GEO = Geometry(size=(5, 4, 3), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0),
               direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def test_values_within_the_tolerance_are_clipped(tmp_path):
    p = np.full(GEO.shape, 0.25, np.float32)
    p[0, 0, 0], p[0, 0, 1] = 1 + RANGE_TOL / 2, -RANGE_TOL / 2
    write_array(p, GEO, tmp_path / "p.nii.gz")
    back = read_probability(tmp_path / "p.nii.gz")
    assert back.dtype == np.float32 and back.min() == 0.0 and back.max() == 1.0
    assert float(back[1, 1, 1]) == 0.25


@pytest.mark.parametrize("bad, shown", [(1 + 20 * RANGE_TOL, "1.00002"), (-0.5, "-0.5")])
def test_values_beyond_the_tolerance_are_refused(tmp_path, bad, shown):
    p = np.zeros(GEO.shape, np.float32)
    p[2, 3, 4] = bad
    write_array(p, GEO, tmp_path / "p.nii.gz")
    with pytest.raises(InputError, match=r"p\.nii\.gz: probabilities outside \[0, 1\] \(found ") as err:
        read_probability(tmp_path / "p.nii.gz")
    assert shown in str(err.value) and "\n" not in str(err.value)


def test_every_stored_level_reads_back_as_k_over_255(tmp_path):
    k = np.arange(LEVELS + 1, dtype=np.float64)
    prob = np.resize(k / LEVELS, GEO.shape)
    stored = write_probability(prob, GEO, tmp_path / "p.nii.gz", threshold=0.5)
    back = read_probability(tmp_path / "p.nii.gz")
    np.testing.assert_allclose(back, stored / LEVELS, rtol=0, atol=1e-7)
    assert back.max() <= 1.0 and (back >= 0.5).sum() == (prob >= 0.5).sum()
