"""Per-lesion and per-patient tables for new patients."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from analysis.errors import InputError
from analysis.imaging.io import Geometry, array_to_image, write_array
from analysis.imaging.orientation import Reorientation
from analysis.lesions import BONE_NAMES, WEIGHT_BEARING_CODES
from analysis.prediction.tables import (LESION_COLUMNS, PATIENT_COLUMNS, bones_from, lesion_rows, patient_row,
                                        read_rows, write_rows)

# The reference storage: non-identity direction (y and z flipped), off-origin, anisotropic.
SPACING = (0.75, 1.1, 2.5)
ORIGIN = (-40.5, 22.0, 310.0)
DIRECTION = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0)
SHAPE = (12, 14, 16)


def _case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Geometry]:
    rng = np.random.default_rng(5)
    z, y, x = SHAPE
    geom = Geometry(size=(x, y, z), spacing=SPACING, origin=ORIGIN, direction=DIRECTION)
    ct = rng.normal(40, 20, SHAPE).astype(np.int16)
    bones = np.zeros(SHAPE, np.uint8)
    bones[:, 2:7, 2:7] = 2              # spine
    bones[:, 8:13, 9:15] = 4            # pelvis
    bones[0:3, 0:2, 10:16] = 5          # upper extremity
    ct[bones > 0] = 700
    mask = np.zeros(SHAPE, np.uint8)
    mask[1:4, 3:6, 3:6] = 1                         # in the spine
    mask[4, 6, 6] = 1                               # touches the first only diagonally: same lesion
    mask[8:11, 9:12, 10:14] = 1                     # in the pelvis
    mask[10:12, 10:12, 4] = 1                       # a thin one outside bone, near the pelvis one
    mask[0, 0, 12:14] = 1                           # in the upper extremity, first slice
    prob = np.where(mask > 0, rng.uniform(0.5, 1.0, SHAPE), rng.uniform(0, 0.4, SHAPE)).astype(np.float32)
    return mask, ct, prob, bones, geom


def _reference(mask: np.ndarray, ct: np.ndarray, prob: np.ndarray, geom: Geometry) -> list[dict]:
    """Independent computation: scipy labelling (full 3x3x3) and SimpleITK's index-to-point."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    image = array_to_image(ct, geom)
    out = []
    for i in range(1, n + 1):
        zz, yy, xx = np.nonzero(labels == i)
        point = image.TransformContinuousIndexToPhysicalPoint((float(xx.mean()), float(yy.mean()), float(zz.mean())))
        out.append({"voxels": len(zz), "volume_ml": len(zz) * np.prod(geom.spacing) / 1000,
                    "xyz": point, "z_first": int(zz.min()), "z_last": int(zz.max()),
                    "hu_mean": float(ct[labels == i].astype(float).mean()), "hu_max": float(ct[labels == i].max()),
                    "score": float(prob[labels == i].max())})
    return out


def test_lesion_rows_agree_with_an_independent_computation() -> None:
    mask, ct, prob, bones, geom = _case()
    rows = lesion_rows("c1", mask, ct, geom, probability=prob, bones=bones)
    assert all(tuple(r) == LESION_COLUMNS for r in rows)
    assert [r["lesion_id"] for r in rows] == [1, 2, 3, 4]
    ref = _reference(mask, ct, prob, geom)
    # scipy numbers components in its own raster order: match by voxel count and centroid
    ref_by_voxels = {r["voxels"]: r for r in ref}
    assert sorted(ref_by_voxels) == sorted(r["voxels"] for r in rows)
    for r in rows:
        e = ref_by_voxels[r["voxels"]]
        assert r["volume_ml"] == pytest.approx(e["volume_ml"], rel=1e-12)
        np.testing.assert_allclose((r["x_mm"], r["y_mm"], r["z_mm"]), e["xyz"], atol=1e-9)
        assert (r["z_first"], r["z_last"]) == (e["z_first"], e["z_last"])
        assert r["hu_mean"] == pytest.approx(e["hu_mean"], rel=1e-12)
        assert r["hu_max"] == e["hu_max"]
        assert r["score"] == pytest.approx(e["score"], rel=1e-7)
        assert r["case"] == "c1"
    by_voxels = {r["voxels"]: r for r in rows}
    spine, pelvis, thin, arm = by_voxels[28], by_voxels[36], by_voxels[4], by_voxels[2]
    assert (spine["bone"], spine["weight_bearing"]) == ("spine", True)
    assert (pelvis["bone"], pelvis["weight_bearing"]) == ("pelvis", True)
    assert (arm["bone"], arm["weight_bearing"]) == ("extremity", False)
    assert thin["bone"] == "unknown" and thin["weight_bearing"] is False
    # off bone: less than half of the voxels on the bone map (the thin one: none; the spine one: 28 of 28)
    assert thin["off_bone"] is True and not any(r["off_bone"] for r in (spine, pelvis, arm))
    # slice ranges [1,4], [8,10], [10,11], [0,0]: every gap is <= 10 slices
    assert [r["n_neighbours"] for r in rows] == [3, 3, 3, 3]
    # the thin lesion lies outside bone: it is the whole of its 2D region -> diffuse
    assert thin["diffuse"] is True
    assert spine["diffuse"] is False        # 9 of 25 spine pixels per slice


def test_neighbours_follow_analyze_with_a_small_cluster_gap() -> None:
    mask, ct, prob, bones, geom = _case()
    rows = {r["voxels"]: r for r in lesion_rows("c1", mask, ct, geom, bones=bones, cluster_slices=3)}
    # ranges: spine [1,4], pelvis [8,10], thin [10,11], arm [0,0]; gaps spine-arm 1,
    # spine-pelvis 4, pelvis-thin 0 (overlap), everything else > 3
    assert rows[28]["n_neighbours"] == 1      # arm
    assert rows[36]["n_neighbours"] == 1      # thin
    assert rows[4]["n_neighbours"] == 1       # pelvis
    assert rows[2]["n_neighbours"] == 1       # spine


def test_without_bones_and_probability_columns_are_empty() -> None:
    mask, ct, _, _, geom = _case()
    rows = lesion_rows("c1", mask, ct, geom)
    assert rows and all(r["bone"] is None and r["weight_bearing"] is None and r["score"] is None
                        and r["off_bone"] is None for r in rows)
    # the diffuse rule takes bone pixels from CT >= 150 HU then (here identical to the bone map)
    with_map = lesion_rows("c1", mask, ct, geom, bones=_case()[3])
    assert [r["diffuse"] for r in rows] == [r["diffuse"] for r in with_map]
    p = patient_row("c1", rows)
    assert p["weight_bearing"] is None and all(p[c] is None for c in ("skull", "spine", "rib", "pelvis",
                                                                       "extremity", "other", "unknown"))


def _restore(native: np.ndarray, target: Geometry) -> np.ndarray:
    return np.ascontiguousarray(Reorientation.of(target).backward(native))


def _restored_copy(arrays: list[np.ndarray], geom: Geometry, direction: tuple[float, ...]) -> tuple[list, Geometry]:
    """The same physical case stored with another axis-aligned direction (flips only)."""
    r = Reorientation.of(geom)
    canon = [r.forward(a) for a in arrays]
    g_c = r.canonical_geometry
    flips = np.diag(np.asarray(direction).reshape(3, 3)) < 0
    size = np.asarray(g_c.size)
    first = np.where(flips, size - 1, 0)
    origin = tuple(float(v) for v in np.asarray(g_c.origin) + np.asarray(g_c.spacing) * first)
    target = Geometry(g_c.size, g_c.spacing, origin, direction)
    return [_restore(c, target) for c in canon], target


@pytest.mark.parametrize("direction", [(-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0),    # RAS
                                       (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)])     # LPS
def test_storage_order_does_not_change_the_physical_answers(direction) -> None:
    mask, ct, prob, bones, geom = _case()
    (m2, c2, p2, b2), g2 = _restored_copy([mask, ct, prob, bones], geom, direction)
    a = lesion_rows("c", mask, ct, geom, probability=prob, bones=bones)
    b = lesion_rows("c", m2, c2, g2, probability=p2, bones=b2)
    assert len(a) == len(b) == 4
    # same physical voxels: the two copies agree at every voxel's physical point
    img_a, img_b = array_to_image(ct, geom), array_to_image(c2, g2)
    for idx in [(0, 0, 0), (3, 4, 5), (15, 13, 11), (7, 0, 9)]:
        point = img_a.TransformIndexToPhysicalPoint(idx)
        other = img_b.TransformPhysicalPointToIndex(point)
        assert img_b.TransformIndexToPhysicalPoint(other) == pytest.approx(point)
        assert img_b[other] == img_a[idx]
    for ra in a:
        rb = min(b, key=lambda r: np.hypot(r["x_mm"] - ra["x_mm"], r["y_mm"] - ra["y_mm"]) + abs(r["z_mm"] - ra["z_mm"]))
        np.testing.assert_allclose((rb["x_mm"], rb["y_mm"], rb["z_mm"]), (ra["x_mm"], ra["y_mm"], ra["z_mm"]), atol=1e-9)
        for col in ("voxels", "volume_ml", "hu_mean", "hu_max", "score", "bone", "weight_bearing", "diffuse",
                    "n_neighbours"):
            assert rb[col] == pytest.approx(ra[col]), col
        # the reference is stored z-flipped (direction z = -1); LPS/RAS copies store z upwards
        assert (rb["z_first"], rb["z_last"]) == (SHAPE[0] - 1 - ra["z_last"], SHAPE[0] - 1 - ra["z_first"])
    assert patient_row("c", a) == patient_row("c", b)


def test_bones_from_project_and_totalsegmentator_maps(tmp_path) -> None:
    mask, ct, _, bones, geom = _case()
    write_array(bones, geom, tmp_path / "project" / "c1.nii.gz")
    got = bones_from(tmp_path / "project" / "c1.nii.gz", "project", geom)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, bones)
    ts = np.zeros(SHAPE, np.uint8)
    ts[bones == 2] = 30             # a lumbar vertebra
    ts[bones == 4] = 77             # hip_left
    ts[bones == 5] = 69             # humerus_left
    ts[0, 13, 0] = 5                # liver: not bone
    write_array(ts, geom, tmp_path / "ts" / "c1.nii.gz")
    mapped = bones_from(tmp_path / "ts" / "c1.nii.gz", "totalsegmentator", geom)
    np.testing.assert_array_equal(mapped, bones)
    rows = lesion_rows("c1", mask, ct, geom, bones=mapped)
    assert sorted(r["bone"] for r in rows) == ["extremity", "pelvis", "spine", "unknown"]
    assert {c for c, name in BONE_NAMES.items() if name in ("spine", "pelvis")} <= WEIGHT_BEARING_CODES


def test_bones_from_refuses_a_bad_map(tmp_path) -> None:
    mask, ct, _, bones, geom = _case()
    shifted = Geometry(geom.size, geom.spacing, (geom.origin[0] + 1.0, *geom.origin[1:]), geom.direction)
    write_array(bones, shifted, tmp_path / "c1.nii.gz")
    with pytest.raises(InputError, match=r"c1\.nii\.gz: origin .* of the case's CT") as err:
        bones_from(tmp_path / "c1.nii.gz", "project", geom)
    assert "\n" not in str(err.value)
    ts = bones.astype(np.uint8) * 20
    write_array(ts, geom, tmp_path / "ts.nii.gz")
    with pytest.raises(InputError, match="totalsegmentator"):
        bones_from(tmp_path / "ts.nii.gz", "project", geom)
    with pytest.raises(InputError, match="kind"):
        bones_from(tmp_path / "ts.nii.gz", "bones", geom)  # type: ignore[arg-type]


def test_empty_mask() -> None:
    _, ct, prob, bones, geom = _case()
    empty = np.zeros(SHAPE, np.uint8)
    assert lesion_rows("c0", empty, ct, geom, probability=prob, bones=bones) == []
    p = patient_row("c0", [], has_bones=True)
    assert tuple(p) == PATIENT_COLUMNS
    assert (p["lesions"], p["volume_ml"], p["largest_ml"], p["diffuse"], p["weight_bearing"], p["spine"]) == \
        (0, 0.0, 0.0, 0, 0, 0)
    q = patient_row("c0", [])
    assert q["lesions"] == 0 and q["weight_bearing"] is None and q["unknown"] is None


def test_patient_row_counts() -> None:
    mask, ct, prob, bones, geom = _case()
    rows = lesion_rows("c1", mask, ct, geom, probability=prob, bones=bones)
    p = patient_row("c1", rows)
    vols = [r["volume_ml"] for r in rows]
    assert p["lesions"] == 4 and p["volume_ml"] == pytest.approx(sum(vols)) and p["largest_ml"] == max(vols)
    assert p["weight_bearing"] == 2
    assert p["diffuse"] == sum(r["diffuse"] for r in rows)
    assert (p["skull"], p["spine"], p["rib"], p["pelvis"], p["extremity"], p["other"], p["unknown"]) == \
        (0, 1, 0, 1, 1, 0, 1)
    with pytest.raises(ValueError, match="other cases"):
        patient_row("c2", rows)
    with pytest.raises(ValueError, match="has_bones"):
        patient_row("c1", rows, has_bones=False)


def test_csv_round_trip_and_resumable_parts(tmp_path) -> None:
    mask, ct, prob, bones, geom = _case()
    rows = lesion_rows("c1", mask, ct, geom, probability=prob, bones=bones)
    path = write_rows(tmp_path / "l.csv", LESION_COLUMNS, rows)
    text = path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == ",".join(LESION_COLUMNS)
    assert ",true," in text or ",false," in text
    back = read_rows(path, LESION_COLUMNS)
    assert len(back) == 4
    for a, b in zip(rows, back):
        for c in LESION_COLUMNS:
            if isinstance(a[c], float):
                assert b[c] == pytest.approx(a[c], rel=1e-9)
            else:
                assert b[c] == a[c], c
    # writing what was read gives the same file (formatting is a fixed point)
    assert write_rows(tmp_path / "l2.csv", LESION_COLUMNS, back).read_text(encoding="utf-8") == text


def test_read_rows_refuses_foreign_tables(tmp_path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("case,lesions\nc1,2\n", encoding="utf-8")
    with pytest.raises(InputError, match="bad.csv: header"):
        read_rows(bad, PATIENT_COLUMNS)
    good = write_rows(tmp_path / "p.csv", PATIENT_COLUMNS,
                      [dict(patient_row("c1", [], has_bones=True))])
    good.write_text(good.read_text(encoding="utf-8").replace("c1,0,", "c1,zero,"), encoding="utf-8")
    with pytest.raises(InputError, match="column lesions"):
        read_rows(good, PATIENT_COLUMNS)
