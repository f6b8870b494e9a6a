"""The node's priors (analysis.node.priors) against a real Orthanc: study- and series-level queries and
retrieval by C-FIND/C-GET and by QIDO-RS/WADO-RS, the node's SEG never taken for CT, the archive before
the PACS, newest first and bounded, and a prior that cannot be retrieved skipped with one log line.

The priors retrieved are "predicted" by a threshold segmenter (HU >= 800) so that this test runs without
a model framework; the node with the real Keras predict is tests/tf/test_node_priors.py.
"""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest

from analysis.cohort.examples import write_dicom_series
from analysis.imaging.inputs import discover_inputs, read_input
from analysis.imaging.io import Geometry, write_array
from analysis.node.deliver import Destination
from analysis.node.priors import Archive, PacsClient, PatientKey, find_priors, series_header
from tests.orthanc import Orthanc, free_port, require_orthanc

G = Geometry((32, 32, 6), (1.0, 1.0, 2.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
NODE = "BONEMETS"


def _ct(seed: int) -> np.ndarray:
    ct = np.full((6, 32, 32), -1000.0)
    ct[:, 6:26, 6:26] = 40
    ct[1:5, 10:22, 10:22] = 300
    ct[2:4, 12 + seed % 3:16 + seed % 3, 12:16] = 900
    return ct


def threshold_predict(series_dir: Path, pred: Path) -> None:
    """A stand-in segmenter for this framework-free test: the voxels >= 800 HU, as a PRED folder mask."""
    (case,) = discover_inputs(series_dir, all_series=False)
    image, _ = read_input(case)
    import SimpleITK as sitk

    from analysis.imaging.io import Geometry as G_

    write_array((sitk.GetArrayFromImage(image) >= 800).astype(np.uint8), G_.of(image), pred / f"{case.case_id}.nii.gz")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc holding patient P1's studies of 2025-01-06, 2025-03-31 (with a SEG series beside its CT) and
    2025-06-23, one of P1 without StudyDate and one of patient P2."""
    require_orthanc()
    tmp = tmp_path_factory.mktemp("pacs")
    server = Orthanc(tmp / "orthanc", {"bonemets": (NODE, "127.0.0.1", 1)})
    studies = {}
    for k, (patient, date) in enumerate([("P1", "20250106"), ("P1", "20250331"), ("P1", "20250623"),
                                         ("P1", ""), ("P2", "20250201")]):
        files = write_dicom_series(_ct(k), G, tmp / f"s{k}", patient_id=patient, localizer=False, study_date=date,
                                   seed=k)
        server.upload(files)
        studies[k] = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        if k == 1:  # the node's own SEG in that study
            from analysis.imaging.dicom import find_series
            from analysis.imaging.dicom_seg import write_dicom_seg

            series = find_series(tmp / f"s{k}")
            mask = (_ct(k) >= 800).astype(np.uint8)
            write_dicom_seg(mask, series, tmp / "seg.dcm", model_name="m", model_version="v", uid_seed="seed")
            server.upload([tmp / "seg.dcm"])
    server.studies_by_index = studies
    yield server
    server.stop()


def _client(pacs, kind: str) -> PacsClient:
    dest = (Destination.parse(f"dicomweb:{pacs.url}/dicom-web") if kind == "dicomweb"
            else Destination.parse(f"{pacs.aet}@127.0.0.1:{pacs.dicom}"))
    return PacsClient(dest, calling_ae=NODE, timeout=10)


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_queries_find_the_patients_ct_studies_and_series_and_retrieve_them(pacs, tmp_path, kind):
    client = _client(pacs, kind)
    uid = pacs.studies_by_index
    found = dict(client.studies(PatientKey("P1")))
    assert found == {uid[0]: dt.date(2025, 1, 6), uid[1]: dt.date(2025, 3, 31), uid[2]: dt.date(2025, 6, 23),
                     uid[3]: None}
    series = client.ct_series(uid[1])  # the study also holds the SEG: not a CT series
    assert len(series) == 1 and series[0][1] == 6
    n = client.retrieve(uid[1], series[0][0], tmp_path / "got")
    files = sorted((tmp_path / "got").glob("*.dcm"))
    assert n == len(files) == 6
    assert {pydicom.dcmread(f, stop_before_pixels=True).Modality for f in files} == {"CT"}
    header = series_header(tmp_path / "got")
    assert (header["patient_id"], header["study_uid"], header["study_date"]) == ("P1", uid[1], dt.date(2025, 3, 31))


def _new_series(tmp: Path, date: str) -> dict:
    files = write_dicom_series(_ct(9), G, tmp / "new", patient_id="P1", localizer=False, study_date=date, seed=9)
    return series_header(files[0].parent)


def test_the_archive_first_then_the_pacs_newest_first_and_bounded(pacs, tmp_path, caplog):
    uid = pacs.studies_by_index
    archive = Archive(tmp_path / "spool")
    # the node predicted the 2025-01-06 study itself earlier
    client = _client(pacs, "dimse")
    (series_uid, _), = client.ct_series(uid[0])
    client.retrieve(uid[0], series_uid, tmp_path / "old" / "ct")
    threshold_predict(tmp_path / "old" / "ct", tmp_path / "old" / "pred")
    archive.add(PatientKey("P1"), series_header(tmp_path / "old" / "ct"), tmp_path / "old" / "ct", tmp_path / "old" / "pred")
    header = _new_series(tmp_path, "20250901")
    with caplog.at_level(logging.INFO):
        priors = find_priors(header, archive, client, limit=2, predict=threshold_predict, work=tmp_path / "work")
    assert [(p.study_uid, p.source) for p in priors] == [(uid[1], "pacs"), (uid[2], "pacs")]  # the newest two
    assert all((p.pred / "ct.nii.gz").is_file() or list(p.pred.glob("*.nii.gz")) for p in priors)
    priors = find_priors(header, archive, client, limit=5, predict=threshold_predict, work=tmp_path / "work")
    assert [(p.study_uid, p.source, p.date) for p in priors] == [
        (uid[0], "archive", dt.date(2025, 1, 6)), (uid[1], "archive", dt.date(2025, 3, 31)),
        (uid[2], "archive", dt.date(2025, 6, 23))]  # the study without StudyDate and P2's are not priors
    # a study dated the same day as the new one, or later, is not a prior
    same_day = dict(header, study_date=dt.date(2025, 3, 31))
    assert [p.study_uid for p in find_priors(same_day, archive, client, limit=5, predict=threshold_predict,
                                             work=tmp_path / "work")] == [uid[0]]


def test_a_prior_that_cannot_be_retrieved_is_skipped_with_one_log_line(pacs, tmp_path, caplog):
    uid = pacs.studies_by_index
    pacs.set_modality("bonemets", NODE, 1, AllowGet=False)  # Orthanc answers C-FIND, refuses C-GET
    try:
        header = _new_series(tmp_path, "20250901")
        with caplog.at_level(logging.WARNING, logger="analysis.node.priors"):
            priors = find_priors(header, Archive(tmp_path / "spool"), _client(pacs, "dimse"), limit=1,
                                 predict=threshold_predict, work=tmp_path / "work")
    finally:
        pacs.set_modality("bonemets", NODE, 1)
    assert priors == []
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("analysis")]
    assert len(lines) == 1 and uid[2] in lines[0] and "could not be retrieved" in lines[0], lines


def test_an_unreachable_pacs_leaves_the_archive_with_one_log_line(tmp_path, caplog):
    client = PacsClient(Destination.parse(f"PACS@127.0.0.1:{free_port()}"), calling_ae=NODE, timeout=3)
    header = _new_series(tmp_path, "20250901")
    with caplog.at_level(logging.WARNING, logger="analysis.node.priors"):
        assert find_priors(header, Archive(tmp_path / "spool"), client, limit=3, predict=threshold_predict,
                           work=tmp_path / "work") == []
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("analysis")]
    assert len(lines) == 1 and "query" in lines[0] and "archive only" in lines[0]  # (beside pynetdicom's own)


def test_the_archive_keeps_the_newest_studies_of_a_patient(tmp_path):
    archive = Archive(tmp_path / "spool")
    key = PatientKey("P1")
    uids = []
    for k, date in enumerate(["20250106", "20250331", "20250623", "20250901"]):
        files = write_dicom_series(_ct(k), G, tmp_path / f"s{k}", patient_id="P1", localizer=False, study_date=date,
                                   seed=k)
        header = series_header(files[0].parent)
        threshold_predict(files[0].parent, tmp_path / f"p{k}")
        archive.add(key, header, files[0].parent, tmp_path / f"p{k}")
        uids.append(header["study_uid"])
    assert archive.prune(key, keep=2) == sorted(uids[:2])
    assert sorted(archive.studies(key)) == sorted(uids[2:])
    assert (tmp_path / "s0").is_dir()  # the archive's copies go, not the inputs
