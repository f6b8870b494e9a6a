"""analysis.prediction.runner: the per-case pipeline both wings share, driven by a numpy stand-in for the
network whose answer depends on where the patient's right is (so a storage order reaching the
network unconverted shows), and the real readers and writers.

* the same CT stored LPS, RAS and as a DICOM series gives one mask in physical space;
* cropping to the body gives the uncropped result for a pixelwise network, and the network sees less;
* lesions.csv against an independent computation (scipy components, SimpleITK centroids);
* probability maps reproduce the mask; DICOM-SEG written and verified for DICOM input;
* a corrupt file among good ones is reported and skipped; finished cases are skipped on a rerun.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage

from analysis.errors import DataProblems, InputError
from analysis.imaging.io import Geometry, read_array, write_array
from analysis.prediction.folder import PredictionFolder
from analysis.prediction.probabilities import read_probability
from analysis.prediction.runner import Network, Outputs, lesion_tables, plan_inputs, run_cases, segment_canonical
from tests.test_dicom import hu_volume, write_ct

SHAPE = (6, 40, 48)


def phantom_ct(seed: int = 0) -> np.ndarray:
    """An ellipse of soft tissue in air with bright 'lesions' on both sides of the patient."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    ct = np.full(SHAPE, -1000.0, np.float32) + rng.normal(0, 5, SHAPE).astype(np.float32)
    body = ((y - 20) / 14) ** 2 + ((x - 24) / 18) ** 2 <= 1
    ct[body] = 40
    ct[1:4, 15:19, 12:16] = 900  # low column index: the patient's right in LPS storage
    ct[2:5, 22:25, 32:36] = 900  # the patient's left
    ct[4, 10, 24] = 900
    return ct


def right_only(volume: np.ndarray, z: np.ndarray, spacing_zyx) -> np.ndarray:
    """'Lesion' where HU > 500 on the patient's right half of the canonical view (LPS: columns
    run from the patient's right to left, so the right is the lower column index)."""
    sub = volume[z]
    p = np.where(sub > 500, 0.9, 0.05).astype(np.float32)
    cols = np.arange(sub.shape[2])
    # the right half in physical terms needs the full image: use the volume's own width
    p[..., cols >= volume.shape[2] // 2] = 0.05
    return p


def pixelwise(volume: np.ndarray, z: np.ndarray, spacing_zyx) -> np.ndarray:
    return np.where(volume[z] > 500, 0.9, 0.05).astype(np.float32)


LPS = Geometry(size=(48, 40, 6), spacing=(0.9, 0.8, 3.0), origin=(-10.0, 5.0, 2.5),
               direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))


def ras_copy(ct: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, Geometry]:
    """The same physical image stored RAS (direction diag(-1, -1, 1)), as many NIfTI writers do."""
    sx, sy, _ = geometry.spacing
    nx, ny, _ = geometry.size
    origin = (geometry.origin[0] + (nx - 1) * sx, geometry.origin[1] + (ny - 1) * sy, geometry.origin[2])
    return ct[:, ::-1, ::-1].copy(), Geometry(size=geometry.size, spacing=geometry.spacing, origin=origin,
                                              direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))


def _run(tmp_path: Path, images: Path, net: Network, outputs: Outputs = Outputs(), name: str = "out"):
    plan = plan_inputs(None, images, dicom_seg=outputs.dicom_seg)
    folder = PredictionFolder(tmp_path / name, {"test": name}, overwrite=False)
    done, failures, _ = run_cases(folder, plan.cases, net, outputs, strict=False)
    folder.finish({"model": name}, tables=lesion_tables())
    return folder.out, done, plan.failures + failures


def _lps(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS"))


def test_one_mask_whatever_the_storage_order(tmp_path):
    ct = phantom_ct()
    images = tmp_path / "images"
    write_array(ct, LPS, images / "lps_0000.nii.gz")
    ras, ras_geometry = ras_copy(ct, LPS)
    write_array(ras, ras_geometry, images / "ras.nii.gz")
    write_ct(images / "dicom" / "pt", np.rint(ct).astype(np.int16), spacing=(0.8, 0.9), step=3.0,
             origin=LPS.origin)
    net = Network(name="right", fingerprint="0", segment=right_only, crop=False)
    out, done, failures = _run(tmp_path, images, net)
    assert failures == [] and sorted(p["case"] for p in done) == ["dicom_pt", "lps", "ras"]
    masks = {c: _lps(out / f"{c}.nii.gz") for c in ("lps", "ras", "dicom_pt")}
    assert masks["lps"].sum() == 4 * 4 * 3  # only the right-side lesion
    assert (masks["lps"] == masks["ras"]).all() and (masks["lps"] == masks["dicom_pt"]).all()
    # each mask has exactly its input's geometry
    for case, src in (("ras", images / "ras.nii.gz"), ("lps", images / "lps_0000.nii.gz")):
        assert read_array(out / f"{case}.nii.gz")[1].mismatch(read_array(src)[1]) is None
    record = json.loads((out / ".parts" / "cases" / "ras.json").read_text(encoding="utf-8"))
    assert record["orientation"] == "LPS" and record["stored_axes"] != "identity"
    assert len(record["input"]["sha256"]) == 64
    dicom = json.loads((out / ".parts" / "cases" / "dicom_pt.json").read_text(encoding="utf-8"))["input"]["dicom"]
    assert dicom["n_slices"] == 6 and dicom["skipped"] == []


def test_without_canonical_orientation_the_stand_in_would_disagree():
    """The stand-in network is orientation-sensitive: on the raw RAS array it finds the other lesion."""
    ct = phantom_ct()
    ras, _ = ras_copy(ct, LPS)
    z = np.arange(SHAPE[0])
    assert not np.array_equal(right_only(ct, z, None) > 0.5, (right_only(ras, z, None) > 0.5)[:, ::-1, ::-1])


def test_crop_to_the_body_gives_the_uncropped_mask_and_shows_less(tmp_path):
    ct = np.full((6, 96, 96), -1000, np.float32)
    ct[:, 30:60, 30:66] = 40  # a small body in a wide field of view
    ct[1:4, 40:44, 35:40] = 900
    ct[3, 58, 64] = 900
    spacing = (3.0, 0.8, 0.9)
    full, seen_full, info_full = segment_canonical(Network("p", "0", segment=pixelwise, crop=False), ct, spacing)
    cropped, seen, info = segment_canonical(Network("p", "0", segment=pixelwise, stride=8, crop=True), ct, spacing)
    np.testing.assert_array_equal(full >= 0.5, cropped >= 0.5)
    assert info_full["pixel_fraction"] == 1.0 and info["pixel_fraction"] < 0.9 and info["boxes"] >= 1
    assert seen_full.all() and 0 < seen.mean() < 0.9 and not (cropped[~seen]).any()
    assert ((seen.sum(axis=0) > 0).sum(axis=1) % 8 == 0).all()  # boxes padded to the stride


def strided_blur(radius: int, stride: int):
    """A stand-in for a strided network of two 'same' layers: lesion evidence (HU above 700)
    plus a bias (so air is not 0 inside the network), summed over a (2 radius + 1)^2 window
    with zero padding at the input's edge, averaged over stride x stride blocks from the
    input's first row and column and repeated back (pooling and upsampling), then summed over
    the same window again. The input is padded to a multiple of the stride at its bottom and
    right, as the Keras segmenters do. Its receptive radius is 2 radius + stride - 1; its
    output depends on where the stride grid starts and, within that radius of the input's
    edge, on the zero padding there."""

    def segment(volume: np.ndarray, z: np.ndarray, spacing_zyx) -> np.ndarray:
        out = []
        for k in z:
            rows, cols = volume[k].shape
            x = np.pad(np.clip((volume[k] - 700.0) / 200.0, 0.0, 1.0) + 0.25, ((0, (-rows) % stride), (0, (-cols) % stride)))
            s = ndimage.uniform_filter(x, size=2 * radius + 1, mode="constant")
            h, w = s.shape
            s = np.repeat(np.repeat(s.reshape(h // stride, stride, w // stride, stride).mean(axis=(1, 3)), stride, 0),
                          stride, 1)
            s = ndimage.uniform_filter(s, size=2 * radius + 1, mode="constant")
            out.append(np.clip((s - 0.25) * 24.0, 0.0, 1.0)[:rows, :cols])
        return np.asarray(out, np.float32)

    return segment


def wide_field_of_view_ct() -> np.ndarray:
    """A body off-centre in a wide field of view, its box starting at an odd row and column."""
    ct = np.full((5, 150, 190), -1000, np.float32)
    ct[:, 41:99, 57:131] = 40  # body
    ct[:, 55:80, 70:110] = 400  # bone
    ct[1:4, 60:66, 75:83] = 900  # lesions, one of them at the body's edge
    ct[2, 42:46, 100:106] = 900
    return ct


def test_the_exact_crop_gives_the_whole_slice_output_where_the_approximate_one_does_not():
    ct = wide_field_of_view_ct()
    spacing = (3.0, 1.0, 1.0)
    segment = strided_blur(radius=4, stride=16)
    whole, _, _ = segment_canonical(Network("n", "0", segment=segment, crop=False), ct, spacing)
    context = 32  # the stand-in's receptive radius (23) rounded up to the stride
    exact = Network("n", "0", segment=segment, stride=16, crop=True, context=context)
    cropped, seen, info = segment_canonical(exact, ct, spacing, threshold=0.5)
    assert whole.max() > 0.5 and (whole >= 0.5).sum() > 20
    np.testing.assert_allclose(cropped[seen], whole[seen], atol=1e-6)  # kept part: the whole-slice output
    assert not whole[~seen].any()  # and nothing lies outside it
    assert info["mode"] == "exact" and info["context_px"] == context and info["pixel_fraction"] < 1.0
    assert info["check"]["max_abs_diff"] < 1e-6 and info["check"]["dice"] == 1.0
    # the crop window starts on the stride grid of the whole slice: the body box starts at odd row 41 - 10
    rows = np.flatnonzero(seen.any(axis=(0, 2)))
    assert rows[0] % 2 == 0 and rows[0] < 31
    # the approximate crop (no context) sees zero padding where the slice holds tissue: it differs
    approx = Network("n", "0", segment=segment, stride=16, crop=True)
    loose, _, info_a = segment_canonical(approx, ct, spacing, threshold=0.5)
    assert info_a["mode"] == "approximate"
    assert np.abs(loose - whole).max() > 0.01
    # a window off the stride grid would differ too: the same crop one pixel to the right
    shifted = np.abs(segment(ct[:, :, 1:], np.arange(5), spacing) - whole[:, :, 1:]).max()
    assert shifted > 0.01


def test_mirroring_averages_the_logits_of_four_passes():
    ct = wide_field_of_view_ct()
    spacing = (3.0, 1.0, 1.0)

    def lopsided(volume, z, spacing_zyx):  # not mirror-symmetric: more evidence to the right
        ramp = np.linspace(0.2, 0.8, volume.shape[2], dtype=np.float32)
        return np.broadcast_to(ramp, (len(z),) + volume.shape[1:]).copy()

    one, _, _ = segment_canonical(Network("n", "0", segment=lopsided, crop=False), ct, spacing)
    four, _, info = segment_canonical(Network("n", "0", segment=lopsided, crop=False, mirror=True), ct, spacing)
    logit = lambda p: np.log(p) - np.log1p(-p)  # noqa: E731
    expected = 1 / (1 + np.exp(-(logit(one) + logit(one[:, :, ::-1])) / 2))  # cols flipped in 2 of 4 passes
    np.testing.assert_allclose(four, expected, atol=1e-6)
    assert np.allclose(four, 0.5, atol=1e-6) and info["mirror_passes"] == 4
    # mirroring with the exact crop still gives the mirrored whole-slice output
    segment = strided_blur(radius=3, stride=8)
    whole, _, _ = segment_canonical(Network("n", "0", segment=segment, crop=False, mirror=True), ct, spacing)
    cropped, seen, info = segment_canonical(Network("n", "0", segment=segment, stride=8, crop=True, context=24,
                                                    mirror=True), ct, spacing)
    np.testing.assert_allclose(cropped[seen], whole[seen], atol=1e-5)
    assert info["check"]["max_abs_diff"] < 1e-3  # over the whole slice: outside the kept part the stand-in gives ~5e-5


def test_lesions_csv_against_scipy_and_simpleitk(tmp_path):
    ct = phantom_ct()
    images = tmp_path / "images"
    ras, ras_geometry = ras_copy(ct, LPS)
    write_array(ras, ras_geometry, images / "pt.nii.gz")
    net = Network(name="all", fingerprint="0", segment=pixelwise)
    out, _, _ = _run(tmp_path, images, net, Outputs(probabilities=True))
    rows = list(csv.DictReader(open(out / "lesions.csv", encoding="utf-8")))
    assert list(rows[0]) == ["case", "lesion_id", "voxels", "volume_ml", "x_mm", "y_mm", "z_mm", "z_first", "z_last",
                             "hu_mean", "hu_max", "score", "n_neighbours", "diffuse", "bone", "weight_bearing",
                             "long_axis_mm", "short_axis_mm", "off_bone"]  # added columns last: readers of the others are unchanged
    mask, geometry = read_array(out / "pt.nii.gz")
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    assert n == len(rows) == 3
    image = sitk.ReadImage(str(out / "pt.nii.gz"))
    expected = []
    for k in range(1, n + 1):
        zz, yy, xx = np.nonzero(labels == k)
        point = image.TransformContinuousIndexToPhysicalPoint((float(xx.mean()), float(yy.mean()), float(zz.mean())))
        expected.append((len(zz), *point, int(zz.min()), int(zz.max())))
    got = sorted((int(r["voxels"]), float(r["x_mm"]), float(r["y_mm"]), float(r["z_mm"]), int(r["z_first"]),
                  int(r["z_last"])) for r in rows)
    for g, e in zip(got, sorted(expected)):
        assert g[0] == e[0] and g[4:] == e[4:]
        np.testing.assert_allclose(g[1:4], e[1:4], atol=1e-6)
    assert all(float(r["score"]) == pytest.approx(0.9, abs=1 / 255) for r in rows)
    assert all(r["bone"] == "" and r["weight_bearing"] == "" and r["off_bone"] == "" for r in rows)
    patients = list(csv.DictReader(open(out / "patients.csv", encoding="utf-8")))
    assert patients[0]["case"] == "pt" and patients[0]["lesions"] == "3" and patients[0]["spine"] == ""
    prob = read_probability(out / "probabilities" / "pt.nii.gz")
    np.testing.assert_array_equal(prob >= 0.5, mask.astype(bool))
    assert (out / "preview" / "pt.png").stat().st_size > 1000


@pytest.mark.parametrize("layout", ["standard", "columns-anterior", "shuffled", "crowded"])
def test_dicom_seg_for_dicom_input_matches_lesions_csv(tmp_path, layout):
    from pydicom.uid import generate_uid

    from analysis.lesions import seg_lesion_centroids
    from tests.test_dicom import write_localizer

    images = tmp_path / "images"
    hu = hu_volume()
    hu[1:3, 3:6, 4:8] = 1200
    hu[4, 10:12, 14:17] = 1100
    iop = (1, 0, 0, 0, -1, 0) if layout in ("columns-anterior", "crowded") else (1, 0, 0, 0, 1, 0)
    write_ct(images / "pt1", hu, iop=iop, random_names=layout != "standard",
             shuffle_numbers=layout != "standard", seed=2)
    if layout == "crowded":  # localizers and a smaller second series beside it: only the chosen series is referenced
        write_localizer(images / "pt1", (0, 1, 0, 0, 0, -1), series_uid=generate_uid(), name="loc1.dcm")
        write_localizer(images / "pt1", (1, 0, 0, 0, 0, -1), series_uid=generate_uid(), name="loc2.dcm")
    net = Network(name="thr", fingerprint="abc", segment=lambda v, z, s: np.where(v[z] > 1000, 0.9, 0.0).astype(np.float32))
    out, done, failures = _run(tmp_path, images, net, Outputs(dicom_seg=True))
    assert failures == [] and done[0]["dicom_seg"]["written"] is True
    seg = pydicom.dcmread(out / "dicom_seg" / "pt1.dcm")
    source = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in (images / "pt1").iterdir()
              if not f.name.startswith("loc")}
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced <= source and seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    centroids = seg_lesion_centroids(out / "dicom_seg" / "pt1.dcm")
    rows = list(csv.DictReader(open(out / "lesions.csv", encoding="utf-8")))
    spacing = min(read_array(out / "pt1.nii.gz")[1].spacing)
    assert len(centroids) == len(rows) >= 1
    for c, r in zip(sorted(centroids), sorted((float(r["x_mm"]), float(r["y_mm"]), float(r["z_mm"])) for r in rows)):
        assert np.abs(np.subtract(c, r)).max() <= spacing / 2


def test_the_plan_knows_each_inputs_pixel_size_from_its_headers(tmp_path):
    # predict's memory check sizes a resampled case by it: (between rows, between columns) mm
    images = tmp_path / "images"
    write_ct(images / "pt1", hu_volume(), spacing=(0.7, 0.6))
    write_array(np.zeros(LPS.shape, np.int16), LPS, images / "pt2.nii.gz")
    plan = plan_inputs(None, images)
    assert plan.shapes["pt2"] == LPS.shape
    assert plan.pixel_mm["pt2"] == pytest.approx((0.8, 0.9))  # NIfTI spacing is (x, y, z)
    assert plan.pixel_mm["pt1"] == pytest.approx((0.7, 0.6))  # DICOM PixelSpacing is (row, column)


def test_dicom_seg_refused_for_nifti_input_before_any_work(tmp_path):
    write_array(phantom_ct(), LPS, tmp_path / "images" / "a.nii.gz")
    with pytest.raises(InputError, match="--dicom-seg: .* holds no DICOM series"):
        plan_inputs(None, tmp_path / "images", dicom_seg=True)


def test_a_corrupt_file_is_skipped_and_reported_and_a_rerun_skips_finished_cases(tmp_path):
    images = tmp_path / "images"
    write_array(phantom_ct(0), LPS, images / "a.nii.gz")
    write_array(phantom_ct(1), LPS, images / "c.nii.gz")
    (images / "b.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    nan = phantom_ct(2)
    nan[2, 3, 4] = np.nan
    write_array(nan, LPS, images / "d.nii.gz")
    calls = []

    def counting(volume, z, spacing):
        calls.append(1)
        return pixelwise(volume, z, spacing)

    net = Network(name="p", fingerprint="0", segment=counting)
    out, done, failures = _run(tmp_path, images, net)
    assert sorted(p["case"] for p in done) == ["a", "c"]
    assert len(failures) == 2 and any("b.nii.gz" in f for f in failures) and any("d.nii.gz" in f and "NaN" in f
                                                                                   for f in failures)
    assert not (out / "b.nii.gz").exists() and not (out / "d.nii.gz").exists()
    n = len(calls)
    folder = PredictionFolder(out, {"test": "out"}, overwrite=False)
    plan = plan_inputs(None, images)
    done, _, _ = run_cases(folder, plan.cases, net, Outputs(), strict=False)
    assert [p["case"] for p in done] == [] or all(p["case"] == "d" for p in done)
    assert len(calls) == n  # a and c were not run again


def test_a_run_killed_before_its_settings_leaves_a_folder_the_same_command_takes(tmp_path):
    # taking the lock creates .parts/.lock before the settings are written: a kill in between
    # must not make the rerun refuse the folder as "not written by a prediction"
    out = tmp_path / "OUT"
    (out / ".parts").mkdir(parents=True)
    (out / ".parts" / ".lock").write_text("", encoding="utf-8")
    (out / ".parts" / ".settings.json.k2j4.tmp").write_text("", encoding="utf-8")  # killed mid-write
    folder = PredictionFolder(out, {"test": "out"}, overwrite=False)
    assert folder.prepare(["a"]) == ["a"]
    assert json.loads((out / ".parts" / "settings.json").read_text(encoding="utf-8")) == {"test": "out"}
    other = tmp_path / "OTHER"  # anything else beside the bare lock is still a foreign folder
    (other / ".parts").mkdir(parents=True)
    (other / ".parts" / ".lock").write_text("", encoding="utf-8")
    (other / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(InputError, match="not written by a prediction"):
        PredictionFolder(other, {"test": "out"}, overwrite=False)


def test_every_input_failing_is_one_line_each(tmp_path):
    (tmp_path / "x.nii.gz").write_bytes(b"")
    with pytest.raises(DataProblems) as err:
        plan_inputs(None, tmp_path)
    assert "x.nii.gz" in err.value.problems[0] and "empty" in err.value.problems[0]


def test_detector_rows_come_in_the_stored_slice_order(tmp_path):
    ct = phantom_ct()
    flipped = Geometry(size=LPS.size, spacing=LPS.spacing, origin=(LPS.origin[0], LPS.origin[1], 2.5 + 5 * 3.0),
                       direction=(1, 0, 0, 0, 1, 0, 0, 0, -1))
    write_array(ct[::-1].copy(), flipped, tmp_path / "images" / "feet.nii.gz")
    write_array(ct, LPS, tmp_path / "images" / "head.nii.gz")
    net = Network(name="d", fingerprint="0", detect=lambda v: (v > 500).any(axis=(1, 2)).astype(np.float32))
    plan = plan_inputs(None, tmp_path / "images")
    folder = PredictionFolder(tmp_path / "det", {"d": 1}, overwrite=False)
    run_cases(folder, plan.cases, net, Outputs(), strict=False)
    folder.finish({}, slices_name="slices.csv")
    rows = list(csv.DictReader(open(tmp_path / "det" / "slices.csv", encoding="utf-8")))
    head = [float(r["probability"]) for r in rows if r["case"] == "head"]
    feet = [float(r["probability"]) for r in rows if r["case"] == "feet"]
    assert head == [0, 1, 1, 1, 1, 0] and feet == head[::-1]


def test_lesion_scores_are_probabilities_exactly(tmp_path):
    """A lesion whose map holds the top level 255 scores 1.0, not 255 x float32(1/255) = 1.0000000591."""
    images = tmp_path / "images"
    write_array(phantom_ct(), LPS, images / "pt.nii.gz")

    def certain(volume, z, spacing_zyx):
        return np.where(volume[z] > 500, 1.0, 0.0).astype(np.float32)

    out, done, failures = _run(tmp_path, images, Network("c", "0", segment=certain, crop=False),
                               Outputs(probabilities=True))
    assert not failures
    with open(out / "lesions.csv", encoding="utf-8", newline="") as fh:
        scores = [float(r["score"]) for r in csv.DictReader(fh)]
    assert scores and all(s == 1.0 for s in scores)
    import nibabel as nib

    stored = nib.load(out / "probabilities" / "pt.nii.gz")
    assert stored.get_fdata().max() > 1.0  # the float32 slope applied in float64 overshoots
    assert int(np.asarray(stored.dataobj.get_unscaled()).max()) == 255  # the stored level, as the README says
    assert read_probability(out / "probabilities" / "pt.nii.gz").max() == 1.0  # the project's reader clips


def test_components_in_air_or_lung_are_removed_and_counted(tmp_path):
    """A network that also calls an air pocket inside the body (and the air around it) lesion: the
    components whose median HU is below -500 are dropped from the mask and counted in predict.json."""
    from analysis.prediction.request import removed_in_air

    ct = phantom_ct()
    ct[2:5, 18:24, 20:28] = -850.0  # lung-like air inside the body: 3 x 6 x 8 voxels

    def bright_or_air(volume, z, spacing_zyx):
        return np.where((volume[z] > 500) | ((volume[z] < -800) & (volume[z] > -900)), 0.9, 0.05).astype(np.float32)

    images = tmp_path / "images"
    write_array(ct, LPS, images / "pt.nii.gz")
    out, done, failures = _run(tmp_path, images, Network(name="air", fingerprint="0", segment=bright_or_air,
                                                          crop=False), Outputs(preview=False))
    assert failures == []
    mask = read_array(out / "pt.nii.gz")[0]
    assert np.array_equal(mask, (ct > 500).astype(np.uint8))
    voxel_ml = 0.9 * 0.8 * 3.0 / 1000
    assert done[0]["removed_in_air"] == {"lesions": 1, "ml": pytest.approx(3 * 6 * 8 * voxel_ml)}
    summary = removed_in_air({p["case"]: p for p in done})
    assert summary["lesions"] == 1 and summary["cases"] == ["pt"]
    rows = list(csv.DictReader((out / "lesions.csv").open(encoding="utf-8")))
    assert len(rows) == 3 and all(float(r["hu_mean"]) > 500 for r in rows)
