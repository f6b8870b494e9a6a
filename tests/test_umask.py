"""Outputs honour the user's umask: under umask 022 every file a data command writes is 0644 and
every folder 0755 (mkstemp/mkdtemp alone would give 0600/0700, so colleagues on a shared server
could not read the results). The Keras and nnU-Net commands have the same test in their suites."""
from __future__ import annotations

import shutil

import numpy as np

from analysis.imaging.io import write_array
from tests.badinput import invoke
from tests.conftest import make_geometry, write_tiny_cohort, wrong_modes
from tests.test_imports import write_dicom_series


def test_every_data_command_writes_with_the_umask(tmp_path, umask_022):
    out = tmp_path / "out"
    out.mkdir()
    phantom = out / "phantom"
    assert invoke(["phantom", "--out", phantom, "--cases", "2", "--shape", "8,32,32"]).exit_code == 0
    ds = write_tiny_cohort(tmp_path / "ds", n_cases=3, shape=(6, 16, 20))
    assert invoke(["split", ds, "--folds", "2"]).exit_code == 0
    hu = np.random.default_rng(0).integers(-1000, 1500, size=(5, 12, 10)).astype(np.int16)
    write_dicom_series(tmp_path / "dicom", hu)
    r = invoke(["import-dicom", tmp_path / "dicom", "--dataset", out / "imported", "--case", "new"])
    assert r.exit_code == 0, r.output
    geometry = make_geometry((6, 16, 20))
    write_array(np.zeros((6, 16, 20), np.uint8), geometry, tmp_path / "seg.nii.gz")
    r = invoke(["import-bones", tmp_path / "seg.nii.gz", "--dataset", ds, "--case", "case_001"])
    assert r.exit_code == 0, r.output
    pred = tmp_path / "PRED"
    (pred / "m").mkdir(parents=True)
    for p in (ds / "labelsTr").iterdir():
        shutil.copy(p, pred / "m" / p.name)
    r = invoke(["analyze", "--dataset", ds, "--predictions", pred, "--out", out / "analysis", "--cases", "all",
                "--no-radiomics"])
    assert r.exit_code == 0, r.output
    written = [ds / "splits.json", ds / "bonesTr" / "case_001.nii.gz", out / "imported" / "imagesTr" / "new_0000.nii.gz"]
    assert all(p.is_file() for p in written)
    assert wrong_modes(out, 0o022) == []
    assert [w for p in written for w in wrong_modes(p, 0o022)] == []
    assert (out / "analysis" / "report.md").stat().st_mode & 0o777 == 0o644


def test_the_mode_check_sees_a_private_file(tmp_path, umask_022):
    import tempfile

    (tmp_path / "d").mkdir()
    fd, name = tempfile.mkstemp(dir=tmp_path / "d")
    assert wrong_modes(tmp_path / "d", 0o022) == [f"d/{name.rsplit('/', 1)[1]}: 0o600 (want 0o644)"]
