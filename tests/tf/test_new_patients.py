"""predict --images: new patients' CT as files and DICOM series, with the shared tiny RUNs.

* the same CT as an LPS NIfTI, a RAS NIfTI and a DICOM series (beside a localizer) gives one mask
  in physical space, with the body crop on;
* a folder mixing files and series folders, with a corrupt file: the good cases are written with
  their lesion table, patient row, preview and record, the bad one is one error line, exit 2;
* a SavedModel written by `export` gives the RUN's masks;
* mixed_bfloat16 gives the float32 probabilities within bfloat16's precision;
* --dicom-seg with NIfTI input is refused before any work;
* a training cohort mixing LPS- and RAS-stored cases caches the same arrays for both.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from analysis.cohort.examples import _ras, write_dicom_series
from analysis.cohort.layout import Cohort, write_dataset_json
from analysis.imaging.io import Geometry, read_array, write_array, write_mask
from tests.badinput import invoke
from tests.tf.infer_runs import shared_runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def lively(runs, tmp_path_factory):
    """The shared segmenter RUN with its output layer's bias zeroed and weights amplified, so its
    untrained answer varies over the image (a trained model's would; the lesion-prior bias of a
    fresh one keeps every probability near 0.02)."""
    import shutil

    import keras

    from bonemets_tf.run import read_run

    run = tmp_path_factory.mktemp("lively") / "run"
    shutil.copytree(runs.segmenter, run)
    model = read_run(run).load_model()
    last = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)][-1]
    kernel, bias = last.get_weights()
    last.set_weights([kernel * 20.0, np.zeros_like(bias)])
    model.save(run / "model.keras")
    return run


def _ct() -> tuple[np.ndarray, Geometry]:
    rng = np.random.default_rng(4)
    ct = np.full((6, 80, 96), -1000, np.float32) + rng.normal(0, 3, (6, 80, 96)).astype(np.float32)
    ct[:, 30:62, 26:70] = rng.normal(40, 20, (6, 32, 44))  # a body smaller than the field of view
    ct[1:4, 36:42, 30:36] = 900
    ct[2:5, 48:53, 54:60] = 700
    return np.rint(ct), Geometry(size=(96, 80, 6), spacing=(0.8, 0.8, 2.5), origin=(-20.0, -10.0, 30.0),
                                 direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))


def _lps(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS"))


def _predict(model, images, out, *extra):
    return invoke(["predict", "--model", model, "--images", images, "--out", out, *extra])


def test_lps_ras_and_dicom_storage_give_one_mask(lively, tmp_path):
    ct, geometry = _ct()
    images = tmp_path / "images"
    write_array(ct, geometry, images / "lps.nii.gz")
    write_array(*_ras(ct, geometry), images / "ras_0000.nii.gz")
    write_dicom_series(ct, geometry, images / "site" / "pt 7", patient_id="PT7")  # with a localizer
    r = _predict(lively, images, tmp_path / "out", "--probabilities", "--crop")  # the crop, too, is orientation-free
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    probs = {c: _lps(out / "probabilities" / f"{c}.nii.gz") for c in ("lps", "ras", "site_pt_7")}
    assert probs["lps"].std() > 0.01  # the (untrained) network's answer varies over the image
    assert (probs["lps"] == probs["ras"]).all() and (probs["lps"] == probs["site_pt_7"]).all()
    t = float(np.quantile(probs["lps"], 0.8))  # a cut that gives a mask with something in it
    r = _predict(lively, images, tmp_path / "cut", "--threshold", f"{t:.4f}", "--crop")
    assert r.exit_code == 0, r.output
    masks = {c: _lps(tmp_path / "cut" / f"{c}.nii.gz") for c in ("lps", "ras", "site_pt_7")}
    assert masks["lps"].any() and masks["lps"].sum() < masks["lps"].size
    assert (masks["lps"] == masks["ras"]).all() and (masks["lps"] == masks["site_pt_7"]).all()
    record = json.loads((out / "predict.json").read_text(encoding="utf-8"))
    assert record["cases"] == ["lps", "ras", "site_pt_7"] and record["orientation"] == "LPS"
    dicom = record["per_case"]["site_pt_7"]["input"]["dicom"]
    assert dicom["n_slices"] == 6 and [s["reason"] for s in dicom["skipped"]] == ["localizer"]
    assert all(len(record["per_case"][c]["input"]["sha256"]) == 64 for c in record["cases"])
    crop = record["per_case"]["lps"]["crop"]  # the body crop was on (--crop): exact, and checked
    assert crop["mode"] == "exact" and crop["boxes"] >= 1 and crop["check"]["max_abs_diff"] <= 1e-4
    assert record["request"]["crop"] is True and record["crop"] is True


def test_a_mixed_folder_with_a_corrupt_file(runs, tmp_path):
    ct, geometry = _ct()
    images = tmp_path / "images"
    write_array(ct, geometry, images / "good.nii.gz")
    (images / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    write_dicom_series(ct, geometry, images / "pacs" / "p2", patient_id="P2", localizer=False)
    r = _predict(runs.segmenter, images, tmp_path / "out", "--probabilities")
    assert r.exit_code == 2
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.nii.gz" in errors[0] and "Traceback" not in r.output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["good.nii.gz", "pacs_p2.nii.gz"]
    lesions = list(csv.DictReader(open(out / "lesions.csv", encoding="utf-8")))
    patients = list(csv.DictReader(open(out / "patients.csv", encoding="utf-8")))
    assert [p["case"] for p in patients] == ["good", "pacs_p2"]
    for p in patients:
        assert int(p["lesions"]) == sum(1 for r in lesions if r["case"] == p["case"])
    assert {p.name for p in (out / "preview").iterdir()} == {"good.png", "pacs_p2.png"}
    mask, _ = read_array(out / "good.nii.gz")
    prob, _ = read_array(out / "probabilities" / "good.nii.gz")
    np.testing.assert_array_equal(prob >= 0.5, mask.astype(bool))  # the mask is the map at the threshold
    record = json.loads((out / "predict.json").read_text(encoding="utf-8"))
    assert len(record["failed"]) == 1 and "broken.nii.gz" in record["failed"][0]
    again = _predict(runs.segmenter, images, tmp_path / "out", "--probabilities")  # finished cases are skipped
    assert again.exit_code == 2
    assert json.loads((out / "predict.json").read_text(encoding="utf-8"))["runs"][-1]["cases_run"] == []


def test_a_savedmodel_gives_the_runs_masks(runs, tmp_path):
    ct, geometry = _ct()
    write_array(*_ras(ct, geometry), tmp_path / "images" / "pt.nii.gz")
    assert invoke(["export", "--model", runs.segmenter, "--out", tmp_path / "sm"]).exit_code == 0
    for model, out in ((runs.segmenter, "a"), (tmp_path / "sm", "b")):
        r = _predict(model, tmp_path / "images", tmp_path / out)
        assert r.exit_code == 0, r.output
    assert (read_array(tmp_path / "a" / "pt.nii.gz")[0] == read_array(tmp_path / "b" / "pt.nii.gz")[0]).all()
    record = json.loads((tmp_path / "b" / "predict.json").read_text(encoding="utf-8"))
    assert record["model"]["kind"] == "savedmodel" and len(record["model"]["fingerprint"]) == 16


def test_bfloat16_probabilities_agree_with_float32(runs, tmp_path):
    ct, geometry = _ct()
    write_array(ct, geometry, tmp_path / "images" / "pt.nii.gz")
    for precision in ("float32", "mixed_bfloat16"):
        r = _predict(runs.segmenter, tmp_path / "images", tmp_path / precision, "--probabilities",
                     "--precision", precision)
        assert r.exit_code == 0, r.output
    f32 = read_array(tmp_path / "float32" / "probabilities" / "pt.nii.gz")[0]
    bf16 = read_array(tmp_path / "mixed_bfloat16" / "probabilities" / "pt.nii.gz")[0]
    assert np.abs(f32 - bf16).max() <= 0.05  # bfloat16 keeps 8 bits of mantissa
    assert json.loads((tmp_path / "mixed_bfloat16" / "predict.json").read_text(encoding="utf-8"))["precision"] == \
        "mixed_bfloat16"


def test_dicom_seg_with_nifti_input_is_refused_before_any_work(runs, tmp_path):
    ct, geometry = _ct()
    write_array(ct, geometry, tmp_path / "pt.nii.gz")
    r = _predict(runs.segmenter, tmp_path / "pt.nii.gz", tmp_path / "out", "--dicom-seg")
    assert r.exit_code == 2 and "--dicom-seg" in r.output and "no DICOM series" in r.output
    assert not (tmp_path / "out").exists()


def test_a_cohort_mixing_lps_and_ras_storage_trains_on_one_orientation(tmp_path):
    from bonemets_tf.cache import ensure_cached

    ct, geometry = _ct()
    label = (ct > 600).astype(np.uint8)
    cohort = Cohort(tmp_path / "ds")
    write_array(ct, geometry, cohort.image_path("lps"))
    write_mask(label, geometry, cohort.label_path("lps"))
    ras_ct, ras_geometry = _ras(ct, geometry)
    write_array(ras_ct, ras_geometry, cohort.image_path("ras"))
    write_mask(_ras(label, geometry)[0], ras_geometry, cohort.label_path("ras"))
    write_dataset_json(tmp_path / "ds", 2)
    a, b = ensure_cached(cohort, ["lps", "ras"], tmp_path / "cache")
    np.testing.assert_array_equal(np.asarray(a.ct()), np.asarray(b.ct()))
    np.testing.assert_array_equal(np.asarray(a.mask()), np.asarray(b.mask()))
    assert a.positive == b.positive
    meta = json.loads((b.folder / "meta.json").read_text(encoding="utf-8"))
    assert meta["orientation"] == "LPS"


def test_gradcam_on_new_patients_is_the_same_whatever_the_storage(runs, tmp_path):
    ct, geometry = _ct()
    write_array(ct, geometry, tmp_path / "images" / "lps.nii.gz")
    flipped = sitk.Flip(sitk.ReadImage(str(tmp_path / "images" / "lps.nii.gz")), [True, True, True])  # same physics
    sitk.WriteImage(flipped, str(tmp_path / "images" / "flipped.nii.gz"))
    r = invoke(["gradcam", "--model", runs.detector, "--images", tmp_path / "images", "--out", tmp_path / "cam",
                "--max-slices", "2"])
    assert r.exit_code == 0, r.output
    heat = {c: _lps(tmp_path / "cam" / f"{c}_gradcam.nii.gz") for c in ("lps", "flipped")}
    np.testing.assert_allclose(heat["lps"], heat["flipped"], atol=1e-5)
    rows = list(csv.DictReader(open(tmp_path / "cam" / "gradcam.csv", encoding="utf-8")))
    by_case = {c: sorted(int(r["slice"]) for r in rows if r["case"] == c) for c in ("lps", "flipped")}
    assert by_case["flipped"] == sorted(5 - z for z in by_case["lps"])  # the stored files' own slice numbers
