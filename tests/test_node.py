"""The DICOM node's framework-free parts (analysis.node): destinations, the spool journal, and the SCP
in-process with a network-free predict callable (the Orthanc round trip with a real model is
tests/tf/test_node_orthanc.py)."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest

from analysis.cohort.examples import write_dicom_series
from analysis.errors import InputError
from analysis.imaging.io import Geometry
from analysis.node.deliver import Destination
from analysis.node.server import Node, NodeConfig
from analysis.node.spool import Spool

GEOMETRY = Geometry(size=(32, 32, 6), spacing=(1.0, 1.0, 3.0), origin=(0.0, 0.0, 0.0),
                    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))


def test_destinations_parse_or_say_what_was_expected():
    d = Destination.parse("PACS@10.0.0.5:104")
    assert (d.kind, d.ae_title, d.host, d.port) == ("dimse", "PACS", "10.0.0.5", 104)
    assert Destination.parse("dicomweb:http://h:8042/dicom-web/").url == "http://h:8042/dicom-web"
    for bad in ("PACS@host", "dicomweb:ftp://x", "A@h:70000"):
        with pytest.raises(InputError, match="--destination"):
            Destination.parse(bad)


def test_spool_claims_a_series_once_and_refuses_non_uid_names(tmp_path):
    spool = Spool(tmp_path)
    spool.store("1.2", "1.2.3", "1.2.3.4", b"DICM")
    assert spool.complete_series(10.0, since=0.0) == []  # just arrived
    (series,) = spool.complete_series(0.0, since=0.0)
    job = spool.claim(series)
    assert spool.to_predict() == [job] and not series.exists() and spool.complete_series(0.0, 0.0) == []
    with pytest.raises(ValueError, match="not a DICOM UID"):
        spool.store("../x", "1", "1", b"")
    result = tmp_path / "r" / "dicom_seg" / "a.dcm"
    result.parent.mkdir(parents=True)
    result.write_bytes(b"x")
    spool.open_outbox(job, [result])
    assert spool.to_predict() == [] and [p.name for p in spool.pending(job)] == ["dicom_seg-a.dcm"]
    spool.mark_sent(spool.pending(job)[0])
    assert spool.pending(job) == []
    assert (spool.finish(job) / "sent" / "dicom_seg-a.dcm").is_file() and spool.is_empty()


def _send(port: int, files: list[Path]) -> list[int]:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="BONEMETS")
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    statuses = [int(assoc.send_c_store(pydicom.dcmread(f)).Status) for f in files]
    assoc.release()
    return statuses


def test_low_disk_refuses_with_out_of_resources_and_a_failed_series_is_kept(tmp_path):
    ct = np.full((6, 32, 32), 40.0)
    files = write_dicom_series(ct, GEOMETRY, tmp_path / "in", patient_id="P", localizer=False)
    calls = []

    def predict_series(series_dir: Path, out: Path) -> None:  # network-free: refuses as predict would
        calls.append(sorted(p.name for p in series_dir.glob("*.dcm")))
        raise InputError(f"{series_dir}: a reason predict gives")

    full = Node(NodeConfig(spool=tmp_path / "full", destination=Destination.parse("X@127.0.0.1:1"), port=0,
                           min_free_gb=1e9), predict_series)
    _, port = full.listen()
    try:
        assert set(_send(port, files[:2])) == {0xA700}
    finally:
        full.stop()
        full.run()
    node = Node(NodeConfig(spool=tmp_path / "spool", destination=Destination.parse("X@127.0.0.1:1"), port=0,
                           idle_seconds=0.2, min_free_gb=0.0), predict_series)
    _, port = node.listen()
    runner = threading.Thread(target=node.run)
    runner.start()
    try:
        assert _send(port, files) == [0] * 6
        for _ in range(100):
            if list((tmp_path / "spool" / "failed").glob("*/reason.txt")):
                break
            threading.Event().wait(0.1)
    finally:
        node.stop()
        runner.join(30)
    (reason,) = (tmp_path / "spool" / "failed").glob("*/reason.txt")
    assert "a reason predict gives" in reason.read_text(encoding="utf-8") and len(calls) == 1 and len(calls[0]) == 6
    assert not runner.is_alive()


def test_reload_lets_the_running_series_finish_then_switches_and_each_result_names_its_model(tmp_path, caplog):
    """SIGHUP's effect (Node.reload; the signal itself: tests/tf/test_node_orthanc.py): a reload asked
    while series 1 is being predicted waits for it; series 2 then goes to the new model."""
    import json
    import logging

    from analysis.node.server import MODEL_RECORD, NodeModel

    started, release, calls = threading.Event(), threading.Event(), []

    def model(name: str, *, block: bool = False) -> NodeModel:
        def predict_series(series_dir: Path, out: Path) -> None:
            calls.append((name, series_dir.name.split("-")[0], "start"))
            started.set()
            if block:
                assert release.wait(30)
            out.mkdir(parents=True, exist_ok=True)
            calls.append((name, series_dir.name.split("-")[0], "end"))

        return NodeModel(predict_series, name=name, fingerprint=f"fp-{name}", source=f"/runs/{name}")

    loads = iter([model("new"), InputError("never read")])

    def load_model() -> NodeModel:
        loaded = next(loads)
        if isinstance(loaded, Exception):
            raise loaded
        return loaded

    node = Node(NodeConfig(spool=tmp_path / "spool", destination=Destination.parse("X@127.0.0.1:1"), port=0,
                           idle_seconds=0.0, min_free_gb=0.0), model("old", block=True), load_model=load_model)
    spool = Spool(tmp_path / "spool")
    spool.store("1.2", "1.2.1", "1.2.1.1", b"DICM")
    runner = threading.Thread(target=node.run, kwargs={"once": False, "poll": 0.05})
    caplog.set_level(logging.INFO, logger="analysis.node.server")
    node.listen()  # nothing is sent to it: the spool is filled directly
    runner.start()
    try:
        assert started.wait(30)
        node.reload()  # while series 1 is running
        spool.store("1.2", "1.2.2", "1.2.2.1", b"DICM")
        threading.Event().wait(0.5)  # series 2 is complete now, but must wait for the switch
        assert [c for c in calls if c[1] == "1.2.2"] == []
        release.set()
        for _ in range(200):
            if len(list((tmp_path / "spool" / "done").iterdir())) == 2:
                break
            threading.Event().wait(0.05)
    finally:
        release.set()
        node.stop()
        runner.join(30)
    assert calls == [("old", "1.2.1", "start"), ("old", "1.2.1", "end"), ("new", "1.2.2", "start"),
                     ("new", "1.2.2", "end")]
    records = {job.name.split("-")[0]: json.loads((job / MODEL_RECORD).read_text(encoding="utf-8"))
               for job in (tmp_path / "spool" / "done").iterdir()}
    assert records == {"1.2.1": {"name": "old", "fingerprint": "fp-old", "source": "/runs/old"},
                       "1.2.2": {"name": "new", "fingerprint": "fp-new", "source": "/runs/new"}}
    text = caplog.text
    assert "series 1.2.1: predicted by old (fp-old)" in text and "series 1.2.2: predicted by new (fp-new)" in text
    assert "SIGHUP: now predicting with new (fp-new) from /runs/new; before: old (fp-old)" in text
    # a model that cannot be read is refused in one line and the node keeps the one it has
    node.reload()
    node._swap_model()
    assert node.model.name == "new" and "the model could not be read (never read); still predicting with new" in caplog.text
