"""What a radiologist sees of bonemets' results in a real OHIF Viewer (tests/ohif.py: ``@ohif/app``
3.13.2 served against the session's Orthanc, in headless Chromium).

For a study that went through ``serve`` (and for ``predict --sr`` and ``followup --sr`` results
stored in Orthanc), opened as a reader opens it:

* the SEG loads and OHIF's own per-segment statistics (voxels, volume, mean and maximum HU,
  centre) equal ``lesions.csv``;
* the measurement report opens without OHIF's error boundary; OHIF reads one measurement per
  lesion, places each on the CT instance of the lesion's largest cross-section with the outline of
  the lesion there, and its SR viewport shows each lesion's volume, long and short axis.

Screenshots go to env BONEMETS_TEST_ARTEFACTS (else the test's temporary folder); with
BONEMETS_UPDATE_DOCS_SCREENSHOT=1 the predict --sr test also writes docs/images/ohif-report.png.
"""
from __future__ import annotations

import os
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from analysis.imaging.dicom_sr import BONE_SITES
from analysis.imaging.io import write_array
from analysis.imaging.records import read_csv
from analysis.imaging.rtstruct import fill_even_odd
from analysis.prediction.tables import read_lesions
from tests import ohif
from tests.badinput import invoke
from tests.orthanc import Orthanc
from tests.tf.test_new_patients import lively, runs  # noqa: F401  (fixtures)
from tests.tf.test_node_orthanc import GEOMETRY, Node, _series, _slice_uids
from tests.tf.test_node_orthanc import threshold  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[2]
DOCS_SCREENSHOT = ROOT / "docs" / "images" / "ohif-report.png"
#: How OHIF 3.13 labels a finding site: by the concept's code value (SCT 363698007), the site by its meaning.
FINDING_SITE = "363698007"


@pytest.fixture(scope="module")
def viewer(orthanc):
    dist = ohif.require_viewer()
    server = ohif.ViewerServer(dist, orthanc.url)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(viewer):
    b = ohif.Browser()
    yield b
    b.close()


@pytest.fixture(scope="module")
def screens(tmp_path_factory) -> Path:
    return ohif.artefact_dir(tmp_path_factory.mktemp("ohif-screens"))


def _series_of(orthanc: Orthanc, study: str, modality: str) -> str:
    (series,) = orthanc.series_of(study, modality)
    return series["MainDicomTags"]["SeriesInstanceUID"]


def _report_measurements(browser, viewer, orthanc: Orthanc, study: str, files: list[Path], screens: Path,
                         name: str) -> list[dict]:
    """Open the study of ``files`` in OHIF, its SR series in the SR viewport (no boundary error), a
    screenshot ``name``; the measurements OHIF placed."""
    page = browser.open(viewer, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID))
    try:
        measurements = page.open_sr(_series_of(orthanc, study, "SR"))
        assert not page.boundary_errors()
        page.screenshot(screens / name)
    finally:
        page.close()
    return measurements


def _segments(seg: pydicom.Dataset, sop_uids: list[str]) -> dict[int, np.ndarray]:
    """Each segment's pixels ``(slices, rows, cols)`` in the series' slice order, read with highdicom."""
    s = hd.seg.Segmentation.from_dataset(seg)
    return {int(item.SegmentNumber): np.asarray(s.get_pixels_by_source_instance(
        source_sop_instance_uids=sop_uids, segment_numbers=[int(item.SegmentNumber)], combine_segments=True,
        assert_missing_frames_are_empty=True)) > 0 for item in seg.SegmentSequence}


def _largest_part(pixels: np.ndarray) -> np.ndarray:
    """The largest 4-connected part of a slice's pixels, holes filled (scipy, the report's definition)."""
    labels, n = ndimage.label(pixels)
    sizes = np.bincount(labels.ravel())[1:]
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))


def _raster(points: list[float], shape: tuple[int, int]) -> np.ndarray:
    """Pixels inside an SCOORD polygon: (column, row) with 0, 0 the top left corner of the first pixel."""
    xy = np.asarray(points, np.float64).reshape(-1, 2)
    return fill_even_odd([np.stack([xy[:, 1] - 0.5, xy[:, 0] - 0.5], axis=1)], shape)


def _shown(labels: dict, name: str, unit: str) -> float:
    """The number OHIF shows for label ``name`` ("0.31 cm3": two decimals, then the UCUM unit; OHIF
    3.13 leaves a value of 0 blank, " cm3")."""
    number, shown_unit = labels[name].split(" ", 1)
    assert shown_unit == unit, (name, labels[name])
    return float(number or 0)


def check_seg(page: ohif.ViewerPage, series_uid: str, rows: list[dict]) -> None:
    """OHIF's statistics of every segment equal the lesion's row of lesions.csv."""
    stats = {s["label"]: s for s in page.open_seg(series_uid)}
    assert sorted(stats) == sorted(f"bone metastasis {r['lesion_id']}" for r in rows)
    for row in rows:
        got = stats[f"bone metastasis {row['lesion_id']}"]
        assert got["count"] == row["voxels"], row["lesion_id"]
        assert got["volume_mm3"] == pytest.approx(row["volume_ml"] * 1000, rel=1e-6)
        assert got["mean"] == pytest.approx(row["hu_mean"], abs=1e-3)
        assert got["max"] == pytest.approx(row["hu_max"])
        assert got["center"] == pytest.approx([row["x_mm"], row["y_mm"], row["z_mm"]], abs=1e-3)
    assert not page.boundary_errors()
    assert not page.page.get_by_text("RecommendedDisplayCIELabValue not found").count()  # the SEG's own colours


def check_report(page: ohif.ViewerPage, series_uid: str, rows: list[dict], segments: dict[int, np.ndarray],
                 sop_uids: list[str]) -> list[dict]:
    """The report opens without an error, with one placed measurement per lesion: its outline on the
    lesion's largest cross-section, its volume and axes among OHIF's labels and in the viewport."""
    measurements = page.open_sr(series_uid)
    assert not page.boundary_errors()
    by_id = {m["tracking_id"]: m for m in measurements}
    assert sorted(by_id) == sorted(f"lesion {r['lesion_id']}" for r in rows)
    for row in rows:
        m = by_id[f"lesion {row['lesion_id']}"]
        pixels = segments[row["lesion_id"]]
        z = int(np.argmax(pixels.sum(axis=(1, 2))))
        assert m["loaded"] and m["sop_instance_uid"] == sop_uids[z] and m["graphic_type"] == "POLYLINE"
        assert m["points"][:2] == m["points"][-2:]  # closed
        np.testing.assert_array_equal(_raster(m["points"], pixels.shape[1:]), _largest_part(pixels[z]))
        labels = dict(m["labels"])
        for name, key, unit in (("Volume", "volume_ml", "cm3"), ("Long axis", "long_axis_mm", "mm"),
                                ("Short axis", "short_axis_mm", "mm")):
            assert _shown(labels, name, unit) == pytest.approx(row[key], abs=0.005 + 1e-9), (row["lesion_id"], name)
    shown = []
    for _ in measurements:  # the SR viewport steps through the lesions
        shown.append(" | ".join(page.viewport_text()))
        page.next_measurement()
    for m in measurements:  # each lesion's text box, as OHIF draws it over the image
        volume = dict(m["labels"])["Volume"]
        assert any(f"Volume: {volume}" in s for s in shown), (m["tracking_id"], shown)
    return measurements


def test_a_study_through_serve_opens_in_ohif(orthanc, viewer, browser, screens, lively, threshold,  # noqa: F811
                                             tmp_path):
    files = _series(tmp_path / "in" / "pt", 11, localizer=False)
    study = orthanc.upload(files)
    node = Node(lively, tmp_path / "spool", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom}", threshold)
    orthanc.set_modality("bonemets", "BONEMETS", node.port)
    assert orthanc.send("bonemets", study).ok
    found = orthanc.wait_for(study)
    assert node.term() == 0
    # lesions.csv of the same prediction (predict --images gives the node's SEG, test_node_orthanc)
    r = invoke(["predict", "--model", lively, "--images", tmp_path / "in", "--out", tmp_path / "ref",
                "--no-preview", "--threshold", f"{threshold:.6f}"])
    assert r.exit_code == 0, r.output
    rows = read_lesions(tmp_path / "ref")
    assert rows
    uids = _slice_uids(files)
    segments = _segments(pydicom.dcmread(pydicom.filebase.DicomBytesIO(found["SEG"][0])), uids)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    page = browser.open(viewer, study_uid)
    try:
        check_seg(page, _series_of(orthanc, study, "SEG"), rows)
        page.screenshot(screens / "serve-seg.png")
        check_report(page, _series_of(orthanc, study, "SR"), rows, segments, uids)
        page.screenshot(screens / "serve-sr.png")
    finally:
        page.close()


def test_predict_sr_opens_in_ohif(orthanc, viewer, browser, screens, lively, threshold, tmp_path):  # noqa: F811
    files = _series(tmp_path / "in" / "pt", 12, localizer=False)
    bones = np.full((8, 64, 64), 4, np.uint8)  # pelvis, the lower rows spine: finding sites in the report
    bones[:, 32:] = 2
    write_array(bones, GEOMETRY, tmp_path / "bones" / "pt.nii.gz")
    # --min-size: the larger lesions only, a report a reader can look at (the documentation's screenshot)
    r = invoke(["predict", "--model", lively, "--images", tmp_path / "in", "--out", tmp_path / "out", "--sr",
                "--bones", tmp_path / "bones", "--no-preview", "--threshold", f"{threshold:.6f}", "--min-size", "20"])
    assert r.exit_code == 0, r.output
    rows = read_lesions(tmp_path / "out")
    (seg,) = (tmp_path / "out" / "dicom_seg").glob("*.dcm")
    (sr,) = (tmp_path / "out" / "sr").glob("*.dcm")
    study = orthanc.upload([*files, seg, sr])
    uids = _slice_uids(files)
    segments = _segments(pydicom.dcmread(seg), uids)
    page = browser.open(viewer, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID))
    try:
        check_seg(page, _series_of(orthanc, study, "SEG"), rows)
        measurements = check_report(page, _series_of(orthanc, study, "SR"), rows, segments, uids)
        page.screenshot(screens / "predict-sr.png")
        if os.environ.get(ohif.DOCS_SCREENSHOT_ENV) == "1":
            ohif.small_png(page, DOCS_SCREENSHOT)
    finally:
        page.close()
    sites = {m["tracking_id"]: dict(m["labels"]).get(FINDING_SITE) for m in measurements}
    for row in rows:  # the finding site by its meaning
        assert sites[f"lesion {row['lesion_id']}"] == BONE_SITES[row["bone"]].meaning


def test_followup_report_opens_in_ohif(orthanc, viewer, browser, screens, tmp_path):
    from tests.test_followup_sr import _pair

    r = invoke([*_pair(tmp_path), "--sr", "--out", tmp_path / "out"])
    assert r.exit_code == 0, r.output
    files = sorted((tmp_path / "dicom" / "baseline").iterdir())
    study = orthanc.upload([*files, tmp_path / "out" / "followup_seg.dcm", tmp_path / "out" / "followup_sr.dcm"])
    rows = read_csv(tmp_path / "out" / "lesions.csv")
    seg = pydicom.dcmread(tmp_path / "out" / "followup_seg.dcm")
    uids = _slice_uids(files)
    segments = _segments(seg, uids)
    segment_of = {str(s.TrackingID): int(s.SegmentNumber) for s in seg.SegmentSequence}
    measurements = _report_measurements(browser, viewer, orthanc, study, files, screens, "followup-sr.png")
    by_id = {m["tracking_id"]: m for m in measurements}
    anchored = [r for r in rows if f"lesion {r['lesion']}" in segment_of]
    assert sorted(by_id) == sorted(f"lesion {r['lesion']}" for r in anchored)
    for row in anchored:
        m = by_id[f"lesion {row['lesion']}"]
        pixels = segments[segment_of[f"lesion {row['lesion']}"]]
        z = int(np.argmax(pixels.sum(axis=(1, 2))))
        assert m["loaded"] and m["sop_instance_uid"] == uids[z]
        np.testing.assert_array_equal(_raster(m["points"], pixels.shape[1:]), _largest_part(pixels[z]))
        labels = dict(m["labels"])
        for name, key in (("Volume", "followup_ml"), ("Volume at baseline", "baseline_ml"),
                          ("Volume change since baseline", "change_ml")):
            shown = _shown(labels, name, "cm3")
            assert shown == pytest.approx(float(row[key]), abs=0.005 + 1e-9), (row["lesion"], name)


def test_timeline_report_opens_in_ohif(orthanc, viewer, browser, screens, tmp_path):
    """``timeline --sr``'s report of a follow-up study: every track with a lesion there is one placed
    measurement under the track's identifier and UID, outlined on its largest cross-section, with its
    volume and the volume at the previous scan; the resolved track is no measurement (nothing to draw)."""
    from tests.test_timeline import _tiny_study, _tiny_timeline_args

    a, b, c, d = (2, 6, 6, 12, 6, 12), (2, 6, 24, 30, 24, 30), (7, 10, 6, 12, 24, 30), (7, 10, 26, 32, 6, 12)
    studies = [_tiny_study(tmp_path, "s0", [a], date="20250106"),
               _tiny_study(tmp_path, "s1", [a, b, d], date="20250331"),
               _tiny_study(tmp_path, "s2", [b, c, d], date="20250623")]
    args = _tiny_timeline_args(studies)
    out = tmp_path / "out"
    r = invoke([*args, "--no-registration", "--sr", "--out", out])
    assert r.exit_code == 0, r.output
    files = sorted(studies[2][0].iterdir())
    study = orthanc.upload([*files, out / "dicom" / "t2_seg.dcm", out / "dicom" / "t2_sr.dcm"])
    seg = pydicom.dcmread(out / "dicom" / "t2_seg.dcm")
    uids = _slice_uids(files)
    segments = _segments(seg, uids)
    segment_of = {str(s.TrackingID): (int(s.SegmentNumber), str(s.TrackingUID)) for s in seg.SegmentSequence}
    tracks = read_csv(out / "tracks.csv")
    present = [t for t in tracks if t["scan"] == "2" and t["present"] == "1"]
    assert any(t["scan"] == "2" and t["status"] == "resolved" for t in tracks)
    measurements = _report_measurements(browser, viewer, orthanc, study, files, screens, "timeline-sr.png")
    by_id = {m["tracking_id"]: m for m in measurements}
    assert sorted(by_id) == sorted(f"lesion {t['track']}" for t in present)
    for t in present:
        m = by_id[f"lesion {t['track']}"]
        number, uid = segment_of[f"lesion {t['track']}"]
        assert m["tracking_uid"] == uid
        pixels = segments[number]
        z = int(np.argmax(pixels.sum(axis=(1, 2))))
        assert m["loaded"] and m["sop_instance_uid"] == uids[z]
        np.testing.assert_array_equal(_raster(m["points"], pixels.shape[1:]), _largest_part(pixels[z]))
        labels = dict(m["labels"])
        assert _shown(labels, "Volume", "cm3") == pytest.approx(float(t["volume_ml"]), abs=0.005 + 1e-9)
        assert "Volume at previous scan" in labels, labels
