"""Synthetic CT phantom: determinism, HU ranges per tissue, geometry, difficulty, CLI."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from analysis.cohort.layout import BONE_CODES, Cohort
from analysis.cohort.phantom import cohort_design, generate_case, generate_cohort
from analysis.errors import InputError
from analysis.imaging.io import read_array, read_header
from analysis.lesions.overlap import dice

SMALL = (24, 64, 64)  # fast cohorts for file-level tests


@pytest.fixture(scope="module")
def default_cases():
    """Four default-size cases of the seed-0 cohort (one lesion-free, some with the head)."""
    return [generate_case(s, include_head=h, lesion_free=f) for _, s, h, f in cohort_design(0, 8)[:4]]


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_cohort_files_are_byte_identical_for_a_seed_and_differ_for_another(tmp_path):
    a = generate_cohort(tmp_path / "a", cases=2, seed=3, shape=SMALL)
    b = generate_cohort(tmp_path / "b", cases=2, seed=3, shape=SMALL)
    c = generate_cohort(tmp_path / "c", cases=2, seed=4, shape=SMALL)
    da, db, dc = _digests(a), _digests(b), _digests(c)
    assert sorted(da) == ["bonesTr/case_000.nii.gz", "bonesTr/case_001.nii.gz", "dataset.json",
                          "imagesTr/case_000_0000.nii.gz", "imagesTr/case_001_0000.nii.gz",
                          "labelsTr/case_000.nii.gz", "labelsTr/case_001.nii.gz"]
    assert da == db
    assert da["imagesTr/case_000_0000.nii.gz"] != dc["imagesTr/case_000_0000.nii.gz"]
    assert Cohort(a).cases() == ["case_000", "case_001"]
    assert Cohort(a).dataset_json()["numTraining"] == 2


def test_generate_case_matches_the_written_files(tmp_path):
    root = generate_cohort(tmp_path / "d", cases=1, seed=5, shape=SMALL)
    _, cseed, head, free = cohort_design(5, 1)[0]
    case = generate_case(cseed, SMALL, include_head=head, lesion_free=free)
    ct, geometry = read_array(Cohort(root).image_path("case_000"))
    assert ct.dtype == np.int16 and np.array_equal(ct, case.ct)
    assert np.array_equal(read_array(Cohort(root).label_path("case_000"))[0], case.label)
    assert np.array_equal(read_array(Cohort(root).bones_path("case_000"))[0], case.bones)
    assert geometry.mismatch(case.geometry) is None


def test_geometry_is_written_as_requested(tmp_path):
    root = generate_cohort(tmp_path / "g", cases=1, shape=(20, 40, 56), spacing=(0.7, 0.9, 2.5))
    g = read_header(Cohort(root).image_path("case_000"))
    assert g.size == (56, 40, 20)
    assert np.allclose(g.spacing, (0.7, 0.9, 2.5))
    assert np.allclose(g.origin, (-(56 - 1) * 0.7 / 2, -(40 - 1) * 0.9 / 2, -(20 - 1) * 2.5))
    assert np.allclose(g.direction, np.eye(3).ravel())
    for path in (Cohort(root).label_path("case_000"), Cohort(root).bones_path("case_000")):
        assert read_header(path).mismatch(g) is None


def test_hu_ranges_per_tissue(default_cases):
    for case in default_cases:
        ct, label, bones = case.ct, case.label.astype(bool), case.bones
        assert ct.dtype == np.int16 and case.label.dtype == np.uint8 and bones.dtype == np.uint8
        assert set(np.unique(case.label)) <= {0, 1}
        assert set(np.unique(bones)) <= set(BONE_CODES)
        assert not (label & (bones == 0)).any(), "lesion voxels outside bone"
        # air outside the body: the volume's corner columns
        corners = ct[:, :4, :4]
        assert -1040 < corners.mean() < -960
        expected = {2, 3, 4, 5, 6, 7} | ({1} if case.include_head else set())
        assert set(np.unique(bones)) - {0} == expected
        assert case.lesion_free == (not label.any())
    lesion_hu = np.concatenate([c.ct[c.label.astype(bool)] for c in default_cases]).astype(float)
    assert lesion_hu.size > 500
    assert 500 <= lesion_hu.mean() <= 800  # Ulano et al. 2016: 654 +/- 176 HU
    assert 300 <= np.median(lesion_hu) <= 1000 and lesion_hu.max() <= 1300
    # a midline slab through the lumbar spine: trabecular bone of the bodies vs soft tissue
    case = default_cases[0]
    spine = (case.bones == 2) & ~case.label.astype(bool)
    assert 120 <= np.median(case.ct[spine]) <= 700  # trabecular interior plus a blurred cortical rim
    soft = (case.bones == 0) & (case.ct > -200) & (case.ct < 140)
    assert -10 <= np.median(case.ct[soft]) <= 70


def test_lesion_free_and_head_cases_in_a_default_cohort():
    design = cohort_design(0, 8)
    assert 1 <= sum(free for *_, free in design) <= 3
    assert 1 <= sum(head for _, _, head, _ in design) <= 5
    assert len({s for _, s, _, _ in design}) == 8
    assert [c for c, *_ in design] == [f"case_{i:03d}" for i in range(8)]


def test_lesion_free_case_has_an_empty_label_and_still_has_lookalikes():
    case = generate_case(11, lesion_free=True)
    assert not case.label.any() and case.lesion_free
    assert (case.ct[case.bones > 0] > 600).any()  # cortex and bone islands are still bright


def test_no_global_threshold_reaches_dice_half(default_cases):
    ct = np.concatenate([c.ct.ravel() for c in default_cases])
    ref = np.concatenate([c.label.ravel() for c in default_cases]).astype(bool)
    n_ref = ref.sum()
    assert n_ref > 0
    best = 0.0
    for t in range(0, 1625, 25):
        pred = ct >= t
        best = max(best, dice(pred, ref))
    assert best < 0.5, best
    # ...yet lesions stand out from the trabecular interior of the spine (2 voxels in from its edge)
    ring = np.zeros((1, 3, 3), bool)
    ring[0] = True
    host = np.concatenate([(ndimage.binary_erosion(c.bones == 2, ring, iterations=2)
                            & ~ndimage.binary_dilation(c.label.astype(bool))).ravel() for c in default_cases])
    assert 150 <= np.median(ct[host]) <= 320
    assert np.median(ct[ref]) > np.median(ct[host]) + 200


def test_bad_arguments_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="shape"):
        generate_case(0, shape=(4, 64, 64))
    with pytest.raises(InputError, match="spacing"):
        generate_case(0, spacing=(1.0, -1.0, 3.0))
    with pytest.raises(InputError, match="scale"):
        generate_cohort(tmp_path / "x", scale="huge")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x", encoding="utf-8")
    with pytest.raises(InputError, match="not empty"):
        generate_cohort(tmp_path / "full", cases=1, shape=SMALL)
    assert (tmp_path / "full" / "keep.txt").read_text(encoding="utf-8") == "x"


def test_cli_phantom_writes_a_cohort_and_refuses_a_non_empty_folder(tmp_path):
    from click.testing import CliRunner

    from cli import main

    out = tmp_path / "ds"
    runner = CliRunner()
    result = runner.invoke(main, ["phantom", "--out", str(out), "--cases", "2", "--seed", "1",
                                  "--shape", "16,48,40", "--spacing", "1.5,1.5,4"])
    assert result.exit_code == 0, result.output
    assert Cohort(out).cases() == ["case_000", "case_001"]
    g = read_header(Cohort(out).image_path("case_001"))
    assert g.size == (40, 48, 16) and np.allclose(g.spacing, (1.5, 1.5, 4.0))
    assert "2 cases" in result.output
    again = runner.invoke(main, ["phantom", "--out", str(out), "--cases", "1", "--shape", "16,48,40"])
    assert again.exit_code == 2
    assert "not empty" in again.output and "Traceback" not in again.output
    bad = runner.invoke(main, ["phantom", "--out", str(tmp_path / "b"), "--shape", "16,48"])
    assert bad.exit_code == 2 and "--shape" in bad.output
    assert not (tmp_path / "b").exists()
    ok = runner.invoke(main, ["phantom", "--out", str(out), "--cases", "1", "--shape", "16,48,40", "--overwrite"])
    assert ok.exit_code == 0 and Cohort(out).cases() == ["case_000"]


def test_importing_the_phantom_imports_no_framework():
    import subprocess
    import sys

    code = "import analysis.cohort.phantom, sys; assert not {'torch', 'tensorflow'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_phantom_cohort_says_it_is_synthetic(tmp_path):
    from analysis.cohort.layout import Cohort
    from analysis.cohort.phantom import generate_cohort
    from analysis.evaluation.analyze import _is_synthetic

    out = generate_cohort(tmp_path / "ds", cases=1, shape=(8, 32, 32))
    assert "synthetic" in Cohort(out).dataset_json()["description"]
    assert _is_synthetic(Cohort(out))
