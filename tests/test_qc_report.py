"""validate --report: the QC page of a phantom cohort, its flags, and its rendering in headless Chromium."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from analysis.cohort.layout import Cohort
from analysis.cohort.phantom import generate_cohort
from analysis.cohort.qc_report import case_flags, mirror_lr, write_qc_report
from analysis.imaging.io import Geometry, read_array, write_array
from cli import main

SHAPE = (24, 64, 64)
SPACING = (2.0, 2.0, 6.0)
BACKGROUND = (17, 17, 17)   # the page's #111


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return generate_cohort(tmp_path_factory.mktemp("qc") / "ds", cases=4, seed=0, shape=SHAPE, spacing=SPACING)


def test_report_of_a_clean_phantom_cohort(cohort, tmp_path):
    report = write_qc_report(cohort, tmp_path / "qc")
    assert [r.case for r in report.rows] == Cohort(cohort).cases()
    for r in report.rows:
        label, geometry = read_array(Cohort(cohort).label_path(r.case))
        assert r.size == (64, 64, 24) and r.spacing == SPACING and r.orientation == "LPS"
        assert r.lesion_ml == pytest.approx(label.sum() * geometry.voxel_volume_ml)
        assert r.hu_min == -1024 and r.hu_max > 500
        # phantom lesions lie in bone, inside the body: the only flag is an empty label
        assert r.flags == (["empty label"] if label.sum() == 0 else []), (r.case, r.flags)
        if label.sum():
            assert r.on_bone == 1.0 and r.lesions >= 1
        for suffix in ("_views.png", "_mip.png"):
            assert (tmp_path / "qc" / f"{r.case}{suffix}").stat().st_size > 1000
    html = (tmp_path / "qc" / "index.html").read_text(encoding="utf-8")
    assert all(f'id="{r.case}"' in html for r in report.rows)
    csv_lines = (tmp_path / "qc" / "qc.csv").read_text(encoding="utf-8").splitlines()
    assert csv_lines[0].startswith("case,size,spacing_mm,orientation,hu_min") and len(csv_lines) == 5


def _copy_cohort(src: Path, dst: Path) -> Cohort:
    shutil.copytree(src, dst)
    return Cohort(dst)


def test_flags_of_broken_cases(cohort, tmp_path):
    c = _copy_cohort(cohort, tmp_path / "ds")
    lesioned = [case for case in c.cases() if read_array(c.label_path(case))[0].any()]
    # a label moved into the air in front of the patient
    label, geometry = read_array(c.label_path(lesioned[0]))
    moved = np.zeros_like(label)
    moved[:, :4, :] = label.any(axis=1, keepdims=True)[:, :, :].repeat(4, axis=1)
    write_array(moved, geometry, c.label_path(lesioned[0]))
    # a case stored with 2.5x thicker slices than the others
    ct, g = read_array(c.image_path(lesioned[1]))
    thick = Geometry(g.size, (g.spacing[0], g.spacing[1], 15.0), g.origin, g.direction)
    for path in (c.image_path(lesioned[1]), c.label_path(lesioned[1]), c.bones_path(lesioned[1])):
        write_array(read_array(path)[0], thick, path)
    report = write_qc_report(c.root, tmp_path / "qc", problems=["a problem validate found"])
    rows = {r.case: r for r in report.rows}
    air = rows[lesioned[0]].flags
    assert any(f.startswith("leaves body:") for f in air) and any(f.startswith("in air: lesion #1") for f in air)
    assert any(f.startswith("off bone: lesion #1 (0% on bone)") for f in air)
    assert rows[lesioned[1]].flags == ["spacing: z 15 mm vs cohort median 6 mm"]
    assert report.n_flagged == 3  # with the lesion-free case's empty label
    assert "a problem validate found" in (tmp_path / "qc" / "index.html").read_text(encoding="utf-8")


def _asymmetric_patient():
    """A body (40 HU) with a bone (700 HU) only on the patient's right, a lesion in it; canonical LPS arrays."""
    ct = np.full((6, 40, 40), -1000, np.int16)
    yy, xx = np.mgrid[:40, :40]
    ct[:, ((yy - 20) / 15.0) ** 2 + ((xx - 20) / 18.0) ** 2 <= 1] = 40
    bones = np.zeros(ct.shape, np.uint8)
    bones[:, 16:24, 6:12] = 6            # columns run from the patient's right to left: the right side
    ct[bones != 0] = 700
    label = np.zeros(ct.shape, np.uint8)
    label[2:4, 18:22, 7:10] = 1
    return ct, label, bones


def test_left_right_flip_is_suspected_from_the_bone_maps_asymmetry():
    ct, label, bones = _asymmetric_patient()
    flags, figures = case_flags(ct, label, bones)
    assert flags == [] and figures["on_bone"] == 1.0
    centre = float(np.nonzero(ct > -500)[2].mean())
    flipped = mirror_lr(label, centre)
    assert flipped.sum() == label.sum() and not (flipped & bones).any()
    flags, figures = case_flags(ct, flipped, bones)
    assert "left-right flip? the label is 0% on bone, 100% when mirrored" in flags
    assert any(f.startswith("off bone: lesion #1") for f in flags)
    # a bone map flipped against its CT
    flags, _ = case_flags(ct, flipped, mirror_lr(bones, centre))
    assert any(f.startswith("left-right flip? the bone map is 0% on dense bone, 100% when mirrored") for f in flags)
    # a symmetric skeleton cannot tell: no flag (documented)
    sym = bones | mirror_lr(bones, centre)
    ct_sym = ct.copy()
    ct_sym[sym != 0] = 700
    assert not any("flip" in f for f in case_flags(ct_sym, flipped, sym)[0])


def test_views_are_radiological_whatever_the_storage_order(cohort, tmp_path):
    """The same patient stored LPS and RAS (x and y reversed, direction diag(-1, -1, 1)) gives the same PNGs."""
    src = Cohort(cohort)
    case = next(c for c in src.cases() if read_array(src.label_path(c))[0].any())
    for name, flip in (("lps", False), ("ras", True)):
        dst = Cohort(tmp_path / name)
        for path_of in (Cohort.image_path, Cohort.label_path, Cohort.bones_path):
            arr, g = read_array(path_of(src, case))
            if flip:
                far = np.array(g.origin) + np.array([(g.size[0] - 1) * g.spacing[0], (g.size[1] - 1) * g.spacing[1], 0])
                g = Geometry(g.size, g.spacing, (float(far[0]), float(far[1]), g.origin[2]),
                             (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
                arr = arr[:, ::-1, ::-1]
            write_array(np.ascontiguousarray(arr), g, path_of(dst, case))
        write_qc_report(dst.root, tmp_path / f"qc_{name}")
    for suffix in ("_views.png", "_mip.png"):
        a = np.asarray(Image.open(tmp_path / "qc_lps" / f"{case}{suffix}"))
        b = np.asarray(Image.open(tmp_path / "qc_ras" / f"{case}{suffix}"))
        assert np.array_equal(a, b), suffix
    rows = write_qc_report(tmp_path / "ras", tmp_path / "qc_ras2").rows
    assert rows[0].orientation == "RAS"


def test_validate_report_command(cohort, tmp_path):
    r = CliRunner().invoke(main, ["validate", str(cohort), "--report", str(tmp_path / "qc")])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "(4 cases, 1 flagged)" in r.output and (tmp_path / "qc" / "index.html").is_file()
    r = CliRunner().invoke(main, ["validate", str(cohort), "--report", str(tmp_path / "qc")])
    assert r.exit_code == 2 and "exists and is not empty" in r.output
    r = CliRunner().invoke(main, ["validate", str(cohort), "--report", str(tmp_path / "qc"), "--overwrite"])
    assert r.exit_code == 0, r.output


# --- rendered in a real browser ---------------------------------------------------------------


def chromium() -> str:
    """The chromium binary; skipped with one line where it is missing, but never under CI."""
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is missing under CI; .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("chromium not installed: apt-get install -y chromium")
    return found


def screenshot(html: Path, png: Path, width: int, height: int) -> np.ndarray:
    """Headless Chromium's screenshot of a local page, as RGB ``(height, width, 3)``."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--force-device-scale-factor=1", f"--user-data-dir={png.parent / 'chromium-profile'}",
           f"--window-size={width},{height}", f"--screenshot={png}", html.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and png.is_file(), done.stderr[-2000:]
    return np.asarray(Image.open(png).convert("RGB"))


def _half(grey: np.ndarray) -> np.ndarray:
    from skimage.transform import downscale_local_mean

    return downscale_local_mean(grey[: grey.shape[0] // 2 * 2, : grey.shape[1] // 2 * 2], (2, 2))


def _found(shot: np.ndarray, png: Path) -> float:
    """The best normalised correlation of the PNG anywhere in the screenshot (grey levels, both
    halved for speed: a copy scores about 0.98-1.0 then, the same image mirrored about 0.6)."""
    from skimage.feature import match_template

    tpl = _half(np.asarray(Image.open(png).convert("L"), np.float32))
    grey = _half(np.asarray(Image.fromarray(shot).convert("L"), np.float32))
    return float(match_template(grey, tpl).max())


def test_report_renders_in_chromium_and_shows_every_case(cohort, tmp_path):
    report = write_qc_report(cohort, tmp_path / "qc")
    height = 500 + 350 * len(report.rows)
    shot = screenshot(report.index, tmp_path / "screenshot.png", 1200, height)
    assert shot.shape == (height, 1200, 3)
    assert (shot != BACKGROUND).any(axis=2).mean() > 0.2                   # not blank
    assert (shot[-40:] == BACKGROUND).all()                                 # the page ended inside the window
    for r in report.rows:                                                   # every case's images are on screen
        for suffix in ("_views.png", "_mip.png"):
            assert _found(shot, tmp_path / "qc" / f"{r.case}{suffix}") > 0.95, (r.case, suffix)


def test_a_lesion_in_the_lung_is_in_air_but_inside_the_body():
    """Aerated lung is enclosed by the chest wall: a label there is 'in air' (its median HU), and
    not 'leaves body' (the body mask fills each slice's enclosed air)."""
    ct = np.full((6, 40, 40), -1000, np.int16)
    yy, xx = np.mgrid[:40, :40]
    ct[:, ((yy - 20) / 15.0) ** 2 + ((xx - 20) / 18.0) ** 2 <= 1] = 40
    ct[:, ((yy - 20) / 8.0) ** 2 + ((xx - 14) / 5.0) ** 2 <= 1] = -850   # a lung
    label = np.zeros(ct.shape, np.uint8)
    label[2:4, 19:22, 13:16] = 1
    flags, _ = case_flags(ct, label, None)
    assert flags == ["in air: lesion #1 (-850 HU) median below -500 HU"]
    label[2:4, 0:2, 0:2] = 1                         # and one truly outside the patient
    flags, _ = case_flags(ct, label, None)
    assert "leaves body: 8 label voxel(s) outside the body" in flags
