"""Canonical orientation: every storage order of one CT gives one canonical view."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from analysis.imaging.io import Geometry, array_to_image, read_array, write_array
from analysis.imaging.orientation import CANONICAL, Reorientation, canonical_geometry, from_canonical, to_canonical

# The physical case: canonical (LPS, identity direction) array and geometry.
SPACING_C = (0.7, 0.9, 2.5)          # x, y, z mm
ORIGIN_C = (-31.0, 12.5, 407.0)
SHAPE_C = (5, 7, 6)                  # (slices, rows, cols) = z, y, x


def _canonical() -> tuple[np.ndarray, Geometry]:
    rng = np.random.default_rng(3)
    arr = rng.integers(-1000, 2000, size=SHAPE_C).astype(np.int16)
    z, y, x = SHAPE_C
    return arr, Geometry(size=(x, y, z), spacing=SPACING_C, origin=ORIGIN_C,
                         direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


def _stored(axes: tuple[int, int, int], signs: tuple[int, int, int]) -> tuple[np.ndarray, Geometry]:
    """The canonical case stored with native ITK axis j running along patient axis axes[j] * signs[j].

    Built by hand (not with the code under test): native index i maps to canonical
    index c with c[axes[j]] = i[j] (or size - 1 - i[j] when signs[j] < 0).
    """
    arr_c, g = _canonical()
    size_c = np.array(g.size)
    size_n = tuple(int(size_c[axes[j]]) for j in range(3))
    native = np.empty(size_n[::-1], arr_c.dtype)
    for i in itertools.product(*(range(s) for s in size_n)):
        c = [0, 0, 0]
        for j in range(3):
            c[axes[j]] = i[j] if signs[j] > 0 else size_c[axes[j]] - 1 - i[j]
        native[i[::-1]] = arr_c[c[2], c[1], c[0]]
    first_c = [0.0, 0.0, 0.0]                        # canonical index of native voxel 0
    for j in range(3):
        first_c[axes[j]] = 0 if signs[j] > 0 else size_c[axes[j]] - 1
    origin = tuple(o + s * f for o, s, f in zip(g.origin, g.spacing, first_c))
    d = np.zeros((3, 3))
    for j in range(3):
        d[axes[j], j] = signs[j]
    geom = Geometry(size=size_n, spacing=tuple(g.spacing[axes[j]] for j in range(3)), origin=origin,
                    direction=tuple(float(v) for v in d.ravel()))
    return native, geom


STORAGES = {
    "LPS": ((0, 1, 2), (1, 1, 1)),
    "RAS": ((0, 1, 2), (-1, -1, 1)),
    "LAS": ((0, 1, 2), (1, -1, 1)),
    "PIL": ((1, 2, 0), (1, -1, 1)),          # x runs posterior, y inferior, z left (sagittal-like)
    "ASR-flipped": ((1, 2, 0), (-1, 1, -1)),
}
_rng = np.random.default_rng(11)
STORAGES["random"] = (tuple(int(a) for a in _rng.permutation(3)), tuple(int(s) for s in _rng.choice([-1, 1], 3)))


@pytest.mark.parametrize("name", sorted(STORAGES))
def test_every_storage_gives_the_same_canonical_view(name: str) -> None:
    arr_c, g_c = _canonical()
    native, g_n = _stored(*STORAGES[name])
    image = array_to_image(native, g_n)
    # the hand-built storage really is the same physical case
    for idx in [(0, 0, 0), (g_n.size[0] - 1, 1, 2), (1, g_n.size[1] - 1, g_n.size[2] - 1)]:
        point = image.TransformIndexToPhysicalPoint(idx)
        ref = array_to_image(arr_c, g_c)
        c_idx = ref.TransformPhysicalPointToIndex(point)
        assert image[idx] == ref[c_idx]
    oriented = to_canonical(image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(oriented), arr_c)
    assert Geometry.of(oriented).mismatch(g_c) is None
    r = Reorientation.of(g_n)
    np.testing.assert_array_equal(r.forward(native), arr_c)
    assert r.canonical_geometry.mismatch(g_c) is None
    assert canonical_geometry(g_n).mismatch(Geometry.of(oriented)) is None
    assert r.is_identity == (name == "LPS")
    assert not r.is_oblique and r.min_cosine == 1.0


@pytest.mark.parametrize("name", sorted(STORAGES))
def test_round_trip_and_physical_points(name: str, tmp_path) -> None:
    native, g_n = _stored(*STORAGES[name])
    r = Reorientation.of(g_n)
    canon = r.forward(native)
    np.testing.assert_array_equal(r.backward(canon), native)
    back = from_canonical(np.ascontiguousarray(canon), g_n)
    assert back.flags.c_contiguous
    np.testing.assert_array_equal(back, native)
    # index_forward: native voxel indices land on the same values in the canonical view
    rng = np.random.default_rng(1)
    idx = np.stack([rng.integers(s, size=10) for s in native.shape], axis=1)
    c = r.index_forward(idx).astype(int)
    np.testing.assert_array_equal(canon[c[:, 0], c[:, 1], c[:, 2]], native[idx[:, 0], idx[:, 1], idx[:, 2]])
    # a canonical-order result written with the native geometry sits where the canonical voxel is
    written, g_read = read_array(write_array(back, g_n, tmp_path / "back.nii.gz"))
    assert g_read.mismatch(g_n) is None
    img_n = array_to_image(written, g_read)
    img_c = array_to_image(np.ascontiguousarray(canon), r.canonical_geometry)
    rng = np.random.default_rng(0)
    for _ in range(20):
        cz, cy, cx = (int(rng.integers(s)) for s in canon.shape)
        p = img_c.TransformIndexToPhysicalPoint((cx, cy, cz))
        n_idx = img_n.TransformPhysicalPointToIndex(p)
        np.testing.assert_allclose(img_n.TransformIndexToPhysicalPoint(n_idx), p, atol=1e-6)
        assert img_n[n_idx] == canon[cz, cy, cx]


def test_channels_travel_with_the_volume() -> None:
    native, g_n = _stored(*STORAGES["PIL"])
    stacked = np.stack([native, -native], axis=-1)
    r = Reorientation.of(g_n)
    out = r.forward(stacked)
    np.testing.assert_array_equal(out[..., 0], r.forward(native))
    np.testing.assert_array_equal(out[..., 1], -r.forward(native))
    np.testing.assert_array_equal(r.backward(out), stacked)


def test_oblique_maps_to_the_nearest_axis_order_like_dicomorient() -> None:
    native, g_n = _stored(*STORAGES["RAS"])
    a = np.deg2rad(6.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, np.cos(a / 2), -np.sin(a / 2)], [0, np.sin(a / 2), np.cos(a / 2)]])
    d = tilt @ rot @ np.asarray(g_n.direction).reshape(3, 3)
    g_obl = Geometry(g_n.size, g_n.spacing, g_n.origin, tuple(float(v) for v in d.ravel()))
    image = array_to_image(native, g_obl)
    oriented = to_canonical(image)
    r = Reorientation.of(g_obl)
    np.testing.assert_array_equal(r.forward(native), sitk.GetArrayFromImage(oriented))
    assert r.canonical_geometry.mismatch(Geometry.of(oriented)) is None
    assert r.is_oblique is False and r.min_cosine == pytest.approx(np.cos(a) * np.cos(a / 2), abs=0.01)
    steep = Reorientation.of(Geometry(g_n.size, g_n.spacing, g_n.origin,
                                      tuple(float(v) for v in (np.array([[np.cos(0.3), -np.sin(0.3), 0],
                                                                          [np.sin(0.3), np.cos(0.3), 0],
                                                                          [0, 0, 1]])).ravel())))
    assert steep.is_oblique


def test_refuses_directions_without_a_nearest_axis_order() -> None:
    s = np.sqrt(0.5)
    # a 45-degree in-plane rotation: the x and y columns both lie halfway between L and P
    g = Geometry((3, 3, 3), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (s, s, 0.0, s, -s, 0.0, 0.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="distinct patient axes"):
        Reorientation.of(g)


def test_shape_mismatch_is_refused() -> None:
    native, g_n = _stored(*STORAGES["PIL"])
    r = Reorientation.of(g_n)
    with pytest.raises(ValueError, match="does not match"):
        r.forward(native[:-1])
    with pytest.raises(ValueError, match="canonical"):
        r.backward(native)  # native shape differs from the canonical one for PIL
    assert CANONICAL == "LPS"
