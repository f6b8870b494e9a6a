"""predict: NIfTI masks with the CT's geometry, slices.csv, the cascade, shards, errors."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis.cohort.layout import Cohort, write_dataset_json
from analysis.errors import InputError
from analysis.imaging.io import read_array, read_header, write_array
from analysis.imaging.orientation import Reorientation
from analysis.prediction.folder import remove_components_in_air, remove_small_components
from analysis.prediction.shards import parse_shard, shard_cases
from bonemets_tf.inference import Predictor, check_memory, context_batch, context_indices, estimate_case_bytes
from bonemets_tf.predict import PredictOptions, predict
from bonemets_tf.run import read_run
from tests.tf.infer_runs import oblique_geometry, shared_runs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def seg(runs):
    return Predictor(read_run(runs.segmenter))


@pytest.fixture(scope="module")
def det(runs):
    return Predictor(read_run(runs.detector))


def _volumes(dataset: Path) -> dict[str, np.ndarray]:
    """Each case's CT in the canonical view the networks see (LPS; the oblique cohort is stored z-flipped)."""
    cohort = Cohort(dataset)
    out = {}
    for c in cohort.cases():
        volume, geometry = read_array(cohort.image_path(c))
        out[c] = np.ascontiguousarray(Reorientation.of(geometry).forward(volume.astype(np.float32)))
    return out


def _stored(dataset: Path, case: str, canonical: np.ndarray) -> np.ndarray:
    """A canonical array back in the case's stored order."""
    return Reorientation.of(read_header(Cohort(dataset).image_path(case))).backward(canonical)


# --- pure helpers --------------------------------------------------------------------


def test_context_indices_repeat_edge_slices():
    assert context_indices(np.array([0, 1, 4]), 5, 3).tolist() == [[0, 0, 1], [0, 1, 2], [3, 4, 4]]
    assert context_indices(2, 5, 5).tolist() == [0, 1, 2, 3, 4]
    assert context_indices(np.array([0]), 1, 3).tolist() == [[0, 0, 0]]


def test_context_batch_matches_training_slice_store(runs, tmp_path):
    """Same neighbours, same channel order as the training pipeline's SliceStore."""
    from bonemets_tf.cache import ensure_cached
    from bonemets_tf.data import SliceStore

    cohort = Cohort(runs.oblique_dataset)
    case = cohort.cases()[0]
    store = SliceStore(ensure_cached(cohort, [case], tmp_path / "cache"), context=3, store="memory")
    volume = _volumes(runs.oblique_dataset)[case]  # the cache holds the canonical view
    ours = context_batch(volume, range(volume.shape[0]), 3)
    for z in range(volume.shape[0]):
        np.testing.assert_array_equal(ours[z], store.read(np.int64(z))[0].numpy())


def test_remove_small_components_uses_26_connectivity():
    mask = np.zeros((3, 6, 6), np.uint8)
    mask[0, 0, 0] = 1                            # 1 voxel
    mask[0, 4, 4] = mask[1, 5, 5] = 1            # 2 voxels touching only at a corner (26-connected)
    mask[2, 0:2, 3:5] = 1                        # 4 voxels
    out = remove_small_components(mask, 2)
    assert out.dtype == np.uint8
    assert out[0, 0, 0] == 0 and out[0, 4, 4] == out[1, 5, 5] == 1 and out[2, 0:2, 3:5].all()
    assert int(out.sum()) == 6
    assert int(remove_small_components(mask, 3).sum()) == 4
    np.testing.assert_array_equal(remove_small_components(mask, 0), mask)


def test_shards_are_disjoint_and_cover_the_cases():
    cases = [f"c{i}" for i in (5, 1, 9, 3, 7, 2, 8)]
    parts = [shard_cases(cases, (i, 3)) for i in range(3)]
    assert parts[0] == ["c1", "c5", "c9"]  # sorted: c1 c2 c3 c5 c7 c8 c9, [0::3]
    assert sorted(sum(parts, [])) == sorted(cases)
    assert len(set(sum(parts, []))) == len(cases)
    assert parse_shard("1/3") == (1, 3) and parse_shard(None) is None
    for bad in ("3/3", "-1/3", "1", "a/b", "0/0"):
        with pytest.raises(InputError, match="--shard"):
            parse_shard(bad)


def test_memory_estimate_refuses_what_cannot_fit():
    small = estimate_case_bytes((10, 64, 64), task="segment", context=1, batch_size=1, first_filters=16,
                                image_size=32, stride=8, params=0)
    # 9 B/voxel volume + float32 input + 8 x 16 float32 activations per (padded) pixel
    assert small == 9 * 10 * 64 * 64 + 4 * 64 * 64 + 4 * 64 * 64 * 8 * 16
    assert estimate_case_bytes((10, 64, 64), task="segment", context=1, batch_size=4, first_filters=16,
                               image_size=32, stride=8, params=0) > small
    # a 0.5 mm CT for a 1 mm model: the network sees a quarter of the pixels, plus the resampled copy
    coarse = estimate_case_bytes((10, 64, 64), task="segment", context=1, batch_size=1, first_filters=16,
                                 image_size=32, stride=8, params=0, network_rc=(32, 32))
    assert coarse == 9 * 10 * 64 * 64 + 8 * 10 * 32 * 32 + 4 * 32 * 32 + 4 * 32 * 32 * 8 * 16
    # a 2 mm CT for a 1 mm model: four times the pixels, so more than as stored
    assert estimate_case_bytes((10, 64, 64), task="segment", context=1, batch_size=1, first_filters=16,
                               image_size=32, stride=8, params=0, network_rc=(128, 128)) > 4 * small
    with pytest.raises(InputError, match="GiB"):
        check_memory(10 ** 16, "case x")
    check_memory(1, "case x")


# --- the command -----------------------------------------------------------------------


def test_segmenter_masks_keep_the_ct_geometry_and_match_the_model(runs, seg, tmp_path):
    out = predict(runs.segmenter, runs.oblique_dataset, tmp_path / "PRED" / "unet",
                  options=PredictOptions(cases="all", batch_size=3, crop=False, resample=False))
    cohort = Cohort(runs.oblique_dataset)
    geometry = oblique_geometry()
    for case, volume in _volumes(runs.oblique_dataset).items():
        mask, got = read_array(out / f"{case}.nii.gz")
        assert read_header(cohort.image_path(case)).mismatch(got) is None
        assert got.mismatch(geometry) is None and got.direction != (1, 0, 0, 0, 1, 0, 0, 0, 1)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        expected = _stored(runs.oblique_dataset, case, seg(context_batch(volume, range(volume.shape[0]), 3)) >= 0.5)
        np.testing.assert_array_equal(mask, expected)
    record = json.loads((out / "predict.json").read_text(encoding="utf-8"))
    assert record["mode"] == "segment" and record["model"]["arch"] == "unet" and record["model"]["context"] == 3
    assert record["slices"] == {"total": 10, "skipped": 0, "skipped_fraction": 0.0}
    assert record["timing"]["network_slices"] == 10 and record["timing"]["slices_per_s"] > 0


def test_the_model_runs_at_its_training_spacing(runs, seg, tmp_path):
    """The segmenter RUN was trained on 1 mm pixels (config.json records it); the oblique cohort's
    canonical slices have 0.7-0.9 mm pixels: predict resamples each slice to 1 mm, runs the model
    there and brings the probabilities back linearly (the runner's own steps, redone here by hand)."""
    from analysis.prediction.runner import from_network_grid, network_grid, to_network_grid
    from bonemets_tf.run import read_run

    spacing, source = read_run(runs.segmenter).training_spacing()
    assert spacing == (1.0, 1.0) and source.startswith("config.json: median over the")
    out = predict(runs.segmenter, runs.oblique_dataset, tmp_path / "r", options=PredictOptions(cases="all"))
    record = json.loads((out / "predict.json").read_text(encoding="utf-8"))
    assert record["model"]["spacing_xy_mm"] == [1.0, 1.0]
    assert record["budget"]["spacing_xy_mm"] == [1.0, 1.0]  # what analyze compares with nnU-Net's plan spacing
    assert record["inference"]["spacing"]["resample"] is True
    assert record["inference"]["spacing"]["model"]["used"] == "model's"
    for case, volume in _volumes(runs.oblique_dataset).items():
        header = read_header(Cohort(runs.oblique_dataset).image_path(case))
        zyx = Reorientation.of(header).canonical_spacing_zyx
        grid = network_grid(volume.shape, zyx, spacing)
        assert grid.resampled and record["per_case"][case]["spacing"]["resampled"] is True
        on_grid = to_network_grid(volume, grid)
        probs, seen = from_network_grid(seg(context_batch(on_grid, range(volume.shape[0]), 3)),
                                        np.ones(on_grid.shape, bool), volume.shape[1:], grid)
        assert seen.all()
        mask = read_array(out / f"{case}.nii.gz")[0]
        np.testing.assert_array_equal(mask, _stored(runs.oblique_dataset, case, probs >= 0.5))


def test_threshold_and_min_size_shape_the_mask(runs, seg, tmp_path):
    case = Cohort(runs.oblique_dataset).cases()[0]
    volume = _volumes(runs.oblique_dataset)[case]
    probs = seg(context_batch(volume, range(volume.shape[0]), 3))
    threshold = float(np.quantile(probs, 0.9))  # about 10% of voxels are lesion
    out = predict(runs.segmenter, runs.oblique_dataset, tmp_path / "p",
                  options=PredictOptions(cases=case, threshold=threshold, min_size=4, crop=False,
                                         resample=False))
    mask = read_array(out / f"{case}.nii.gz")[0]
    # --min-size, then the components whose median HU is air's (the cohort's HU are random, -1000..1500)
    kept, in_air = remove_components_in_air(remove_small_components(probs >= threshold, 4), volume)
    np.testing.assert_array_equal(mask, _stored(runs.oblique_dataset, case, kept))
    assert 0 < mask.sum() <= (probs >= threshold).sum()
    record = json.loads((out / "predict.json").read_text(encoding="utf-8"))
    assert record["per_case"][case]["removed_in_air"]["lesions"] == in_air.size
    assert record["removed_in_air"]["lesions"] == in_air.size


def test_detector_slices_csv_covers_every_slice(runs, det, tmp_path):
    out = predict(runs.detector, runs.oblique_dataset, tmp_path / "PRED" / "resnet34",
                  options=PredictOptions(cases="all", batch_size=4, resample=False))
    rows = list(csv.DictReader((out / "slices.csv").open(encoding="utf-8")))
    volumes = _volumes(runs.oblique_dataset)
    assert list(rows[0]) == ["case", "slice", "probability"]
    assert sorted((r["case"], int(r["slice"])) for r in rows) == sorted(
        (c, z) for c, v in volumes.items() for z in range(v.shape[0]))
    for case, volume in volumes.items():  # rows in the stored slice order (the oblique cohort is z-flipped)
        got = np.array([float(r["probability"]) for r in rows if r["case"] == case])
        np.testing.assert_allclose(got, det(context_batch(volume, range(volume.shape[0]), 1))[::-1], atol=1e-5)
    assert not list(out.glob("*.nii.gz"))


def test_cascade_segments_only_detected_slices(runs, seg, det, tmp_path):
    volumes = _volumes(runs.oblique_dataset)
    det_probs = {c: det(context_batch(v, range(v.shape[0]), 1)) for c, v in volumes.items()}
    cut = float(np.median(np.concatenate(list(det_probs.values()))))
    common = dict(cases="all", threshold=0.0, crop=False, resample=False)  # threshold 0: every segmented pixel is 1
    out = predict(runs.segmenter, runs.oblique_dataset, tmp_path / "cascade", detector=runs.detector,
                  options=PredictOptions(detector_threshold=cut, **common))
    skipped = 0
    for case, probs in det_probs.items():
        mask = read_array(out / f"{case}.nii.gz")[0][::-1]  # stored z-flipped: back to the canonical slices
        detected = probs >= cut
        assert mask[detected].all() and not mask[~detected].any()
        skipped += int((~detected).sum())
    assert 0 < skipped < 10
    record = json.loads((out / "predict.json").read_text(encoding="utf-8"))
    assert record["mode"] == "cascade" and record["detector"]["arch"] == "resnet34"
    assert record["detector_threshold"] == cut and record["slices"]["skipped"] == skipped
    assert (out / "detector_slices.csv").is_file() and not (out / "slices.csv").exists()

    none = predict(runs.segmenter, runs.oblique_dataset, tmp_path / "none", detector=runs.detector,
                   options=PredictOptions(detector_threshold=1.5, **common))
    assert all(read_array(none / f"{c}.nii.gz")[0].sum() == 0 for c in volumes)
    assert json.loads((none / "predict.json").read_text(encoding="utf-8"))["slices"]["skipped_fraction"] == 1.0


def test_shard_writes_only_its_cases(runs, tmp_path):
    out = predict(runs.detector, runs.oblique_dataset, tmp_path / "s1",
                  options=PredictOptions(cases="all", shard=(1, 2)))
    rows = list(csv.DictReader((out / "slices.csv").open(encoding="utf-8")))
    assert {r["case"] for r in rows} == {"obl_01"}
    assert json.loads((out / "predict.json").read_text(encoding="utf-8"))["shard"] == {"index": 1, "count": 2}


def test_refuses_bad_inputs_before_writing(runs, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match="not a RUN folder"):
        predict(tmp_path, runs.oblique_dataset, out)
    with pytest.raises(InputError, match="needs a segmenter"):
        predict(runs.detector, runs.oblique_dataset, out, detector=runs.detector)
    with pytest.raises(InputError, match="expected a detector"):
        predict(runs.segmenter, runs.oblique_dataset, out, detector=runs.segmenter)
    with pytest.raises(InputError, match="unknown case"):
        predict(runs.segmenter, runs.oblique_dataset, out, options=PredictOptions(cases="nope"))
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("x", encoding="utf-8")
    with pytest.raises(InputError, match="--overwrite"):
        predict(runs.detector, runs.oblique_dataset, out, options=PredictOptions(cases="all"))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_nan_ct_leaves_no_output(runs, tmp_path):
    ds = tmp_path / "ds"
    cohort = Cohort(ds)
    geometry = oblique_geometry((3, 16, 16))
    for i, bad in enumerate((False, True)):
        ct = np.zeros((3, 16, 16), np.float32)
        if bad:
            ct[1, 2, 3] = np.nan
        write_array(ct, geometry, cohort.image_path(f"c{i}"))
        write_array(np.zeros((3, 16, 16), np.uint8), geometry, cohort.label_path(f"c{i}"))
    write_dataset_json(ds, 2)
    with pytest.raises(InputError, match="NaN"):
        predict(runs.detector, ds, tmp_path / "PRED" / "x", options=PredictOptions(cases="all"))
    assert not (tmp_path / "PRED").exists()  # refused while validating: nothing created, not even a temp folder


def test_cli_bad_run_folder_is_one_line_exit_2(runs, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "predict", "--model", str(tmp_path),
                           "--dataset", str(runs.oblique_dataset), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, encoding="utf-8", errors="replace")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path}: not a RUN folder (expected model.keras and config.json from `train` or a SavedModel from `export`)"
    assert not (tmp_path / "o").exists()


def test_inference_modules_never_import_torch():
    code = ("import sys; import bonemets_tf.predict, bonemets_tf.gradcam, bonemets_tf.export, bonemets_tf.run; "
            "assert 'torch' not in sys.modules; assert 'tensorflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
