"""The long and short axis of a lesion's largest cross-section (analysis.lesions.cross_sections)
and the outline a report draws there: hand-computed values, a brute-force maximum Feret diameter
and a dense-sampling short axis on the phantom's lesions through lesions.csv's writer, and the
outline's pixels by an independent even-odd fill."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from scipy.spatial.distance import pdist

from analysis.cohort.phantom import generate_case
from analysis.imaging.rtstruct import fill_even_odd
from analysis.lesions import bidirectional, cross_sections, lesion_instances, lesion_table, outline
from analysis.prediction.tables import lesion_rows


def _inside(ring: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre is inside a ``(col, row)`` ring (0, 0 the first pixel's top left corner)."""
    return fill_even_odd([np.stack([ring[:, 1] - 0.5, ring[:, 0] - 0.5], axis=1)], shape)


def _corners_mm(pixels: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
    r, c = np.nonzero(pixels)
    return np.concatenate([np.stack([(c + dc) * col_mm, (r + dr) * row_mm], axis=1)
                           for dr in (0, 1) for dc in (0, 1)])


def _sampled_short_axis(pixels: np.ndarray, row_mm: float, col_mm: float, u: np.ndarray, k: int = 16) -> float:
    """Brute force: k x k points in every pixel, binned into strips 0.01 mm wide across the long
    axis ``u``; the longest spread of a strip's points along the perpendicular."""
    r, c = np.nonzero(pixels)
    g = (np.arange(k) + 0.5) / k
    x = ((c[:, None, None] + g[None, None, :]) * col_mm + 0 * g[None, :, None]).ravel()
    y = ((r[:, None, None] + g[None, :, None]) * row_mm + 0 * g[None, None, :]).ravel()
    s, t = x * u[0] + y * u[1], -x * u[1] + y * u[0]
    strip = np.round(s / 0.01).astype(np.int64)
    order = np.argsort(strip, kind="stable")
    strip, t = strip[order], t[order]
    starts = np.flatnonzero(np.r_[True, strip[1:] != strip[:-1]])
    return float(np.max(np.maximum.reduceat(t, starts) - np.minimum.reduceat(t, starts)))


def test_golden_values():
    one = np.ones((1, 1), bool)
    long_mm, short_mm, _, _ = bidirectional(one, (2.0, 1.0))  # one pixel 1 mm wide, 2 mm tall
    # the diagonal, and the chord through the centre perpendicular to it (short side x diagonal / long side)
    assert long_mm == pytest.approx(np.hypot(1, 2)) and short_mm == pytest.approx(1 * np.hypot(1, 2) / 2)
    # 3 rows x 5 columns at 2 mm x 0.5 mm: a 2.5 mm wide, 6 mm tall rectangle
    m = np.zeros((5, 7), bool)
    m[1:4, 1:6] = True
    long_mm, short_mm, (a, b), (c, d) = bidirectional(m, (2.0, 0.5))
    assert long_mm == pytest.approx(6.5) and short_mm == pytest.approx(2.5 * 6.5 / 6)
    assert sorted([a, b]) == [(1.0, 1.0), (6.0, 4.0)]  # corner to corner, in (col, row) pixel units
    # the short axis is perpendicular to the long one, its ends on the rectangle's edges
    long_v = np.subtract(b, a) * [0.5, 2.0]
    short_v = np.subtract(d, c) * [0.5, 2.0]
    assert float(long_v @ short_v) == pytest.approx(0, abs=1e-9)
    assert np.hypot(*short_v) == pytest.approx(short_mm)
    # an L: its hull's longest chord; the perpendicular extent crosses the notch
    ell = np.zeros((6, 6), bool)
    ell[0:5, 0:2] = ell[3:5, 0:5] = True
    long_mm, _, _, _ = bidirectional(ell, (1.0, 1.0))
    assert long_mm == pytest.approx(np.hypot(5, 5))


def test_outline_of_a_part_with_a_hole_and_a_second_part():
    m = np.zeros((8, 9), bool)
    m[1:6, 1:6] = True
    m[3, 3] = False          # a hole: filled
    m[6:8, 7:9] = True       # a second, smaller part: not outlined
    ring = outline(m)
    assert ring.tolist() == [[1, 1], [6, 1], [6, 6], [1, 6], [1, 1]]
    big = m.copy()
    big[6:8, 7:9] = False
    big[3, 3] = True
    np.testing.assert_array_equal(_inside(ring, m.shape), big)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.floats(0.3, 0.9))
def test_the_outline_encloses_exactly_the_largest_part_with_its_holes_filled(seed, density):
    rng = np.random.default_rng(seed)
    m = ndimage.binary_opening(rng.random((14, 12)) < density) | (rng.random((14, 12)) < 0.05)
    if not m.any():
        m[3, 4] = True
    ring = outline(m)
    parts, _ = ndimage.label(m)
    sizes = np.bincount(parts.ravel())[1:]
    expected = ndimage.binary_fill_holes(parts == 1 + int(np.argmax(sizes)))
    np.testing.assert_array_equal(_inside(ring, m.shape), expected)
    assert (ring[0] == ring[-1]).all() and len({tuple(p) for p in ring[:-1]}) == len(ring) - 1  # one simple ring


@pytest.mark.parametrize("seed", [3, 11])
def test_lesions_csv_axes_agree_with_brute_force_on_the_phantom(seed):
    case = generate_case(seed)
    labels, n = lesion_instances(case.label)
    assert n >= 3
    rows = lesion_rows("p", case.label, case.ct, case.geometry)
    col_mm, row_mm = case.geometry.spacing[0], case.geometry.spacing[1]
    pixel = np.hypot(col_mm, row_mm)
    sections = cross_sections(labels, lesion_table(labels, n), pixel_spacing_mm=(row_mm, col_mm))
    for row, section in zip(rows, sections):
        lesion = labels == row["lesion_id"]
        z = int(np.argmax(lesion.sum(axis=(1, 2))))  # the largest cross-section, the first on a tie
        assert section.z == z
        pixels = lesion[z]
        # maximum Feret diameter: every pair of pixel corners; every pair of pixel centres
        assert row["long_axis_mm"] == pytest.approx(pdist(_corners_mm(pixels, row_mm, col_mm)).max(), rel=1e-9)
        r, c = np.nonzero(pixels)
        centres = pdist(np.stack([(c + 0.5) * col_mm, (r + 0.5) * row_mm], axis=1)).max() if r.size > 1 else 0.0
        assert 0 <= row["long_axis_mm"] - centres <= pixel + 1e-9
        a, b = (np.asarray(p) * [col_mm, row_mm] for p in section.long_axis)
        u = (b - a) / np.linalg.norm(b - a)
        assert abs(row["short_axis_mm"] - _sampled_short_axis(pixels, row_mm, col_mm, u)) <= pixel
        assert row["short_axis_mm"] <= row["long_axis_mm"] + 1e-9
        parts, _ = ndimage.label(pixels)
        largest = ndimage.binary_fill_holes(parts == 1 + int(np.argmax(np.bincount(parts.ravel())[1:])))
        np.testing.assert_array_equal(_inside(section.outline, pixels.shape), largest)
