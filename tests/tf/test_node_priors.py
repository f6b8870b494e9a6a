"""``serve --priors`` against a real Orthanc, with the real Keras predict of a tiny RUN: a patient with three
CT studies. The node sees the first two and reports them (the second with its timeline); a node that has
seen nothing of the patient gets the third, fetches the first two from Orthanc (C-FIND, C-GET), predicts
them, and its report names every lesion with the tracking identifier and UID the first two reports gave
it. A prior that cannot be retrieved leaves the new result delivered, with one log line."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from analysis.cohort.examples import write_dicom_series
from analysis.cohort.phantom import generate_case
from analysis.imaging.dicom_sr import read_measurement_report
from analysis.imaging.io import read_array
from analysis.monitoring.timeline_dicom import read_timeline_report
from tests.badinput import invoke
from tests.orthanc import Orthanc, require_orthanc
from tests.tf.test_new_patients import lively, runs  # noqa: F401  (fixtures)
from tests.tf.test_node_orthanc import Node

DATES = ("20250106", "20250331", "20250623")


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Three CT studies of patient TL1 (the same anatomy, three dates), as DICOM files."""
    tmp = tmp_path_factory.mktemp("tl1")
    pc = generate_case(7, (20, 96, 96), (1.5, 1.5, 5.0), include_head=False, lesion_free=False)
    return [write_dicom_series(pc.ct, pc.geometry, tmp / f"s{k}", patient_id="TL1", localizer=False,
                               study_date=date, seed=k) for k, date in enumerate(DATES)]


@pytest.fixture(scope="module")
def threshold(lively, studies, tmp_path_factory):  # noqa: F811
    """A threshold that gives the lively RUN some lesions on these CTs (the top 3 % of its stored steps)."""
    folder = tmp_path_factory.mktemp("thr")
    r = invoke(["predict", "--model", lively, "--images", studies[0][0].parent, "--out", folder / "out",
                "--probabilities", "--no-preview"])
    assert r.exit_code == 0, r.output
    (prob,) = (folder / "out" / "probabilities").glob("*.nii.gz")
    levels = np.rint(read_array(prob)[0] * 255)  # stored steps of 1/255 (the file's slope applied on reading)
    assert levels.max() > levels.min(), "the lively RUN gives one probability everywhere"
    return (float(np.quantile(levels, 0.97)) + 0.5) / 255.0


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    require_orthanc()
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), {"bonemets": ("BONEMETS", "127.0.0.1", 1)})
    yield server
    server.stop()


#: Seconds to wait for a result: a prediction per prior and the registrations on a loaded 2-CPU machine.
WAIT = 600


def _report(orthanc: Orthanc, study: str, tmp: Path, modality: str = "SR") -> Path:
    (data,) = orthanc.wait_for(study, (modality,), timeout=WAIT)[modality]
    path = tmp / f"{study}.{modality}.dcm"
    path.write_bytes(data)
    return path


def test_the_third_study_reuses_the_tracking_uids_of_the_first_two(orthanc, lively, threshold, studies, tmp_path):  # noqa: F811
    ids = [orthanc.upload(files) for files in studies]
    dest = f"{orthanc.aet}@127.0.0.1:{orthanc.dicom}"
    # a node that sees the first two studies: the first alone (predict's report), the second with its timeline
    node = Node(lively, tmp_path / "spool_a", dest, threshold, "--priors", "3")
    orthanc.set_modality("bonemets", "BONEMETS", node.port)
    assert orthanc.send("bonemets", ids[0]).ok
    first = read_measurement_report(_report(orthanc, ids[0], tmp_path))
    assert first["lesions"], "the lively RUN found no lesion: nothing to track"
    assert orthanc.send("bonemets", ids[1]).ok
    node.wait_log("timeline of 2 scans", timeout=WAIT)
    second = read_timeline_report(_report(orthanc, ids[1], tmp_path))
    assert node.term() == 0
    assert "1 earlier CT study" in node.text() and "from the archive" in node.text()
    # every lesion of the first report is a track of the second, under the same identifier and UID
    named = {f"lesion {r['lesion_id']}": r["tracking_uid"] for r in first["lesions"]}
    assert {f"lesion {t['track']}": t["tracking_uid"] for t in second["tracks"] if t["track"] <= len(named)} == named
    # a node that has seen nothing of the patient gets the third: both priors come from Orthanc
    node = Node(lively, tmp_path / "spool_b", dest, threshold, "--priors", "3")
    orthanc.set_modality("bonemets", "BONEMETS", node.port)
    assert orthanc.send("bonemets", ids[2]).ok
    node.wait_log("timeline of 3 scans", timeout=WAIT)
    third = read_timeline_report(_report(orthanc, ids[2], tmp_path))
    assert node.term() == 0
    log = node.text()
    assert "2 earlier CT studies" in log and "(2025-01-06 from the pacs, 2025-03-31 from the pacs)" in log
    earlier = {t["track"]: t["tracking_uid"] for t in second["tracks"]}
    got = {t["track"]: t["tracking_uid"] for t in third["tracks"]}
    assert got and {t: got[t] for t in earlier if t in got} == {t: u for t, u in earlier.items() if t in got}
    assert set(named.values()) <= set(got.values())
    seg = pydicom.dcmread(_report(orthanc, ids[2], tmp_path, "SEG"))
    assert {str(i.TrackingUID) for i in seg.SegmentSequence} <= set(got.values())


def test_a_prior_that_cannot_be_retrieved_leaves_the_new_result_delivered(orthanc, lively, threshold, studies,  # noqa: F811
                                                                         tmp_path):
    ids = [orthanc.upload(files) for files in studies]
    node = Node(lively, tmp_path / "spool", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom}", threshold, "--priors", "1")
    orthanc.set_modality("bonemets", "BONEMETS", node.port, AllowGet=False)  # C-FIND answered, C-GET refused
    try:
        assert orthanc.send("bonemets", ids[2]).ok
        node.wait_log("delivered 2 result(s)", timeout=WAIT)
    finally:
        orthanc.set_modality("bonemets", "BONEMETS", node.port)
    assert node.term() == 0
    log = node.text()
    assert log.count("could not be retrieved") == 1 and "timeline of" not in log
    assert "0 earlier CT studies" in log
