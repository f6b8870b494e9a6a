"""Learning from the reader (issue #35), framework-free: a viewer's edited SEG becomes review rows
at the node, and import-reviews turns reviewed studies into cohort cases with hard negatives.

The predicted study is the review tests' phantom (:mod:`tests.review_fixture`): a network-free
"model" (600 HU and up is lesion) finds the lesions ``hot``, ``island`` and ``warm`` and misses
``missed`` (500 HU)."""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from analysis.cohort.layout import Cohort
from analysis.cohort.validate import validate_dataset
from analysis.imaging.io import read_array
from analysis.review.journal import Journal
from analysis.review.store import Source, StudyStore
from tests import review_fixture as fx
from tests.badinput import invoke


def _ids(root: Path) -> dict[str, int]:
    """The lesion id of each designed lesion the model found (by centroid)."""
    store = StudyStore([Source.spool(root) if (root / "done").is_dir() else Source.pred(root)])
    (study,) = store.studies()
    rows = store.rows(study)
    out = {}
    for name in ("hot", "island", "warm"):
        centre = np.array(fx.centre_mm(name))
        out[name] = int(min(rows, key=lambda r: np.linalg.norm(np.array([r["x_mm"], r["y_mm"], r["z_mm"]]) - centre))
                        ["lesion_id"])
    assert sorted(out.values()) == [1, 2, 3]
    return out


def viewer_seg(series_files: list[Path], mask: np.ndarray, path: Path, *, creator: str | None = "Reader^Jane",
               manufacturer: str = "Slicer", sop: str | None = None) -> Path:
    """A SEG as a viewer saves it after an edit: one segment holding every lesion, its own
    Manufacturer and series, the reader as content creator (highdicom, as 3D Slicer's writer)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = sorted((pydicom.dcmread(f) for f in series_files), key=lambda d: float(d.ImagePositionPatient[2]))
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="edited lesions",
        segmented_property_category=codes.cid7150.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.cid7151.NeoplasmSecondary,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask.astype(np.uint8), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=77,
        sop_instance_uid=hd.UID(sop) if sop else hd.UID(),
        instance_number=1, manufacturer=manufacturer, manufacturer_model_name="Segment Editor",
        software_versions="5.6", device_serial_number="1", content_creator_name=creator)
    seg.save_as(path)
    return path


def _send(port: int, path: Path) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import SegmentationStorage

    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(SegmentationStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="BONEMETS")
    assert assoc.is_established
    status = int(assoc.send_c_store(pydicom.dcmread(path)).Status)
    assoc.release()
    return status


@pytest.fixture(scope="module")
def spool(tmp_path_factory):
    """A node's spool after it predicted the phantom's study (the results had nowhere to go)."""
    base = tmp_path_factory.mktemp("learning")
    files = fx.write_study(base / "in" / "pt")
    fx.node_spool(base / "spool", files, "X@127.0.0.1:1", retries=0, retry_seconds=0.0)
    return base / "spool", files


def test_a_viewer_seg_sent_after_the_result_gives_the_review_rows(spool, tmp_path):
    """island deleted, missed added, hot and warm saved unchanged; C-STOREd to the running node."""
    from analysis.node.deliver import Destination
    from analysis.node.server import Node, NodeConfig

    root = Path(shutil.copytree(spool[0], tmp_path / "spool"))
    files = spool[1]
    ids = _ids(root)
    edited = fx.box("hot") | fx.box("warm") | fx.box("missed")
    seg = viewer_seg(files, edited, tmp_path / "edited.dcm")
    own = next((root / "undelivered").glob("*/pred/dicom_seg/*.dcm"))  # the node's own SEG, routed back
    node = Node(NodeConfig(spool=root, destination=Destination.parse("X@127.0.0.1:1"), port=0, idle_seconds=0.2,
                           min_free_gb=0.0, retries=0), lambda series_dir, out: fx.predict(series_dir, out))
    _, port = node.listen()
    runner = threading.Thread(target=node.run, kwargs={"poll": 0.05})
    runner.start()
    try:
        assert _send(port, own) == 0 and _send(port, seg) == 0
        deadline = time.time() + 30
        while len(Journal(root).rows()) < 5:
            assert time.time() < deadline, Journal(root).rows()
            time.sleep(0.1)
        time.sleep(0.5)  # nothing more comes
    finally:
        node.stop()
        runner.join(30)
    rows = Journal(root).rows()
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert {(r["study_uid"], r["series_uid"], r["reader"], r["source"], r["model_fingerprint"]) for r in rows} == {
        (study_uid, series_uid, "Reader^Jane", "viewer", fx.FINGERPRINT)}
    got = sorted((r["lesion_id"], r["decision"], r["reason"], r["note"]) for r in rows[:-1])
    assert got == sorted([(str(ids["hot"]), "accept", "", "viewer: kept, Dice 1.000"),
                          (str(ids["warm"]), "accept", "", "viewer: kept, Dice 1.000"),
                          (str(ids["island"]), "reject", "other", "viewer: deleted"),
                          ("4", "add", "", "viewer: added")])
    assert rows[-1]["decision"] == "sign" and rows[-1]["lesion_id"] == ""
    # the added lesion's voxels are the viewer's, and the study now reads as reviewed
    entries = Journal(root).read(study_uid)
    from analysis.review.growing import decode_voxels

    (add,) = [e for e in entries if e.decision.decision == "add"]
    assert np.array_equal(decode_voxels(add.detail["voxels"]), np.flatnonzero(fx.box("missed")))
    from analysis.review.service import ReviewService

    service = ReviewService(StudyStore([Source.spool(root)]))
    assert service.worklist()[0]["state"].startswith("signed by Reader^Jane")
    assert not list((root / "viewer").glob("*.dcm")) and not list((root / "failed").iterdir())


def test_a_reshaped_lesion_and_a_seg_of_another_series_or_our_own(spool, tmp_path):
    from analysis.review.viewer import ViewerIgnored, review_viewer_seg

    root = Path(shutil.copytree(spool[0], tmp_path / "spool"))
    files = spool[1]
    ids = _ids(root)
    shrunk = fx.box("hot").copy()
    shrunk[2] = False  # one of hot's four slices erased: Dice 6/7
    edited = shrunk | fx.box("island") | fx.box("warm")
    result = review_viewer_seg(viewer_seg(files, edited, tmp_path / "a.dcm", creator=None), root)
    assert result["changes"] == {"kept": sorted([ids["island"], ids["warm"]]), "reshaped": [ids["hot"]],
                                 "deleted": [], "added": []}
    assert result["reader"] == "Slicer"  # no content creator: the viewer's manufacturer
    rows = Journal(root).rows()
    (hot,) = [r for r in rows if r["lesion_id"] == str(ids["hot"])]
    assert (hot["decision"], hot["note"]) == ("accept", f"viewer: reshaped, Dice {2 * 147 / (196 + 147):.3f}")
    other = fx.write_study(tmp_path / "other", patient_id="OTHER", seed=1)
    with pytest.raises(ViewerIgnored, match="no series this node predicted"):
        review_viewer_seg(viewer_seg(other, fx.box("hot"), tmp_path / "b.dcm"), root)
    with pytest.raises(ViewerIgnored, match="written by bonemets itself"):
        review_viewer_seg(viewer_seg(files, fx.box("hot"), tmp_path / "c.dcm", manufacturer="bonemets"), root)


def _reviewed_pred(predicted: Path, tmp_path: Path) -> tuple[Path, str, dict[str, int]]:
    """A copy of the PRED folder, reviewed on the page: island rejected, hot and warm accepted,
    missed added by a click, signed."""
    from analysis.review.service import ReviewService

    pred = Path(shutil.copytree(predicted, tmp_path / "PRED" / "thr"))
    service = ReviewService(StudyStore([Source.pred(pred)]))
    (study,) = service.store.studies()
    ids = _ids(pred)
    service.decide(study.uid, ids["island"], {"decision": "reject", "reason": "bone island"}, "alice")
    service.decide(study.uid, ids["hot"], {"decision": "accept"}, "alice")
    service.decide(study.uid, ids["warm"], {"decision": "accept"}, "alice")
    service.add(study.uid, {"point_mm": list(fx.centre_mm("missed"))}, "alice")
    service.sign(study.uid, "alice")
    return pred, study.uid, ids


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    base = tmp_path_factory.mktemp("import")
    files = fx.write_study(base / "images" / "pt")
    return fx.predict(base / "images", base / "PRED" / "thr"), files


def test_import_reviews_writes_what_the_reviews_say_voxel_for_voxel(predicted, tmp_path):
    from analysis.review.import_reviews import case_id_of

    pred, uid, _ = _reviewed_pred(predicted[0], tmp_path)
    dataset = tmp_path / "DATASET"
    r = invoke(["import-reviews", pred, "--dataset", dataset])
    assert r.exit_code == 0, r.output
    series_uid = str(pydicom.dcmread(predicted[1][0], stop_before_pixels=True).SeriesInstanceUID)
    case = case_id_of(uid, series_uid)
    cohort = Cohort(dataset)
    assert cohort.cases() == [case]
    label, geometry = read_array(cohort.label_path(case))
    negatives, _ = read_array(cohort.negatives_path(case))
    image, image_geometry = read_array(cohort.image_path(case))
    assert not geometry.mismatch(image_geometry) and image.shape == fx.GEOMETRY.shape
    np.testing.assert_array_equal(label, fx.box("hot") | fx.box("warm") | fx.box("missed"))
    np.testing.assert_array_equal(negatives, fx.box("island"))
    np.testing.assert_array_equal(image, fx.phantom_ct(0))
    record = json.loads(cohort.reviews_path.read_text(encoding="utf-8"))["cases"][case]
    assert (record["study_uid"], record["series_uid"], record["source"], record["reader"]) == (
        uid, series_uid, "page", "alice")
    assert record["lesions"] == {"kept": 3, "added": 1, "rejected": 1} and record["model_fingerprint"] == fx.FINGERPRINT
    assert validate_dataset(dataset).ok
    # resumable: a second run keeps the case as it is
    before = {p: p.stat().st_mtime_ns for p in (cohort.image_path(case), cohort.label_path(case))}
    r = invoke(["import-reviews", pred, "--dataset", dataset])
    assert r.exit_code == 0 and "0 imported, 1 already imported" in r.output
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_import_reviews_of_viewer_edits_joins_the_training_folds_and_skips_a_bad_study(predicted, tmp_path):
    """Two studies reviewed in a viewer at the node; one's CT is then gone: the other is imported
    (the viewer's SEG as its label, its deleted lesion as hard negative), the bad one reported, exit 2."""
    from analysis.cohort.phantom import generate_cohort
    from analysis.cohort.splits import write_splits
    from analysis.review.import_reviews import case_id_of
    from analysis.review.viewer import review_viewer_seg

    root = tmp_path / "spool"
    series = []
    for seed, patient in ((0, "FIRST"), (3, "SECOND")):
        files = fx.write_study(tmp_path / "in" / patient / "pt", patient_id=patient, seed=seed)
        fx.node_spool(root, files, "X@127.0.0.1:1", retries=0, retry_seconds=0.0)
        review_viewer_seg(viewer_seg(files, fx.box("hot") | fx.box("missed"), tmp_path / f"{patient}.dcm"), root)
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        series.append((str(header.StudyInstanceUID), str(header.SeriesInstanceUID)))
    second = next(j for j in (root / "undelivered").iterdir()
                  if pydicom.dcmread(next((j / "input").glob("*.dcm")), stop_before_pixels=True).PatientID == "SECOND")
    shutil.rmtree(second / "input")
    dataset = generate_cohort(tmp_path / "DATASET", cases=4, shape=(12, 48, 48))
    write_splits(dataset, test_fraction=0.25, folds=2, seed=0)
    before = json.loads((dataset / "splits.json").read_text(encoding="utf-8"))
    r = invoke(["import-reviews", root, "--dataset", dataset])
    assert r.exit_code == 2, r.output
    good, bad = case_id_of(*series[0]), case_id_of(*series[1])
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and series[1][0] in errors[0], r.output
    cohort = Cohort(dataset)
    assert good in cohort.cases() and bad not in cohort.cases() and not cohort.has_negatives(bad)
    label, _ = read_array(cohort.label_path(good))
    negatives, _ = read_array(cohort.negatives_path(good))
    np.testing.assert_array_equal(label, fx.box("hot") | fx.box("missed"))
    np.testing.assert_array_equal(negatives, fx.box("island") | fx.box("warm"))
    record = json.loads(cohort.reviews_path.read_text(encoding="utf-8"))["cases"][good]
    assert (record["source"], record["reader"]) == ("viewer", "Reader^Jane")
    splits = json.loads((dataset / "splits.json").read_text(encoding="utf-8"))
    assert splits["test"] == before["test"]
    for fold, old in zip(splits["folds"], before["folds"]):
        assert fold["train"] == sorted(old["train"] + [good]) and fold["val"] == old["val"]
    assert validate_dataset(dataset).ok


def test_a_second_viewer_seg_adds_its_rows_and_a_page_signature_is_final(spool, tmp_path):
    from analysis.review.service import ReviewService
    from analysis.review.viewer import ViewerIgnored, review_viewer_seg

    root = Path(shutil.copytree(spool[0], tmp_path / "spool"))
    files = spool[1]
    first = review_viewer_seg(viewer_seg(files, fx.box("hot") | fx.box("missed"), tmp_path / "a.dcm"), root)
    second = review_viewer_seg(viewer_seg(files, fx.box("hot") | fx.box("warm") | fx.box("missed"),
                                          tmp_path / "b.dcm", creator="Reader^Max"), root)
    assert first["changes"]["added"] == [4] and second["changes"]["added"] == [5]  # numbered after every id used
    with pytest.raises(ViewerIgnored, match="read before"):  # the same SEG sent again adds nothing
        review_viewer_seg(viewer_seg(files, fx.box("hot"), tmp_path / "b2.dcm", sop=second["seg"]["sop_instance_uid"]),
                          root)
    rows = Journal(root).rows()
    assert [r["decision"] for r in rows].count("sign") == 2 and rows[-1]["reader"] == "Reader^Max"
    # the review page shows the study as reviewed by the first viewer, and refuses a signature on top
    service = ReviewService(StudyStore([Source.spool(root)]))
    assert service.worklist()[0]["state"].startswith("signed by Reader^Jane")
    # a study signed on the page is final: a viewer SEG of it is ignored
    other = Path(shutil.copytree(spool[0], tmp_path / "spool2"))
    service = ReviewService(StudyStore([Source.spool(other)]))
    (study,) = service.store.studies()
    for lesion in (1, 2, 3):
        service.decide(study.uid, lesion, {"decision": "accept"}, "alice")
    service.sign(study.uid, "alice")
    with pytest.raises(ViewerIgnored, match="signed on the review page by alice"):
        review_viewer_seg(viewer_seg(files, fx.box("hot"), tmp_path / "c.dcm"), other)
    assert [r["decision"] for r in Journal(other).rows()] == ["accept"] * 3 + ["sign"]
