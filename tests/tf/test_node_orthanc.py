"""``serve`` against a real Orthanc: Orthanc C-STOREs a phantom study to the node (a subprocess running
the real Keras predict of a tiny RUN); the SEG and SR come back into Orthanc's study, and are read back
through Orthanc's DICOMweb and compared with ``predict --images`` on the same files."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from analysis.cohort.examples import write_dicom_series
from analysis.imaging.dicom_sr import read_measurement_report
from analysis.imaging.io import Geometry, read_array
from analysis.prediction.tables import read_lesions
from tests.badinput import invoke
from tests.orthanc import Orthanc, free_port
from tests.tf.test_new_patients import lively, runs  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[2]
GEOMETRY = Geometry(size=(64, 64, 8), spacing=(0.8, 0.8, 2.5), origin=(-20.0, -10.0, 30.0),
                    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))


def _ct(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ct = np.full((8, 64, 64), -1000.0) + rng.normal(0, 3, (8, 64, 64))
    # the body fills the field of view but for a 3-pixel rim of air (enough for the CT check): the
    # lively RUN's components then lie in tissue, not in the air that predict removes them from
    ct[:, 3:61, 3:61] = rng.normal(40, 20, (8, 58, 58))
    ct[1:5, 20:27, 16:23] = 900
    ct[3:7, 34:40, 38:45] = 700
    return np.rint(ct)


def _series(folder: Path, seed: int, *, localizer: bool = True) -> list[Path]:
    return write_dicom_series(_ct(seed), GEOMETRY, folder, patient_id=f"NODE{seed}", localizer=localizer, seed=seed)


@pytest.fixture(scope="module")
def threshold(lively, tmp_path_factory):  # noqa: F811
    """A threshold that gives the lively RUN some lesions on the phantom: the 97th percentile of its
    probabilities inside the body (its components in the air around it are removed as lesions in air)."""
    folder = tmp_path_factory.mktemp("thr")
    _series(folder / "in" / "p", 0, localizer=False)
    r = invoke(["predict", "--model", lively, "--images", folder / "in", "--out", folder / "out", "--probabilities",
                "--no-preview"])
    assert r.exit_code == 0, r.output
    (prob,) = (folder / "out" / "probabilities").glob("*.nii.gz")
    levels = np.rint(read_array(prob)[0] * 255)  # the stored steps of 1/255 (the file's slope applied on reading)
    assert levels.max() > levels.min(), "the lively RUN gives one probability everywhere"
    body = levels[_ct(0) > -500]  # the series is stored LPS, as _ct's array
    return (float(np.quantile(body, 0.97)) + 0.5) / 255.0  # between two stored steps: the body's top 3 %


class Node:
    """``python cli.py serve`` as a subprocess, logging to a file."""

    def __init__(self, model, spool: Path, destination: str, threshold: float, *extra: str, port: int | None = None):
        self.port = port or free_port()
        self.log_path = spool.parent / f"{spool.name}.{time.time_ns()}.log"
        self.args = [sys.executable, str(ROOT / "cli.py"), "serve", "--model", str(model), "--spool", str(spool),
                     "--destination", destination, "--port", str(self.port), "--idle-seconds", "1",
                     "--threshold", f"{threshold:.6f}", "--retry-seconds", "0.2", *extra]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_listening()

    def _wait_listening(self, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.text()}")
            if "listening on" in self.text():
                return
            time.sleep(0.2)
        raise AssertionError(f"serve not listening after {timeout} s: {self.text()}")

    def text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_log(self, needle: str, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while needle not in self.text():
            assert time.time() < deadline, f"{needle!r} not logged: {self.text()}"
            time.sleep(0.2)

    def term(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(60)
        self.log.close()
        return rc

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.log.close()


def _dicomweb_series(orthanc: Orthanc, study_uid: str, modality: str) -> list[pydicom.Dataset]:
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=f"{orthanc.url}/dicom-web")
    found = client.search_for_series(study_uid, search_filters={"Modality": modality})
    return [ds for s in found for ds in client.retrieve_series(study_uid, s["0020000E"]["Value"][0])]


def _seg_pixels(ds: pydicom.Dataset, sop_uids: list[str]) -> np.ndarray:
    import highdicom as hd

    seg = hd.seg.Segmentation.from_dataset(ds)
    return np.asarray(seg.get_pixels_by_source_instance(source_sop_instance_uids=sop_uids, combine_segments=True,
                                                        assert_missing_frames_are_empty=True))


def _slice_uids(files: list[Path]) -> list[str]:
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    axial = [h for h in headers if "LOCALIZER" not in h.ImageType]
    return [str(h.SOPInstanceUID) for h in sorted(axial, key=lambda h: float(h.ImagePositionPatient[2]))]


def test_round_trip_through_orthanc_matches_predict_images(orthanc, lively, threshold, tmp_path):  # noqa: F811
    files = _series(tmp_path / "in" / "pt", 1)  # beside a localizer
    study = orthanc.upload(files)
    node = Node(lively, tmp_path / "spool", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom}", threshold)
    orthanc.set_modality("bonemets", "BONEMETS", node.port)
    assert orthanc.send("bonemets", study).ok
    found = orthanc.wait_for(study)
    assert len(found["SEG"]) == 1 and len(found["SR"]) == 1
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    (seg,) = _dicomweb_series(orthanc, study_uid, "SEG")
    (sr,) = _dicomweb_series(orthanc, study_uid, "SR")
    # the same prediction as predict --images on the same files
    r = invoke(["predict", "--model", lively, "--images", tmp_path / "in", "--out", tmp_path / "ref", "--sr",
                "--no-preview", "--threshold", f"{threshold:.6f}"])
    assert r.exit_code == 0, r.output
    (ref_seg,) = (tmp_path / "ref" / "dicom_seg").glob("*.dcm")
    ref = pydicom.dcmread(ref_seg)
    uids = _slice_uids(files)
    np.testing.assert_array_equal(_seg_pixels(seg, uids), _seg_pixels(ref, uids))
    assert seg.SOPInstanceUID == ref.SOPInstanceUID  # deterministic: series UID + model fingerprint
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    report = read_measurement_report(tmp_path / "sr.dcm")
    rows = read_lesions(tmp_path / "ref")
    assert report["count"] == len(rows) == len(seg.SegmentSequence) > 0
    for lesion, row in zip(report["lesions"], rows):
        assert lesion["volume_ml"] == pytest.approx(row["volume_ml"]) and lesion["segment"] == row["lesion_id"]
    assert node.term() == 0
    log = node.text()
    assert "association from ORTHANC" in log and "delivered 2 result(s)" in log
    assert "localizer" in log or "not predicted" in log  # the topogram's own series is not a CT volume
    # sent again: the results replace (same UIDs), nothing is duplicated
    node = Node(lively, tmp_path / "spool", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom}", threshold, port=node.port)
    assert orthanc.send("bonemets", study).ok
    node.wait_log("delivered 2 result(s)")
    assert node.term() == 0
    assert [len(orthanc.series_of(study, m)[0]["Instances"]) for m in ("SEG", "SR")] == [1, 1]


def test_stow_rs_delivery_and_two_studies_at_once(orthanc, lively, threshold, tmp_path):  # noqa: F811
    studies = [orthanc.upload(_series(tmp_path / "in" / f"p{s}", s, localizer=False)) for s in (2, 3)]
    node = Node(lively, tmp_path / "spool", f"dicomweb:{orthanc.url}/dicom-web", threshold)
    orthanc.set_modality("bonemets", "BONEMETS", node.port)
    sends = [threading.Thread(target=orthanc.send, args=("bonemets", s)) for s in studies]
    for t in sends:
        t.start()
    for t in sends:
        t.join()
    for study in studies:
        found = orthanc.wait_for(study)
        assert len(found["SEG"]) == 1 and len(found["SR"]) == 1
    assert node.term() == 0
    assert len(list((tmp_path / "spool" / "done").iterdir())) == 2


def test_an_ae_title_not_allowed_is_rejected(orthanc, lively, threshold, tmp_path):  # noqa: F811
    study = orthanc.upload(_series(tmp_path / "in" / "p", 4, localizer=False))
    node = Node(lively, tmp_path / "spool", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom}", threshold, "--allow", "PACS1")
    orthanc.set_modality("bonemets", "BONEMETS", node.port)
    assert not orthanc.send("bonemets", study).ok
    node.wait_log("rejected")
    assert node.term() == 0
    assert not any((tmp_path / "spool" / "incoming").iterdir())


def test_a_truncated_instance_is_refused_and_the_rest_of_its_series_goes(orthanc, lively, threshold, tmp_path):  # noqa: F811
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    files = _series(tmp_path / "in" / "p", 5, localizer=False)
    uids = _slice_uids(files)
    node = Node(lively, tmp_path / "spool", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom}", threshold)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="BONEMETS")
    assert assoc.is_established
    statuses = {}
    for f in files:
        ds = pydicom.dcmread(f)
        if str(ds.SOPInstanceUID) == uids[-1]:
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]  # a truncated instance, last slice
        statuses[str(ds.SOPInstanceUID)] = int(assoc.send_c_store(ds).Status)
    assoc.release()
    assert statuses.pop(uids[-1]) == 0xA900 and set(statuses.values()) == {0}
    node.wait_log("delivered 2 result(s)")
    assert node.term() == 0
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    (seg,) = _dicomweb_series(orthanc, study_uid, "SEG")
    referenced = {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced <= set(uids[:-1]) and "truncated" in node.text()


def test_undelivered_results_wait_for_resend(orthanc, lively, threshold, tmp_path):  # noqa: F811
    study = orthanc.upload(_series(tmp_path / "in" / "p", 6, localizer=False))
    closed = free_port()
    node = Node(lively, tmp_path / "spool", f"{orthanc.aet}@127.0.0.1:{closed}", threshold, "--retries", "2")
    orthanc.set_modality("bonemets", "BONEMETS", node.port)
    assert orthanc.send("bonemets", study).ok
    node.wait_log("serve --resend")
    assert node.term() == 0
    assert node.text().count("failed 3 times") == 1 and node.text().count("retry ") == 2  # 0.2 s, then 0.4 s
    assert len(list((tmp_path / "spool" / "undelivered").iterdir())) == 1
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "serve", "--model", str(lively), "--spool",
                        str(tmp_path / "spool"), "--destination", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom}",
                        "--once", "--resend"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    found = orthanc.wait_for(study, timeout=5)
    assert len(found["SEG"]) == 1 and not any((tmp_path / "spool" / "undelivered").iterdir())


@pytest.mark.parametrize("moment", ["reception", "prediction"])
def test_kill_9_and_restart_deliver_each_result_once(orthanc, lively, threshold, tmp_path, moment):  # noqa: F811
    files = _series(tmp_path / "in" / "p", 7 if moment == "reception" else 8, localizer=False)
    study = orthanc.upload(files)
    spool = tmp_path / "spool"
    node = Node(lively, spool, f"{orthanc.aet}@127.0.0.1:{orthanc.dicom}", threshold, "--idle-seconds", "2")
    orthanc.set_modality("bonemets", "BONEMETS", node.port)
    if moment == "reception":
        sender = threading.Thread(target=orthanc.send, args=("bonemets", study))
        sender.start()
        deadline = time.time() + 30
        while not list((spool / "incoming").glob("*/*/*.dcm")):
            assert time.time() < deadline
            time.sleep(0.01)
        node.kill()
        sender.join()
    else:
        assert orthanc.send("bonemets", study).ok
        deadline = time.time() + 30
        while not list((spool / "jobs").glob("*.input")):
            assert time.time() < deadline
            time.sleep(0.05)
        node.kill()
    node = Node(lively, spool, f"{orthanc.aet}@127.0.0.1:{orthanc.dicom}", threshold, port=node.port)
    if moment == "reception":
        assert orthanc.send("bonemets", study).ok  # the PACS sends the study again
    node.wait_log("delivered 2 result(s)")
    time.sleep(2.5)  # nothing more comes
    assert node.term() == 0
    assert len(list((spool / "done").iterdir())) == 1 and not list((spool / "failed").iterdir())
    assert [len(orthanc.series_of(study, m)[0]["Instances"]) for m in ("SEG", "SR")] == [1, 1]


def test_sighup_switches_the_model_between_two_series_and_each_result_names_it(orthanc, lively, runs, threshold,
                                                                                tmp_path):  # noqa: F811
    """serve --model LINK: series 1 with the RUN the link names; the link moves to a fine-tune of it
    and SIGHUP; series 2 with the fine-tune. The spool's records, the log and the SEGs in the PACS
    each name the model that made them."""
    import json

    from bonemets_tf.run import read_run

    child = tmp_path / "child"
    r = invoke(["train", "--dataset", runs.train_dataset, "--init-from", lively, "--out", child, "--epochs", "1",
                "--steps-per-epoch", "1", "--batch-size", "2", "--lr", "1e-7", "--no-guard", "--cache",
                tmp_path / "cache"])
    assert r.exit_code == 0, r.output
    before, after = read_run(lively), read_run(child)
    assert after.name == f"unet fine-tuned from {before.fingerprint()[:8]}"
    link = tmp_path / "current"
    link.symlink_to(lively, target_is_directory=True)
    spool = tmp_path / "spool"
    node = Node(link, spool, f"{orthanc.aet}@127.0.0.1:{orthanc.dicom}", threshold)
    orthanc.set_modality("bonemets", "BONEMETS", node.port)
    studies = []
    for seed, model in ((11, before), (12, after)):
        if model is after:
            link.unlink()
            link.symlink_to(child, target_is_directory=True)
            node.proc.send_signal(signal.SIGHUP)
            node.wait_log(f"SIGHUP: now predicting with {after.name} ({after.fingerprint()})")
        files = _series(tmp_path / "in" / f"p{seed}", seed, localizer=False)
        studies.append((orthanc.upload(files), str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)))
        assert orthanc.send("bonemets", studies[-1][0]).ok
        node.wait_log(f"predicted by {model.name} ({model.fingerprint()})")
        orthanc.wait_for(studies[-1][0])
    assert node.term() == 0
    records = sorted((json.loads((job / "model.json").read_text(encoding="utf-8")) for job in (spool / "done").iterdir()),
                     key=lambda rec: rec["name"])
    assert [(rec["name"], rec["fingerprint"], rec["source"]) for rec in records] == [
        (before.name, before.fingerprint(), str(before.path)), (after.name, after.fingerprint(), str(after.path))]
    for (_, study_uid), model in zip(studies, (before, after)):
        (seg,) = _dicomweb_series(orthanc, study_uid, "SEG")
        assert seg.ManufacturerModelName == model.name
        assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == \
            model.fingerprint()
