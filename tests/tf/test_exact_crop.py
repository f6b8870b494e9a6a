"""The crop is a shortcut that changes nothing (issue #23): a trained segmenter gives, on a
wide-field-of-view CT whose body box starts at an odd row and column, the same masks and
probabilities with ``--crop`` as on whole slices; ``--mirror`` averages the logits of four
passes; ``predict.json`` records every inference setting and the crop's measured agreement.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from analysis.cohort.layout import Cohort, write_dataset_json
from analysis.cohort.splits import write_splits
from analysis.imaging.io import Geometry, read_array, write_array, write_mask
from analysis.imaging.orientation import Reorientation
from analysis.lesions.overlap import dice
from analysis.prediction.probabilities import read_probability
from analysis.prediction.runner import Network, segment_canonical
from tests.badinput import invoke


def _cohort(root, cases: int = 4, shape=(8, 64, 64), seed: int = 5):
    """Air around a body (40 HU), a bone block (400 HU) and bright lesions (900 HU) in it."""
    rng = np.random.default_rng(seed)
    cohort = Cohort(root)
    geometry = Geometry(size=(shape[2], shape[1], shape[0]), spacing=(1.5, 1.5, 3.0), origin=(0.0, 0.0, 0.0),
                        direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    for i in range(cases):
        ct = np.full(shape, -1000, np.int16)
        ct[:, 8:56, 10:54] = 40 + rng.integers(-15, 15, (shape[0], 48, 44))
        ct[:, 20:44, 18:46] = 400
        mask = np.zeros(shape, np.uint8)
        for z in range(1, shape[0] - 1):
            r, c = rng.integers(20, 38), rng.integers(18, 40)
            mask[z, r:r + 6, c:c + 6] = 1
        ct[mask > 0] = 900
        write_array(ct, geometry, cohort.image_path(f"case_{i:02d}"))
        write_mask(mask, geometry, cohort.label_path(f"case_{i:02d}"))
    write_dataset_json(root, cases)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small UNet trained for real on a small cohort with air around the body."""
    from bonemets_tf.train import TrainConfig, train

    root = tmp_path_factory.mktemp("exact_crop")
    dataset = _cohort(root / "ds")
    write_splits(dataset, test_fraction=0.25, folds=2, seed=0)
    config = TrainConfig(dataset=str(dataset), task="segment", arch="unet", width=0.25, image_size=32, epochs=2,
                         steps_per_epoch=30, batch_size=8, val_max_slices=4, guard=False, lr=3e-3)
    return train(config, root / "run", cache_dir=root / "cache"), dataset


def _wide_case(dataset) -> tuple[np.ndarray, Geometry]:
    """A phantom case off-centre in a wide field of view of air (about 300 x 330 pixels), placed so
    that the body box of every slab starts at an odd row and an odd column."""
    from analysis.prediction.runner import crop_boxes

    cohort = Cohort(dataset)
    ct, geometry = read_array(cohort.image_path(cohort.select("all")[0]))
    ct = np.ascontiguousarray(Reorientation.of(geometry).forward(ct))
    top, left = 141, 161
    for _ in range(4):
        wide = np.full((ct.shape[0], ct.shape[1] + top + 90, ct.shape[2] + left + 100), -1000, np.int16)
        wide[:, top:top + ct.shape[1], left:left + ct.shape[2]] = ct
        boxes = crop_boxes(wide, (3.0, 1.5, 1.5))
        r0, c0 = boxes[0][1].start, boxes[0][2].start
        if r0 % 2 and c0 % 2:
            break
        top, left = top + (r0 % 2 == 0), left + (c0 % 2 == 0)
    assert all(b[1].start % 2 and b[2].start % 2 for b in boxes), boxes
    return wide, Geometry(size=(wide.shape[2], wide.shape[1], wide.shape[0]), spacing=(1.5, 1.5, 3.0),
                          origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))


def test_the_crop_gives_the_whole_slice_result_on_a_wide_field_of_view(trained):
    from bonemets_tf.inference import Predictor, crop_context, receptive_radius, slice_probabilities
    from bonemets_tf.run import read_run

    run, dataset = trained
    predictor = Predictor(read_run(run))
    wide, _ = _wide_case(dataset)
    ct = wide.astype(np.float32)
    spacing = (3.0, 1.5, 1.5)
    radius, context = receptive_radius(predictor.model), crop_context(predictor)
    assert radius is not None and context >= radius and context % predictor.run.stride == 0
    segment = lambda v, z, _: slice_probabilities(predictor, v, z, 8)  # noqa: E731
    whole, _, _ = segment_canonical(Network("unet", "", segment=segment, crop=False), ct, spacing)
    t = 0.5
    net = Network("unet", "", segment=segment, stride=predictor.run.stride, crop=True, context=context)
    cropped, seen, info = segment_canonical(net, ct, spacing, threshold=t)
    rows, cols = np.flatnonzero(seen.any(axis=(0, 2))), np.flatnonzero(seen.any(axis=(0, 1)))
    assert info["mode"] == "exact" and seen.mean() < 1.0 and (rows[0] > 0 or cols[0] > 0)
    assert np.abs(cropped - whole)[seen].max() <= 1e-4  # the kept part is the whole-slice output
    assert np.abs(cropped - whole).max() <= 0.01  # and outside it the network gives (almost) nothing
    a, b = whole >= t, (cropped >= t) & seen
    assert a.sum() >= 10 and dice(b, a) >= 0.999
    # the crop of before issue #23 (the box alone, centred on the stride grid) did not get there
    from benchmarks.crop_agreement import legacy_segment

    legacy, _ = legacy_segment(Network("unet", "", segment=segment, stride=predictor.run.stride), ct, spacing)
    assert np.abs(legacy - whole).max() > np.abs(cropped - whole)[seen].max()


def test_predict_records_the_settings_and_the_measured_agreement(trained, tmp_path):
    run, dataset = trained
    wide, geometry = _wide_case(dataset)
    write_array(wide, geometry, tmp_path / "images" / "wide.nii.gz")
    out = {}
    for name, extra in {"whole": [], "crop": ["--crop"], "mirror": ["--mirror"]}.items():
        r = invoke(["predict", "--model", str(run), "--images", str(tmp_path / "images"), "--out",
                    str(tmp_path / name), "--probabilities", "--min-size", "3", *extra])
        assert r.exit_code == 0, r.output
        out[name] = json.loads((tmp_path / name / "predict.json").read_text(encoding="utf-8"))
    inference = out["crop"]["inference"]
    assert inference["crop"] is True and inference["crop_mode"] == "exact" and inference["crop_context_px"] > 0
    assert inference["mirroring"] is False and inference["mirror_passes"] == 1 and inference["min_size_voxels"] == 3
    assert inference["threshold"] == 0.5 and inference["threshold_source"] == "option"
    assert inference["precision"] == "float32"
    agreement = out["crop"]["crop_agreement"]
    assert agreement["cases"] == 1 and agreement["max_abs_diff"] <= 0.01
    assert out["whole"]["inference"]["crop"] is False and "crop_agreement" not in out["whole"]
    assert out["mirror"]["inference"]["mirroring"] is True and out["mirror"]["inference"]["mirror_passes"] == 4
    whole = read_probability(tmp_path / "whole" / "probabilities" / "wide.nii.gz")
    crop = read_probability(tmp_path / "crop" / "probabilities" / "wide.nii.gz")
    mirror = read_probability(tmp_path / "mirror" / "probabilities" / "wide.nii.gz")
    assert np.abs(whole - crop).max() <= 0.01 + 1 / 255
    assert np.abs(whole - mirror).max() > 1 / 255  # mirroring changes the answer of a real network
