"""Networks run at the pixel spacing they were trained at (analysis.prediction.runner.network_grid and
analysis.imaging.resample), driven by a numpy stand-in whose answer depends on the pixel size: it keeps
bright blobs at least 7 pixels wide (a morphological opening), as a CNN's learnt scale does. Trained at
1 mm, it keeps a 14 mm lesion and drops a 5 mm one; on 0.6 mm pixels it would keep both (each is wider in
pixels) unless the runner resamples to 1 mm first."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from analysis.imaging.io import Geometry, read_array, write_array
from analysis.imaging.resample import in_plane_shape, needs_resampling, resample_in_plane, spacing_after
from analysis.lesions import lesion_instances
from analysis.prediction.folder import PredictionFolder
from analysis.prediction.runner import Network, Outputs, lesion_tables, network_grid, plan_inputs, run_cases

RADIUS = 3  # pixels: blobs narrower than 7 pixels vanish
SLICES, FOV_MM = 5, 96.0


def scale_sensitive(volume: np.ndarray, z: np.ndarray, spacing_zyx) -> np.ndarray:
    disk = np.hypot(*np.mgrid[-RADIUS:RADIUS + 1, -RADIUS:RADIUS + 1]) <= RADIUS
    bright = volume[z] > 500
    kept = np.stack([ndimage.binary_opening(b, disk) for b in bright]) if bright.size else bright
    return np.where(kept, 0.9, 0.05).astype(np.float32)


def physical_ct(pixel_mm: float) -> tuple[np.ndarray, Geometry]:
    """The same patient sampled on ``pixel_mm`` pixels: a body in air, a 14 mm and a 5 mm square
    lesion (pixel centres inside a square count)."""
    n = int(round(FOV_MM / pixel_mm))
    centres = (np.arange(n) + 0.5) * pixel_mm
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    ct = np.full((SLICES, n, n), -1000.0, np.float32)
    ct[:, np.hypot(yy - 48, xx - 48) <= 26] = 40.0
    for (y0, x0), side in (((40.0, 40.0), 14.0), ((55.0, 58.0), 5.0)):
        inside = (np.abs(yy - y0) <= side / 2) & (np.abs(xx - x0) <= side / 2)
        ct[1:4, inside] = 900.0
    return ct, Geometry(size=(n, n, SLICES), spacing=(pixel_mm, pixel_mm, 3.0), origin=(0.0, 0.0, 0.0),
                        direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))


def _predict(tmp_path: Path, pixel_mm: float, net: Network, name: str) -> tuple[np.ndarray, Geometry, dict]:
    ct, geometry = physical_ct(pixel_mm)
    images = tmp_path / f"in_{name}"
    write_array(ct, geometry, images / f"{name}.nii.gz")
    plan = plan_inputs(None, images)
    folder = PredictionFolder(tmp_path / f"out_{name}", {"test": name}, overwrite=False)
    done, failures, _ = run_cases(folder, plan.cases, net, Outputs(preview=False), strict=False)
    folder.finish({"model": name}, tables=lesion_tables())
    assert failures == []
    mask, g = read_array(folder.out / f"{name}.nii.gz")
    assert g.mismatch(geometry) is None
    return mask, g, done[0]


def test_a_model_trained_at_1_mm_sees_a_0_6_mm_ct_as_it_saw_its_training(tmp_path):
    trained = Network(name="opening", fingerprint="0", segment=scale_sensitive, crop=False, spacing_xy=(1.0, 1.0))
    native = Network(name="opening", fingerprint="0", segment=scale_sensitive, crop=False)
    ref, g1, rec1 = _predict(tmp_path, 1.0, trained, "at1")
    assert lesion_instances(ref)[1] == 1 and rec1["spacing"]["resampled"] is False  # the 5 mm lesion is gone
    fine, g06, rec06 = _predict(tmp_path, 0.6, trained, "at06")
    assert rec06["spacing"] == {"input_xy_mm": [0.6, 0.6], "model_xy_mm": [1.0, 1.0], "network_xy_mm": [1.0, 1.0],
                                "resampled": True, "network_shape_rc": [96, 96]}
    assert lesion_instances(fine)[1] == 1
    ml = lambda m, g: float(m.sum()) * g.voxel_volume_ml  # noqa: E731
    assert ml(fine, g06) == pytest.approx(ml(ref, g1), rel=0.1)
    # against the reference on a common grid: the 1 mm mask on 0.6 mm pixels
    common = resample_in_plane(ref, fine.shape[1:], order=0, dtype=np.uint8)
    dice = 2 * np.count_nonzero(common & fine) / (common.sum() + fine.sum())
    assert dice >= 0.9
    # at its native 0.6 mm the model keeps the 5 mm lesion too: the scanner's pixel size changed its answer
    raw, _, rec = _predict(tmp_path, 0.6, native, "native06")
    assert lesion_instances(raw)[1] == 2 and rec["spacing"]["resampled"] is False


def test_the_crop_stays_exact_and_mirroring_composes_on_the_networks_grid(tmp_path):
    """The crop is made on the resampled slice: with the stand-in's receptive radius as context it
    keeps exactly the whole resampled slice's output (the per-case crop check: Dice 1);
    mirroring happens there too, and the stand-in is symmetric, so the masks are those without."""
    plain = Network(name="opening", fingerprint="0", segment=scale_sensitive, crop=False, spacing_xy=(1.0, 1.0))
    ref, _, _ = _predict(tmp_path, 0.6, plain, "plain")
    cropped = Network(name="opening", fingerprint="0", segment=scale_sensitive, crop=True, context=2 * RADIUS,
                      stride=1, spacing_xy=(1.0, 1.0))
    mask, _, rec = _predict(tmp_path, 0.6, cropped, "crop")
    # outside what the crop keeps the probability is 0 where the stand-in answers 0.05 everywhere
    assert rec["crop"]["check"]["dice"] == 1.0 and rec["crop"]["check"]["max_abs_diff"] == pytest.approx(0.05)
    assert rec["crop"]["pixel_fraction"] < 1.0
    assert np.array_equal(mask, ref)
    mirrored = Network(name="opening", fingerprint="0", segment=scale_sensitive, crop=True, context=2 * RADIUS,
                       stride=1, mirror=True, spacing_xy=(1.0, 1.0))
    mask, _, _ = _predict(tmp_path, 0.6, mirrored, "mirror")
    assert np.array_equal(mask, ref)


def test_grids():
    assert in_plane_shape((512, 512), (0.6, 0.6), (1.0, 1.0)) == (307, 307)
    assert spacing_after((512, 512), (0.6, 0.6), (307, 307))[0] == pytest.approx(1.0007, abs=1e-4)
    assert not needs_resampling((1.004, 1.0), (1.0, 1.0)) and needs_resampling((1.006, 1.0), (1.0, 1.0))
    assert not network_grid((3, 50, 60), (2.0, 0.7, 0.9), None).resampled
    g = network_grid((3, 50, 60), (2.0, 0.7, 0.9), (1.8, 1.4))  # (x, y): cols 0.9 -> 1.8, rows 0.7 -> 1.4
    assert g.resampled and g.shape_rc == (25, 30) and g.spacing_zyx == pytest.approx((2.0, 1.4, 1.8))
    # probabilities come back linearly and exactly onto the input's pixels
    prob = np.linspace(0, 1, 25 * 30, dtype=np.float32).reshape(1, 25, 30)
    back = resample_in_plane(prob, (50, 60))
    assert back.shape == (1, 50, 60) and 0.0 <= back.min() and back.max() <= 1.0
    assert json.dumps(g.record((2.0, 0.7, 0.9), (1.8, 1.4)))  # JSON-able
