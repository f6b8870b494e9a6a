"""Preview PNG: radiological orientation whatever the storage order, numbers where lesions.csv says."""
from __future__ import annotations

import os

import matplotlib.image as mpimg
import numpy as np
import pytest

from analysis.imaging.io import Geometry
from analysis.lesions import lesion_instances
from analysis.prediction.preview import (DPI, label_positions, panel_layout, preview_panels, radiological_axial,
                                         write_preview)
from analysis.prediction.tables import lesion_rows

# Canonical (LPS) phantom: (slices, rows, cols) = (z up, y to posterior, x to patient's left)
SHAPE = (40, 48, 56)
SPACING = (0.9, 0.8, 2.0)             # x, y, z mm
ORIGIN = (-25.0, -19.0, 100.0)


def _canonical() -> tuple[np.ndarray, np.ndarray, Geometry]:
    nz, ny, nx = SHAPE
    ct = np.full(SHAPE, -1000, np.int16)
    ct[2:38, 8:40, 6:50] = 40                         # body
    ct[2:38, 30:36, 24:32] = 700                      # spine, posterior midline
    mask = np.zeros(SHAPE, np.uint8)
    mask[28:34, 10:16, 40:47] = 1                     # lesion 1: patient's left, anterior, superior
    mask[6:9, 31:35, 10:14] = 1                       # lesion 2: patient's right, posterior, inferior
    ct[mask > 0] = 1200
    geom = Geometry(size=(nx, ny, nz), spacing=SPACING, origin=ORIGIN, direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    return ct, mask, geom


def _ras(arrays: list[np.ndarray], geom: Geometry) -> tuple[list[np.ndarray], Geometry]:
    """The same physical case stored RAS (x and y reversed), built by hand."""
    nx, ny, _ = geom.size
    origin = (geom.origin[0] + SPACING[0] * (nx - 1), geom.origin[1] + SPACING[1] * (ny - 1), geom.origin[2])
    g = Geometry(geom.size, geom.spacing, origin, (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    return [np.ascontiguousarray(a[:, ::-1, ::-1]) for a in arrays], g


def _sagittal_storage(arrays: list[np.ndarray], geom: Geometry) -> tuple[list[np.ndarray], Geometry]:
    """Stored with array axis 0 = patient x (left to right), rows = z (down), cols = y (anterior first)."""
    nx, ny, nz = geom.size
    out = [np.ascontiguousarray(a.transpose(2, 0, 1)[::-1, ::-1, :]) for a in arrays]   # (x rev, z rev, y)
    # native ITK axes: i -> y (+P), j -> z reversed (-S), k -> x reversed (-L)
    origin = (geom.origin[0] + SPACING[0] * (nx - 1), geom.origin[1], geom.origin[2] + SPACING[2] * (nz - 1))
    g = Geometry((ny, nz, nx), (SPACING[1], SPACING[2], SPACING[0]), origin,
                 (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    return out, g


def _storages() -> dict[str, tuple[np.ndarray, np.ndarray, Geometry]]:
    ct, mask, geom = _canonical()
    (ct_r, mask_r), g_r = _ras([ct, mask], geom)
    (ct_s, mask_s), g_s = _sagittal_storage([ct, mask], geom)
    return {"LPS": (ct, mask, geom), "RAS": (ct_r, mask_r, g_r), "sagittal": (ct_s, mask_s, g_s)}


def _red(png: np.ndarray) -> np.ndarray:
    return (png[..., 0] > 0.8) & (png[..., 1] < 0.3) & (png[..., 2] < 0.3)


def _panel_pixels(png: np.ndarray, rect: tuple[float, float, float, float]) -> tuple[slice, slice]:
    h, w = png.shape[:2]
    left, bottom, width, height = rect
    return (slice(int(round((1 - bottom - height) * h)), int(round((1 - bottom) * h))),
            slice(int(round(left * w)), int(round((left + width) * w))))


@pytest.mark.parametrize("storage", ["LPS", "RAS", "sagittal"])
def test_lesion_on_the_patients_left_is_drawn_on_the_viewers_right(tmp_path, storage: str) -> None:
    ct, mask, geom = _storages()[storage]
    labels, _ = lesion_instances(mask)
    only_left = np.zeros_like(mask)
    rows = lesion_rows("c", mask, ct, geom)
    left_id = max(rows, key=lambda r: r["x_mm"])["lesion_id"]         # LPS x grows to the patient's left
    only_left[labels == left_id] = 1
    path = write_preview(tmp_path / "p.png", ct, only_left, geom, title=f"case c ({storage})")
    png = mpimg.imread(path)
    panels = preview_panels(ct, only_left, geom)
    (fig_w, fig_h), rects = panel_layout(panels)
    assert png.shape[:2] == (round(fig_h * DPI), round(fig_w * DPI))
    assert 300 < png.shape[0] < 3000 and 200 < png.shape[1] < 3000
    red = _red(png)
    assert red.sum() > 20
    for name, rect, expect_right in (("coronal", rects[0], True), ("sagittal", rects[1], False)):
        rs, cs = _panel_pixels(png, rect)
        yy, xx = np.nonzero(red[rs, cs])
        assert yy.size, name
        height, width = rs.stop - rs.start, cs.stop - cs.start
        # superior up in both panels; coronal: patient's left on the viewer's right;
        # sagittal: the lesion is anterior, so on the viewer's left
        assert yy.mean() < 0.4 * height, name
        assert (xx.mean() > 0.6 * width) if expect_right else (xx.mean() < 0.4 * width), name


def test_every_storage_gives_the_same_picture(tmp_path) -> None:
    pictures = {storage: mpimg.imread(write_preview(tmp_path / f"{storage}.png", ct, mask, geom, title="case c"))
                for storage, (ct, mask, geom) in _storages().items()}
    # LPS and RAS storage number the lesions alike (both slice-major along z)
    np.testing.assert_array_equal(pictures["RAS"], pictures["LPS"])
    # sagittal storage numbers them in another raster order: the same outlines, other numbers
    np.testing.assert_array_equal(_red(pictures["sagittal"]), _red(pictures["LPS"]))


def test_panels_keep_the_physical_aspect_ratio() -> None:
    ct, mask, geom = _canonical()
    panels = preview_panels(ct, mask, geom)
    assert panels.coronal.shape == (SHAPE[0], SHAPE[2]) and panels.sagittal.shape == (SHAPE[0], SHAPE[1])
    (fig_w, fig_h), rects = panel_layout(panels)
    for rect, (cols_mm, rows_mm) in zip(rects, ((SHAPE[2] * SPACING[0], SHAPE[0] * SPACING[2]),
                                                 (SHAPE[1] * SPACING[1], SHAPE[0] * SPACING[2]))):
        assert (rect[2] * fig_w) / (rect[3] * fig_h) == pytest.approx(cols_mm / rows_mm)
    # the MIP shows the brightest voxel along each ray: lesion 1 (1200 HU) in the coronal view
    assert panels.coronal.max() == 1200 and panels.coronal_mask.sum() == 6 * 7 + 3 * 4


@pytest.mark.parametrize("storage", ["LPS", "RAS", "sagittal"])
def test_numbers_sit_at_the_lesions_csv_centroids(storage: str) -> None:
    ct, mask, geom = _storages()[storage]
    rows = lesion_rows("c", mask, ct, geom)
    labels, n = lesion_instances(mask)
    pos = label_positions(labels, geom)
    assert [p[0] for p in pos["coronal"]] == [r["lesion_id"] for r in rows] == [1, 2]
    # the row's physical centroid, as a canonical continuous index, projected by hand
    for r, (lid, ccol, crow), (_, scol, srow) in zip(rows, pos["coronal"], pos["sagittal"]):
        ix = (r["x_mm"] - ORIGIN[0]) / SPACING[0]
        iy = (r["y_mm"] - ORIGIN[1]) / SPACING[1]
        iz = (r["z_mm"] - ORIGIN[2]) / SPACING[2]
        assert (ccol, crow) == pytest.approx((ix, SHAPE[0] - 1 - iz))
        assert (scol, srow) == pytest.approx((iy, SHAPE[0] - 1 - iz))
    # lesion placement is storage-independent
    _, m0, g0 = _canonical()
    ref = label_positions(lesion_instances(m0)[0], g0)
    np.testing.assert_allclose(sorted(p[1:] for p in pos["coronal"]), sorted(p[1:] for p in ref["coronal"]),
                               atol=1e-9)


def test_title_and_file_mode(tmp_path) -> None:
    ct, mask, geom = _canonical()
    old = os.umask(0o002)
    try:
        with_title = write_preview(tmp_path / "a.png", ct, mask, geom, title="case_007  model unet  2 lesions")
    finally:
        os.umask(old)
    assert (with_title.stat().st_mode & 0o777) == 0o664
    without = write_preview(tmp_path / "b.png", ct, mask, geom, title="")
    a, b = mpimg.imread(with_title), mpimg.imread(without)
    band = slice(0, int(0.45 * DPI))                   # the title band above the panels
    bright = lambda img: (img[band, :, :3].min(axis=2) > 0.7).sum()  # noqa: E731 - white text pixels
    assert bright(a) > 50 and bright(b) == 0
    np.testing.assert_array_equal(a[int(0.6 * DPI):], b[int(0.6 * DPI):])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


def test_no_lesions_draws_no_outline(tmp_path) -> None:
    ct, mask, geom = _canonical()
    png = mpimg.imread(write_preview(tmp_path / "e.png", ct, np.zeros_like(mask), geom, title="no lesions"))
    assert not _red(png).any()
    assert label_positions(np.zeros(SHAPE, np.int32), geom) == {"coronal": [], "sagittal": []}


def test_radiological_axial() -> None:
    ct, mask, geom = _canonical()
    (ct_r,), g_r = _ras([ct], geom)
    k = 30
    np.testing.assert_array_equal(radiological_axial(ct[k], geom), ct[k])
    np.testing.assert_array_equal(radiological_axial(ct_r[k], g_r), ct[k])
    # lesion 1 (patient's left, anterior): right half of the columns, upper half of the rows
    shown = radiological_axial(np.ascontiguousarray(_ras([mask], geom)[0][0][k]), g_r)
    yy, xx = np.nonzero(shown)
    assert xx.mean() > SHAPE[2] / 2 and yy.mean() < SHAPE[1] / 2
    rgb = np.stack([ct_r[k]] * 3, axis=-1)
    assert radiological_axial(rgb, g_r).shape == (SHAPE[1], SHAPE[2], 3)
    (ct_s,), g_s = _sagittal_storage([ct], geom)
    with pytest.raises(ValueError, match="head-feet"):
        radiological_axial(ct_s[0], g_s)
