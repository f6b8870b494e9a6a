"""Cropping to the body before the network."""
from __future__ import annotations

import numpy as np
import pytest

from analysis.imaging.body import body_box, body_mask, box_from_extent, crop, paste, slab_boxes

SPACING_XY = (0.8, 0.8)          # mm, (x, y)
SHAPE = (24, 160, 200)           # (slices, rows, cols)
# the body: an ellipse centred at (row 70, col 90), semi-axes 30 rows and 50 cols
CENTRE, SEMI = (70, 90), (30, 50)


def _phantom() -> np.ndarray:
    ct = np.full(SHAPE, -1000, np.int16)
    rr, cc = np.mgrid[:SHAPE[1], :SHAPE[2]]
    body = ((rr - CENTRE[0]) / SEMI[0]) ** 2 + ((cc - CENTRE[1]) / SEMI[1]) ** 2 <= 1
    ct[2:22, body] = 40
    ct[:, 140:146, 20:180] = 300                   # the table: a bright bar below the body, not touching
    ct[5, 10, 185] = 900                           # a noise speck
    return ct


def _extent(ct_body: np.ndarray, axis: int) -> tuple[int, int]:
    idx = np.flatnonzero(ct_body.any(axis=axis))
    return int(idx[0]), int(idx[-1]) + 1


def test_box_covers_the_body_and_margin_only() -> None:
    ct = _phantom()
    rows, cols = body_box(ct, spacing_xy=SPACING_XY, stride=1, margin_mm=(8.0, 4.0), pool=1)
    # the ellipse spans rows 40..100 and cols 40..140 (inclusive); margins 10 cols, 5 rows
    assert (rows.start, rows.stop) == (40 - 5, 101 + 5)
    assert (cols.start, cols.stop) == (40 - 10, 141 + 10)
    assert rows.stop <= 140                       # the table is left out
    # 2x pooling (the default) finds the same box or one voxel more per side
    pr, pc = body_box(ct, spacing_xy=SPACING_XY, stride=1, margin_mm=(8.0, 4.0))
    for got, exact in ((pr, rows), (pc, cols)):
        assert 0 <= exact.start - got.start <= 1 and 0 <= got.stop - exact.stop <= 1


@pytest.mark.parametrize("pool", [1, 2, 3])
def test_box_is_a_stride_multiple_around_the_tight_box(pool: int) -> None:
    ct = _phantom()
    tight_r, tight_c = body_box(ct, spacing_xy=SPACING_XY, stride=1, margin_mm=(8.0, 8.0), pool=1)
    rows, cols = body_box(ct, spacing_xy=SPACING_XY, stride=32, margin_mm=(8.0, 8.0), pool=pool)
    for got, tight in ((rows, tight_r), (cols, tight_c)):
        length = got.stop - got.start
        assert length % 32 == 0 and length - (tight.stop - tight.start) < 32 + 2 * pool
        assert got.start <= tight.start and got.stop >= tight.stop
    assert rows.stop <= SHAPE[1] and cols.stop <= SHAPE[2] and rows.start >= 0


def test_full_image_without_a_body_or_when_the_stride_multiple_does_not_fit() -> None:
    air = np.full((4, 40, 50), -1000, np.int16)
    assert body_box(air, spacing_xy=SPACING_XY, stride=16) == (slice(0, 40), slice(0, 50))
    assert not body_mask(air).any()
    ct = _phantom()
    # with the margin the body spans 81 rows and 121 cols; 192 fits the 200 cols, not the 160 rows
    rows, cols = body_box(ct, spacing_xy=SPACING_XY, stride=192, margin_mm=(8.0, 8.0), pool=1)
    assert rows == slice(0, 160)
    assert cols == slice(0, 192)


def test_box_from_extent_shifts_inside_the_image() -> None:
    assert box_from_extent(0, 10, 100, margin=0, stride=16) == slice(0, 16)
    assert box_from_extent(95, 100, 100, margin=2, stride=16) == slice(84, 100)
    assert box_from_extent(40, 50, 100, margin=3, stride=8) == slice(37, 53)
    assert box_from_extent(10, 90, 100, margin=0, stride=64) == slice(0, 100)


def test_slab_boxes_follow_the_body_slice_by_slice() -> None:
    ct = _phantom()
    ct[12:22, 60:80, 135:175] = 40                 # the body grows a lump in the upper slices
    boxes = slab_boxes(ct, 8, spacing_xy=SPACING_XY, stride=1, margin_mm=(0.0, 0.0), pool=1)
    assert [(b[0].start, b[0].stop) for b in boxes] == [(0, 8), (8, 16), (16, 24)]
    assert boxes[0][2] == slice(40, 141) and boxes[1][2] == slice(40, 175) and boxes[2][2] == slice(40, 175)
    whole = body_box(ct, spacing_xy=SPACING_XY, stride=1, margin_mm=(0.0, 0.0), pool=1)
    assert whole[1] == slice(40, 175)
    # a slab holding no body gets the full image
    air = np.full((10, 20, 30), -1000, np.int16)
    air[:5, 5:10, 5:10] = 0
    b = slab_boxes(air, 5, spacing_xy=SPACING_XY, stride=1, margin_mm=(0.0, 0.0), pool=1)
    assert b[1] == (slice(5, 10), slice(0, 20), slice(0, 30)) and b[0][1:] == (slice(5, 10), slice(5, 10))
    # 2x pooling is conservative: slice 4's body pools with slice 5, so slab 5:10 gets its box
    b = slab_boxes(air, 5, spacing_xy=SPACING_XY, stride=1, margin_mm=(0.0, 0.0))
    assert b[0][1:] == b[1][1:] == (slice(4, 10), slice(4, 10))


def test_paste_inverts_crop() -> None:
    rng = np.random.default_rng(0)
    full = rng.normal(size=SHAPE).astype(np.float32)
    box = body_box(_phantom(), spacing_xy=SPACING_XY, stride=16)
    c = crop(full, box)
    back = paste(c, box, full.shape)
    np.testing.assert_array_equal(back[:, box[0], box[1]], full[:, box[0], box[1]])
    assert back.sum() == pytest.approx(c.sum(), rel=1e-5)
    outside = np.ones(SHAPE, bool)
    outside[:, box[0], box[1]] = False
    assert not back[outside].any()
    # per-slab pasting into one output, with trailing channels
    two = np.stack([full, -full], axis=-1)
    out = np.zeros(two.shape, np.float32)
    for b in slab_boxes(_phantom(), 8, spacing_xy=SPACING_XY, stride=16):
        paste(crop(two, b), b, SHAPE, out=out)
    boxes = slab_boxes(_phantom(), 8, spacing_xy=SPACING_XY, stride=16)
    for b in boxes:
        np.testing.assert_array_equal(out[b], two[b])
    with pytest.raises(ValueError, match="does not match"):
        paste(c[:, 1:], box, SHAPE)


def test_air_the_body_encloses_is_body() -> None:
    """Lungs (-850 HU) and a bowel gas bubble (-1000 HU) inside the ellipse are body; the air
    around the patient, and a notch open to it, are not."""
    ct = _phantom()
    rr, cc = np.mgrid[:SHAPE[1], :SHAPE[2]]
    lung = ((rr - 65) / 15.0) ** 2 + ((cc - 70) / 15.0) ** 2 <= 1
    ct[4:20, lung] = -850
    ct[10, 80:84, 115:120] = -1000                  # gas, one slice
    ct[2:22, 68:72, 130:141] = -1000                # a notch reaching the ellipse's edge (col 140)
    mask = body_mask(ct, pool=1)
    assert mask[4:20][:, lung].all() and mask[10, 80:84, 115:120].all()
    assert not mask[2:22, 68:72, 131:141].any() and not mask[:, 0, :].any()
    assert not mask[0].any() and not mask[23].any()  # slices without body stay empty
    # without filling: only voxels above -500 HU; the same boxes either way
    bare = body_mask(ct, pool=1, fill_holes=False)
    assert not bare[4:20][:, lung].any() and (bare <= mask).all()
    assert body_box(ct, spacing_xy=SPACING_XY, stride=1, pool=1) == \
        body_box(np.where(mask, 40, -1000).astype(np.int16), spacing_xy=SPACING_XY, stride=1, pool=1)
