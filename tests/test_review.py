"""The reader's review (analysis.review), framework-free and without a browser: the journal, sign-in,
the growing rule, the pictures' orientation, a whole review of a PRED folder down to the final SEG and
report, and the HTTP application's security (Flask's test client). The browser, a real PACS and kill -9
are in tests/test_review_browser.py."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from analysis.errors import InputError
from analysis.imaging.io import Geometry
from analysis.review import auth, growing, journal, views
from analysis.review.journal import COLUMNS, Decision, Journal
from analysis.review.service import Conflict, NotFound, ReviewService, Unprocessable
from analysis.review.store import Source, StudyStore
from tests import review_fixture as fx

ROOT = Path(__file__).resolve().parents[1]
STUDY, SERIES = "1.2.3.4", "1.2.3.4.5"
FAST = {"n": 2 ** 10, "r": 8, "p": 1}  # a cheap scrypt cost for tests that sign in many times


def _decision(lesion, decision="accept", reason=None, study=STUDY, reader="alice"):
    return Decision(study_uid=study, series_uid=SERIES, lesion_id=lesion, decision=decision, reason=reason, note="",
                    reader=reader, time=journal.now(), model_fingerprint="abc", source="page")


# --- the journal ----------------------------------------------------------------------------------


def test_the_decision_record_is_declared_once_and_is_the_csv_header(tmp_path):
    assert COLUMNS == tuple(f.name for f in fields(Decision)) == (
        "study_uid", "series_uid", "lesion_id", "decision", "reason", "note", "reader", "time", "model_fingerprint",
        "source")
    j = Journal(tmp_path)
    j.append(_decision(1))
    assert (tmp_path / "reviews.csv").read_text(encoding="utf-8").splitlines()[0] == ",".join(COLUMNS)
    for bad in (dict(decision="reject", reason=None), dict(decision="reject", reason="ugly"),
                dict(decision="maybe"), dict(decision="sign"), dict(study_uid="../x")):
        with pytest.raises(ValueError):
            replace(_decision(1), **bad)


def test_each_decision_is_in_the_study_journal_and_reviews_csv_in_order(tmp_path):
    j = Journal(tmp_path)
    j.append(_decision(1))
    j.append(_decision(2, "reject", "bone island"))
    j.append(_decision(None, "sign"), {"job": "x"})
    entries = j.read(STUDY)
    assert [(e.decision.lesion_id, e.decision.decision) for e in entries] == [(1, "accept"), (2, "reject"), (None, "sign")]
    assert journal.signature(entries).detail == {"job": "x"}
    assert {k: v.decision.decision for k, v in journal.lesion_states(entries).items()} == {1: "accept", 2: "reject"}
    rows = j.rows()
    assert [(r["lesion_id"], r["decision"], r["reason"], r["source"]) for r in rows] == [
        ("1", "accept", "", "page"), ("2", "reject", "bone island", "page"), ("", "sign", "", "page")]
    assert (tmp_path / "review" / f"{STUDY}.jsonl").is_file() and j.studies() == [STUDY]


def test_a_line_cut_off_by_a_kill_is_skipped_and_cut_before_the_next_append(tmp_path):
    j = Journal(tmp_path)
    j.append(_decision(1))
    with open(j.path(STUDY), "a", encoding="utf-8") as fh:
        fh.write('{"study_uid": "1.2.3.4", "lesi')  # a write cut off mid-line
    with open(j.csv, "a", encoding="utf-8") as fh:
        fh.write("1.2.3.4,1.2.3")
    assert len(j.read(STUDY)) == 1 and len(j.rows()) == 1
    j.append(_decision(2))
    assert [e.decision.lesion_id for e in j.read(STUDY)] == [1, 2]
    assert [r["lesion_id"] for r in j.rows()] == ["1", "2"]
    assert all(json.loads(line) for line in j.path(STUDY).read_text(encoding="utf-8").splitlines())


def test_reconcile_adds_the_rows_a_kill_left_out_of_reviews_csv(tmp_path):
    j = Journal(tmp_path)
    for lesion in (1, 2, 3):
        j.append(_decision(lesion))
    lines = j.csv.read_text(encoding="utf-8").splitlines(keepends=True)
    j.csv.write_text("".join(lines[:2]), encoding="utf-8")  # killed after the journal, before the CSV
    assert Journal(tmp_path).reconcile() == 2
    assert [r["lesion_id"] for r in j.rows()] == ["1", "2", "3"] and Journal(tmp_path).reconcile() == 0


def test_two_writers_on_one_root_lose_no_line(tmp_path):
    writers = [Journal(tmp_path), Journal(tmp_path)]  # e.g. two servers, or the node's viewer rows

    def write(w: Journal, start: int) -> None:
        for i in range(start, start + 25):
            w.append(_decision(i, study=STUDY if i % 2 else "1.2.3.9"))

    threads = [threading.Thread(target=write, args=(w, 100 * n)) for n, w in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = sorted(e.decision.lesion_id for uid in (STUDY, "1.2.3.9") for e in writers[0].read(uid))
    assert ids == sorted([*range(0, 25), *range(100, 125)]) and len(writers[1].rows()) == 50


def test_the_node_can_import_the_journal_writer_alone():
    code = ("import sys, analysis.review.journal as j; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('flask', 'waitress', 'tensorflow', 'torch') "
            "or m.startswith(('analysis.node', 'analysis.review.app', 'analysis.review.service'))]; "
            "assert not bad, bad; print(j.Journal.append.__doc__ is not None)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]


# --- sign-in ----------------------------------------------------------------------------------------


def test_passwords_are_salted_scrypt_and_the_users_file_is_the_owners_alone(tmp_path):
    a, b = auth.hash_password("correct horse", **FAST), auth.hash_password("correct horse", **FAST)
    assert a != b and a.startswith("scrypt$1024$8$1$")
    assert auth.verify_password("correct horse", a) and not auth.verify_password("correct hors", a)
    assert not auth.verify_password("x", "scrypt$bad") and not auth.verify_password("x", "md5$1$2$3$4$5")
    users = tmp_path / "users.txt"
    assert auth.add_user(users, "alice", "s3cret-pass", **FAST) and not auth.add_user(users, "alice", "0ther-pass", **FAST)
    assert users.stat().st_mode & 0o777 == 0o600
    stored = auth.read_users(users)
    assert list(stored) == ["alice"] and auth.check_password(stored, "alice", "0ther-pass")
    assert not auth.check_password(stored, "bob", "0ther-pass") and "0ther-pass" not in users.read_text(encoding="utf-8")
    assert auth.SCRYPT == {"n": 2 ** 15, "r": 8, "p": 3}  # OWASP's equivalent minimum
    for name, password, match in (("a b", "longenough", "user name"), ("../x", "longenough", "user name"),
                                  ("bob", "short", "at least 8")):
        with pytest.raises(InputError, match=match):
            auth.add_user(users, name, password)
    users.write_text("alice plain-text\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 1"):
        auth.read_users(users)


def test_sessions_end_when_idle_and_failed_sign_ins_wait_longer_each_time():
    sessions = auth.Sessions(idle_minutes=0.2 / 60)
    token = sessions.start("alice")
    assert sessions.get(token).user == "alice" and sessions.get("forged") is None
    time.sleep(0.3)
    assert sessions.get(token) is None
    throttle = auth.LoginThrottle(base=1.0, cap=3.0)
    waits = [throttle.failed("user:bob") for _ in range(4)]
    assert [round(w) for w in waits] == [1, 2, 3, 3] and throttle.wait("user:bob", "addr:x") > 2.5
    throttle.succeeded("user:bob")
    assert throttle.wait("user:bob") == 0


# --- the growing rule -------------------------------------------------------------------------------


def _grow_volume():
    g = Geometry(size=(20, 20, 10), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    ct = np.full(g.shape, 250.0)
    ct[3:6, 4:8, 4:8] = 500.0        # a sclerotic lesion
    ct[2:8, 14:16, 2:18] = 900.0     # a long bright bar (cortex) along x
    taken = np.zeros(g.shape, np.int32)
    taken[3:6, 12:14, 12:14] = 7     # a lesion already there
    ct[3:6, 12:14, 12:14] = 800.0
    return ct, g, taken


def test_growing_takes_the_bright_component_of_the_click_and_nothing_else():
    ct, g, taken = _grow_volume()
    expected = np.zeros(g.shape, bool)
    expected[3:6, 4:8, 4:8] = True
    for point in ((5.0, 5.0, 8.0), (3.0, 5.0, 8.0)):  # on it, and one voxel (1 mm) off its edge
        grown = growing.grow(ct, g, point, taken)
        assert np.array_equal(grown.voxels, np.flatnonzero(expected))
    with pytest.raises(growing.GrowRefused, match="lesion 7") as refused:
        growing.grow(ct, g, (12.0, 12.0, 8.0), taken)
    assert refused.value.lesion == 7
    with pytest.raises(growing.GrowRefused, match="no voxel of 400 HU"):
        growing.grow(ct, g, (10.0, 8.0, 8.0), taken)
    with pytest.raises(growing.GrowRefused, match="outside"):
        growing.grow(ct, g, (5.0, 5.0, 40.0), taken)


def test_growing_stops_at_its_radius():
    ct, g, taken = _grow_volume()
    grown = growing.grow(ct, g, (10.0, 14.0, 8.0), taken, radius_mm=4.0)  # on the 16 mm bar
    k, j, i = np.unravel_index(grown.voxels, g.shape)
    d = np.sqrt(((k - grown.seed[0]) * 2.0) ** 2 + (j - grown.seed[1]) ** 2 + (i - grown.seed[2]) ** 2)
    bar = (ct >= 400) & (taken == 0)
    assert d.max() <= 4.0 and bar[k, j, i].all() and i.min() == 6 and i.max() == 14
    assert growing.GROW_HU == 400.0 and growing.GROW_RADIUS_MM == 15.0


# --- the pictures -----------------------------------------------------------------------------------


def test_pictures_are_radiological_and_the_slice_affine_is_simpleitks_geometry():
    """A volume stored RAS-style (direction diag(-1, -1, 1)) with a bright marker at the patient's right,
    anterior: in the axial picture it is at the viewer's top left; every pixel centre maps to its voxel's
    physical point as SimpleITK computes it."""
    import SimpleITK as sitk
    from PIL import Image
    import io

    g = Geometry(size=(16, 12, 4), spacing=(0.5, 0.5, 2.0), origin=(10.0, 20.0, -5.0),
                 direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    ct = np.full(g.shape, 0.0)
    ct[2, -2:, -3:] = 1500.0  # stored last rows/cols: -x is right, -y anterior in LPS
    reo = views.Reorientation.of(g)
    picture = np.asarray(Image.open(io.BytesIO(views.axial_slice(ct, np.zeros(g.shape, np.int32), reo, 2))))
    assert picture.shape[:2] == (12, 16)
    bright = np.argwhere(picture[..., 0] > 200)
    assert bright[:, 0].max() == 1 and bright[:, 1].max() == 2  # top left
    image = sitk.GetImageFromArray(ct)
    g.apply_to(image)
    affine = np.asarray(views.slice_affine(reo))
    for u, v in ((0, 0), (15, 11), (3, 7)):
        canonical = np.array([2, v, u])
        native = reo.backward(np.arange(ct.size).reshape(ct.shape))[tuple(canonical)]  # flat index it shows
        k, j, i = np.unravel_index(native, ct.shape)
        expected = image.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
        assert np.allclose(affine @ [u + 0.5, v + 0.5, 2, 1], expected)


# --- a whole review without a browser -----------------------------------------------------------------


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    base = tmp_path_factory.mktemp("review")
    files = fx.write_study(base / "images" / "pt")
    return fx.predict(base / "images", base / "PRED" / "thr"), files


@pytest.fixture
def pred(predicted, tmp_path) -> Path:
    """A fresh copy of the PRED folder (the review writes its journal into it)."""
    return Path(shutil.copytree(predicted[0], tmp_path / "PRED" / "thr"))


def _service(pred: Path) -> tuple[ReviewService, str]:
    service = ReviewService(StudyStore([Source.pred(pred)]))
    (study,) = service.store.studies()
    return service, study.uid


def _ids(service: ReviewService, uid: str) -> dict[str, int]:
    """The lesion id of each designed lesion the model found (by centroid)."""
    return fx.lesion_ids(service.study(uid, with_slices=False)["lesions"])


def _seg_segments(path: Path, series_files: list[Path]) -> dict[str, np.ndarray]:
    """Each segment's mask of a SEG on the phantom's grid, keyed by its TrackingID."""
    import highdicom as hd

    seg = hd.seg.segread(path)
    headers = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in series_files),
                     key=lambda h: float(h.ImagePositionPatient[2]))
    uids = [str(h.SOPInstanceUID) for h in headers]
    pixels = np.asarray(seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=False,
                                                          assert_missing_frames_are_empty=True))
    return {str(item.TrackingID): pixels[..., i].astype(bool) for i, item in enumerate(seg.SegmentSequence)}


def test_a_review_of_a_pred_folder_signs_the_kept_lesions_voxel_for_voxel(pred, predicted):
    from analysis.imaging.dicom_sr import read_measurement_report

    service, uid = _service(pred)
    ids = _ids(service, uid)
    preliminary = {p: p.read_bytes() for p in (pred / "dicom_seg").glob("*.dcm")}
    service.decide(uid, ids["island"], {"decision": "reject", "reason": "bone island", "note": "round,\n dense"}, "alice")
    service.decide(uid, ids["hot"], {"decision": "accept"}, "alice")
    service.decide(uid, ids["warm"], {"decision": "accept"}, "bob")
    added = service.add(uid, {"point_mm": list(fx.centre_mm("missed"))}, "alice")
    assert added["id"] == 4 and added["added"] and added["decision"] == "accept"
    assert np.array_equal(service.voxels_of(uid, 4), np.flatnonzero(fx.box("missed")))
    signed = service.sign(uid, "alice")["signed"]
    assert signed["by"] == "alice" and signed["lesions"] == [ids["hot"], ids["warm"], 4]
    final = pred / "review" / "signed" / uid
    segments = _seg_segments(final / "seg.dcm", predicted[1])
    assert sorted(segments) == sorted(f"lesion {i}" for i in (ids["hot"], ids["warm"], 4))
    for name, lesion in (("hot", ids["hot"]), ("warm", ids["warm"]), ("missed", 4)):
        assert np.array_equal(segments[f"lesion {lesion}"], fx.box(name)), name
    seg = pydicom.dcmread(final / "seg.dcm")
    prelim = pydicom.dcmread(next(iter(preliminary)))
    kept = {str(s.TrackingID): str(s.TrackingUID) for s in prelim.SegmentSequence}
    for item in seg.SegmentSequence:
        if item.TrackingID != "lesion 4":
            assert item.TrackingUID == kept[item.TrackingID] and item.SegmentAlgorithmType == "AUTOMATIC"
        else:
            assert item.SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert seg.SeriesDescription == "bonemets reviewed" and seg.StudyInstanceUID == uid
    assert seg.SOPInstanceUID != prelim.SOPInstanceUID and seg.SeriesNumber == 9920
    report = read_measurement_report(final / "sr.dcm")
    assert report["verification_flag"] == "VERIFIED" and report["verifying_observer"] == "alice"
    assert [(l["lesion_id"], l["segment"]) for l in report["lesions"]] == [
        (lid, n) for n, lid in enumerate(sorted((ids["hot"], ids["warm"], 4)), 1)]
    assert report["lesions"][-1]["hu_mean"] == pytest.approx(500, abs=3)
    assert all(p.read_bytes() == data for p, data in preliminary.items())  # the preliminary stays
    (job,) = (pred / "review" / "outbox" / "jobs").glob("*.outbox")
    assert sorted(p.name.split("-")[-1] for p in job.glob("*.dcm")) == ["seg.dcm", "sr.dcm"]
    rows = Journal(pred).rows()
    assert [(r["decision"], r["reader"]) for r in rows] == [("reject", "alice"), ("accept", "alice"),
                                                             ("accept", "bob"), ("add", "alice"), ("sign", "alice")]
    assert rows[0]["note"] == "round, dense" and {r["model_fingerprint"] for r in rows} == {fx.FINGERPRINT}
    # the same review signed again (a crash before the journal's sign) gives the same objects' UIDs
    from analysis.review import signing

    volume = service.store.volume(service.study_of(uid))
    again = signing.write_final(volume, Journal(pred).read(uid)[:-1], "alice", pred, pred.parent / "again")
    assert (again["seg"], again["sr"]) == (signed["seg"], signed["sr"])


def test_refusals_name_what_is_wrong(pred):
    service, uid = _service(pred)
    ids = _ids(service, uid)
    for body in (None, [], {"decision": "maybe"}, {"decision": "reject"}, {"decision": "reject", "reason": "ugly"},
                 {"decision": "accept", "note": 5}, {"decision": "accept", "note": "x" * 1001}):
        with pytest.raises(Unprocessable):
            service.decide(uid, 1, body, "alice")
    with pytest.raises(NotFound):
        service.decide(uid, 9, {"decision": "accept"}, "alice")
    with pytest.raises(NotFound):
        service.study("1.2.3.999")
    for body in ({}, {"point_mm": [1, 2]}, {"point_mm": ["a", 1, 2]}, {"point_mm": [0, 0, float("nan")]},
                 {"point_mm": [0.0, 0.0, 500.0]}, {"point_mm": [0.0, 0.0, 10.0]}):
        with pytest.raises(Unprocessable):
            service.add(uid, body, "alice")
    with pytest.raises(Conflict, match=f"lesion {ids['hot']}"):
        service.add(uid, {"point_mm": list(fx.centre_mm("hot"))}, "alice")
    service.decide(uid, 1, {"decision": "accept"}, "alice")
    with pytest.raises(Conflict, match="no decision yet"):
        service.sign(uid, "alice")
    for lesion in (2, 3):
        service.decide(uid, lesion, {"decision": "reject", "reason": "artefact"}, "alice")
    service.sign(uid, "alice")
    for call in (lambda: service.sign(uid, "bob"), lambda: service.decide(uid, 1, {"decision": "reject",
                                                                                   "reason": "other"}, "bob"),
                 lambda: service.add(uid, {"point_mm": list(fx.centre_mm("missed"))}, "bob")):
        with pytest.raises(Conflict, match="signed by alice at "):
            call()
    assert service.worklist()[0]["state"].startswith("signed by alice at ")


def test_a_study_of_which_every_lesion_is_rejected_signs_a_report_of_none(pred):
    from analysis.imaging.dicom_sr import read_measurement_report

    service, uid = _service(pred)
    for lesion in (1, 2, 3):
        service.decide(uid, lesion, {"decision": "reject", "reason": "normal bone"}, "alice")
    assert service.sign(uid, "alice")["signed"]["seg"] is None
    final = pred / "review" / "signed" / uid
    assert not (final / "seg.dcm").exists() and read_measurement_report(final / "sr.dcm")["count"] == 0


def test_a_signature_goes_through_the_node_outbox_undelivered_resend_and_recovery(pred, tmp_path):
    from analysis.node.deliver import Destination, Retries, deliver_due
    from analysis.review.server import ReviewConfig, resend
    from analysis.review.signing import outbox_of

    service, uid = _service(pred)
    for lesion in (1, 2, 3):
        service.decide(uid, lesion, {"decision": "accept"}, "alice")
    service.sign(uid, "alice")
    outbox = outbox_of(pred)
    (job,) = outbox.jobs("outbox")
    shutil.rmtree(outbox.job_path(job, "outbox"))  # killed after the journal's sign, before the outbox opened
    ReviewService(StudyStore([Source.pred(pred)])).recover()
    assert outbox.jobs("outbox") == [job] and len(outbox.pending(job)) == 2
    nowhere = Destination.parse("X@127.0.0.1:1")
    assert deliver_due(outbox, nowhere, calling_ae="BONEMETS", retries=Retries(0, 0.0), what="review") is None
    assert [p.name for p in (outbox.root / "undelivered").iterdir()] == [job]
    assert resend(ReviewConfig(spool=None, preds=(pred,), users=tmp_path / "u")) == [job]
    assert outbox.jobs("outbox") == [job]
    ReviewService(StudyStore([Source.pred(pred)])).recover()  # the job exists: nothing opened twice
    assert outbox.jobs("outbox") == [job] and not list((outbox.root / "done").iterdir())


def test_the_node_keeps_each_series_and_prediction_for_review(tmp_path):
    files = fx.write_study(tmp_path / "in" / "pt")
    fx.node_spool(tmp_path / "spool", files, "X@127.0.0.1:1", retries=0, retry_seconds=0.0)  # nowhere to deliver
    (job,) = (tmp_path / "spool" / "undelivered").iterdir()
    assert (job / "pred" / "lesions.csv").is_file() and len(list((job / "input").glob("*.dcm"))) == len(files)
    assert not list((tmp_path / "spool" / "jobs").iterdir())
    store = StudyStore([Source.spool(tmp_path / "spool")])
    (study,) = store.studies()
    assert study.job == job.name and study.patient_id == "REVIEW01" and study.model_fingerprint == fx.FINGERPRINT
    assert len(store.volume(study).rows) == 3
    from analysis.node.spool import Spool

    Spool(tmp_path / "spool").resend()  # the job moves: the store finds it where it is now
    assert store.folders(study)[0] == tmp_path / "spool" / "jobs" / f"{job.name}.outbox" / "pred"
    with pytest.raises(InputError, match="not a node's spool"):
        Source.spool(tmp_path / "in")


# --- HTTP -------------------------------------------------------------------------------------------


@pytest.fixture
def web(pred, tmp_path):
    from analysis.review.app import create_app

    users = tmp_path / "users.txt"
    auth.add_user(users, "alice", "alice-password", **FAST)
    auth.add_user(users, "bob", "bob-password", **FAST)
    service, uid = _service(pred)
    app = create_app(service, auth.UsersFile(users), throttle=auth.LoginThrottle(base=0.3))
    app.config["USERS_FILE"] = users
    return app, uid


def _sign_in(app, user="alice", password=None):
    client = app.test_client()
    r = client.post("/login", data={"user": user, "password": password or f"{user}-password"})
    assert r.status_code == 302, r.data
    page = client.get("/").get_data(as_text=True)
    csrf = page.split('name="csrf-token" content="')[1].split('"')[0]
    return client, csrf


def test_every_route_needs_a_signed_in_reader(web):
    app, uid = web
    client = app.test_client()
    for path in ("/", f"/studies/{uid}", "/static/review.js", "/static/style.css"):
        r = client.get(path)
        assert r.status_code == 302 and r.headers["Location"].startswith("/login"), path
    for method, path in (("GET", "/api/studies"), ("GET", f"/api/studies/{uid}"),
                         ("GET", f"/api/studies/{uid}/lesions/1/axial.png"), ("GET", f"/api/studies/{uid}/slices/3.png"),
                         ("POST", f"/api/studies/{uid}/lesions/1"), ("POST", f"/api/studies/{uid}/lesions"),
                         ("POST", f"/api/studies/{uid}/sign"), ("POST", "/logout")):
        r = client.open(path, method=method, json={"decision": "accept"})
        assert r.status_code == 401 and r.get_json() == {"error": "sign in first"}, (method, path)
    assert client.get("/login").status_code == 200 and client.get("/login.css").status_code == 200
    r = client.get("/login?next=//evil.example/")
    assert 'name="next" value="/"' in r.get_data(as_text=True)
    rules = {r.rule for r in app.url_map.iter_rules()}
    assert rules == {"/", "/studies/<uid>", "/api/studies", "/api/studies/<uid>", "/api/studies/<uid>/lesions",
                     "/api/studies/<uid>/lesions/<int:lesion_id>", "/api/studies/<uid>/sign",
                     "/api/studies/<uid>/lesions/<int:lesion_id>/<view>.png", "/api/studies/<uid>/slices/<int:k>.png",
                     "/login", "/login.css", "/logout", "/static/<path:filename>"}  # each one checked above


def test_a_wrong_password_does_not_sign_in_and_repeated_ones_are_slowed(web):
    app, _ = web
    client = app.test_client()
    r = client.post("/login", data={"user": "alice", "password": "wrong"})
    assert r.status_code == 401 and "Set-Cookie" not in r.headers and client.get("/api/studies").status_code == 401
    r = client.post("/login", data={"user": "alice", "password": "alice-password"})  # too soon, even when right
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    time.sleep(0.35)
    assert client.post("/login", data={"user": "alice", "password": "wrong again"}).status_code == 401
    time.sleep(0.35)  # the second failure waits 0.6 s
    assert client.post("/login", data={"user": "alice", "password": "alice-password"}).status_code == 429
    time.sleep(0.3)
    r = client.post("/login", data={"user": "alice", "password": "alice-password", "next": "/\\evil.example/"})
    assert r.status_code == 302 and r.headers["Location"] == "/"  # no open redirect (browsers read /\ as //)
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert client.get("/api/studies").status_code == 200


def test_a_reader_added_or_removed_while_the_server_runs(web):
    app, _ = web
    users = app.config["USERS_FILE"]
    bob, _ = _sign_in(app, "bob")
    auth.add_user(users, "carol", "carol-password", **FAST)
    _sign_in(app, "carol")
    text = "".join(line + "\n" for line in users.read_text(encoding="utf-8").splitlines() if not line.startswith("bob:"))
    time.sleep(0.01)
    users.write_text(text, encoding="utf-8")
    assert bob.get("/api/studies").status_code == 401  # his session ends with him


def test_a_post_without_the_csrf_token_or_from_another_site_is_refused(web):
    app, uid = web
    client, csrf = _sign_in(app)
    url = f"/api/studies/{uid}/lesions/1"
    assert client.post(url, json={"decision": "accept"}).status_code == 403
    assert client.post(url, json={"decision": "accept"}, headers={"X-CSRF-Token": "forged"}).status_code == 403
    r = client.post(url, json={"decision": "accept"}, headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-site" in r.get_json()["error"]
    assert client.post("/logout").status_code == 403
    r = client.post(url, json={"decision": "accept"}, headers={"X-CSRF-Token": csrf, "Origin": "http://localhost"})
    assert r.status_code == 200 and r.get_json()["decision"] == "accept"
    assert r.headers["Cache-Control"] == "no-store" and "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    assert client.post("/logout", data={"csrf_token": csrf}).status_code == 302
    assert client.get("/api/studies").status_code == 401


def test_paths_name_a_study_uid_and_a_lesion_number_or_are_not_found(web):
    app, uid = web
    client, csrf = _sign_in(app)
    h = {"X-CSRF-Token": csrf}
    for path in ("/api/studies/..", "/api/studies/..%2F..%2Fetc%2Fpasswd", "/api/studies/1.2.3.999",
                 f"/api/studies/{uid}/lesions/9/axial.png", f"/api/studies/{uid}/lesions/1/oblique.png",
                 f"/api/studies/{uid}/slices/99.png", "/api/studies/%2E%2E/slices/0.png"):
        r = client.get(path)
        assert r.status_code == 404 and "error" in r.get_json(), path
    assert client.get("/studies/..").status_code == 404 and client.get("/studies/1.2.3.999").status_code == 404
    for path in (f"/api/studies/{uid}/lesions/x", f"/api/studies/{uid}/lesions/-1", f"/api/studies/{uid}/lesions/99",
                 "/api/studies/../lesions/1", "/api/studies/1.2.3.999/sign"):
        assert client.post(path, json={"decision": "accept"}, headers=h).status_code == 404, path


def test_the_api_over_http_and_a_second_reader(web, caplog):
    app, uid = web
    caplog.set_level(logging.DEBUG)
    alice, a = _sign_in(app)
    bob, b = _sign_in(app, "bob")
    listed = alice.get("/api/studies").get_json()["studies"]
    assert [(s["uid"], s["lesions"], s["state"], s["patient_id"]) for s in listed] == [(uid, 3, "to review", "REVIEW01")]
    study = alice.get(f"/api/studies/{uid}").get_json()
    assert [l["id"] for l in study["lesions"]] == [1, 2, 3] and study["slices"]["count"] == 12
    assert alice.get(f"/api/studies/{uid}/lesions/1/coronal.png").data[:8] == b"\x89PNG\r\n\x1a\n"
    r = alice.post(f"/api/studies/{uid}/lesions/1", json={"decision": "reject", "reason": "artefact"},
                   headers={"X-CSRF-Token": a})
    assert r.status_code == 200
    seen = bob.get(f"/api/studies/{uid}").get_json()["lesions"][0]
    assert (seen["decision"], seen["reason"], seen["reader"]) == ("reject", "artefact", "alice")
    r = bob.post(f"/api/studies/{uid}/lesions/2", json={"decision": "reject"}, headers={"X-CSRF-Token": b})
    assert r.status_code == 422 and "reason" in r.get_json()["error"]
    r = bob.post(f"/api/studies/{uid}/lesions", data="not json", headers={"X-CSRF-Token": b})
    assert r.status_code == 422
    r = alice.post(f"/api/studies/{uid}/sign", headers={"X-CSRF-Token": a})
    assert r.status_code == 409 and "no decision yet" in r.get_json()["error"]
    r = alice.post(f"/api/studies/{uid}/lesions", json={"point_mm": list(fx.centre_mm("missed"))},
                   headers={"X-CSRF-Token": a})
    assert r.status_code == 201 and r.get_json()["id"] == 4 and r.get_json()["added"] is True
    for lesion in (2, 3):
        bob.post(f"/api/studies/{uid}/lesions/{lesion}", json={"decision": "accept"}, headers={"X-CSRF-Token": b})
    assert alice.post(f"/api/studies/{uid}/sign", headers={"X-CSRF-Token": a}).status_code == 200
    r = bob.post(f"/api/studies/{uid}/sign", headers={"X-CSRF-Token": b})
    assert r.status_code == 409 and r.get_json()["error"].startswith("the study is signed by alice at ")
    page = bob.get(f"/studies/{uid}").get_data(as_text=True)
    assert "signed by alice at" in page and 'data-action="sign"' in page
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "signed by alice" in logged and "lesion 4 added by alice" in logged
    assert "DOE" not in logged.upper() and "JANE" not in logged.upper()  # no patient name in any log line


# --- the command line ----------------------------------------------------------------------------------


def test_add_user_reads_the_password_from_stdin_and_review_needs_its_options(tmp_path, pred):
    from click.testing import CliRunner

    from cli import main

    def invoke(args, input=None):
        return CliRunner().invoke(main, [str(a) for a in args], input=input)

    users = tmp_path / "users.txt"
    r = invoke(["review", "add-user", "carol", "--users", users], input="carol-password\n")
    assert r.exit_code == 0 and "added reader carol" in r.output and users.stat().st_mode & 0o777 == 0o600
    assert auth.check_password(auth.read_users(users), "carol", "carol-password")
    r = invoke(["review", "add-user", "carol", "--users", users], input="short\n")
    assert r.exit_code == 2 and "at least 8" in r.output
    r = invoke(["review", "--pred", pred])
    assert r.exit_code == 2 and "--users FILE is required" in r.output
    r = invoke(["review", "--pred", tmp_path, "--users", users])
    assert r.exit_code == 2 and "predict.json" in r.output and "Traceback" not in r.output
    from cli import review_cmd

    assert {p.name: p.default for p in review_cmd.params}["host"] == "127.0.0.1"
