"""Grad-CAM: tf-keras-vis and the GradientTape version agree; overlays, volumes, CSV."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from analysis.cohort.layout import Cohort
from analysis.errors import InputError
from analysis.imaging.io import read_array, read_header
from bonemets_tf.gradcam import class_activation_maps, gradcam, last_conv_layer, normalize, tape_cam, vis_cam
from bonemets_tf.run import read_run
from tests.tf.infer_runs import shared_runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def detector(runs):
    return read_run(runs.detector).load_model()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(-1000, 1500, (2, 40, 48, 1)).astype(np.float32)


def test_last_conv_layer_is_the_feature_map_before_pooling(detector):
    assert last_conv_layer(detector) == "stage4_block3_out"
    assert tuple(detector.get_layer("stage4_block3_out").output.shape[1:3]) == (3, 3)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_tape_and_tf_keras_vis_agree(detector, images, method):
    ours = tape_cam(detector, images, method=method)
    theirs = vis_cam(detector, images, method=method)
    assert ours.shape == theirs.shape == (2, 40, 48)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert ours.min() >= 0.0 and ours.max() <= 1.0
    assert (ours.std(axis=(1, 2)) > 0.05).all()  # not constant


def test_auto_uses_tf_keras_vis_on_the_flat_model(detector, images):
    maps, used = class_activation_maps(detector, images)
    assert used == "tf-keras-vis" and maps.shape == (2, 40, 48)


def test_normalize_golden_values():
    out = normalize(np.array([[[1.0, 3.0], [2.0, 5.0]], [[4.0, 4.0], [4.0, 4.0]]]))
    np.testing.assert_allclose(out[0], [[0.0, 0.5], [0.25, 1.0]])
    assert not out[1].any()


def test_gradcam_writes_overlays_volumes_and_csv(runs, tmp_path):
    out = gradcam(runs.detector, runs.oblique_dataset, tmp_path / "cam", cases="all", max_slices=2,
                  method="gradcam++")
    cohort = Cohort(runs.oblique_dataset)
    rows = list(csv.DictReader((out / "gradcam.csv").open(encoding="utf-8")))
    assert [list(r) for r in rows[:1]] == [["case", "slice", "probability", "png"]]
    for case in cohort.cases():
        mine = [r for r in rows if r["case"] == case]
        assert len(mine) == 2
        heat, geometry = read_array(out / f"{case}_gradcam.nii.gz")
        assert heat.dtype == np.float32
        assert read_header(cohort.image_path(case)).mismatch(geometry) is None
        chosen = sorted(int(r["slice"]) for r in mine)
        assert all(heat[z].max() > 0 for z in chosen)
        assert not np.delete(heat, chosen, axis=0).any()
        for r in mine:
            assert (out / r["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "gradcam.json").read_text(encoding="utf-8"))["implementation"] == ["tf-keras-vis"]


def test_gradcam_needs_a_detector(runs, tmp_path):
    with pytest.raises(InputError, match="expected a detector"):
        gradcam(runs.segmenter, runs.oblique_dataset, tmp_path / "x")
    assert not (tmp_path / "x").exists()
