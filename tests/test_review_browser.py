"""The review in a real browser against a real PACS: Debian's Chromium driven by Playwright, ``python
cli.py review`` as a subprocess on a node's spool, Debian's Orthanc as the PACS.

A reader signs in, rejects a lesion with a reason (the keyboard), accepts the others (a button, the
keyboard), adds the lesion the model missed by clicking it in the slice viewer (rejects it again with
the button, and accepts it), and signs; the review server is
killed with SIGKILL between two decisions and right after the signature. Orthanc then holds the final
SEG (its segments exactly the accepted and added lesions, voxel for voxel) and the VERIFIED report
naming the reader, once each; ``reviews.csv`` holds every decision. Screenshots and the server's logs
are kept under ``out/artefacts/review/``.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from analysis.review.journal import Journal
from tests import review_fixture as fx
from tests.orthanc import Orthanc, free_port, require_orthanc

ROOT = Path(__file__).resolve().parents[1]
ARTEFACTS = ROOT / "out" / "artefacts" / "review"
CHROMIUM = "/usr/bin/chromium"
PASSWORDS = {"alice": "alice-password", "bob": "bob-password"}


def _require(condition: bool, message: str) -> None:
    """Skip with one line where a tool is missing; never under CI (CI=true): fail there."""
    if condition:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (.ci/run installs it)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    _require(Path(CHROMIUM).is_file(), "chromium missing: apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _require(False, "playwright missing: pip install -r requirements.lock")
    with sync_playwright() as p:
        # Debian's Chromium, never a downloaded one
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    require_orthanc()
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), {})
    yield server
    server.stop()


class ReviewServer:
    """``python cli.py review`` as a subprocess (default host), logging to a file."""

    def __init__(self, spool: Path, users: Path, port: int, destination: str, log_dir: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"review.{time.time_ns()}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "cli.py"), "review", "--spool", str(spool), "--users", str(users), "--port",
             str(port), "--destination", destination, "--retry-seconds", "0.2"],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while f"listening on http://127.0.0.1:{port}" not in self.text():
            assert self.proc.poll() is None, f"review exited {self.proc.returncode}: {self.text()}"
            assert time.time() < deadline, f"review not listening after 60 s: {self.text()}"
            time.sleep(0.1)

    def text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.log.close()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self.log.close()
        return code


def _add_user(users: Path, name: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "review", "add-user", name, "--users", str(users)],
                          input=PASSWORDS[name] + "\n", cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _sign_in(page, url: str, name: str) -> None:
    page.goto(url)
    if "/login" in page.url:
        page.fill('input[name="user"]', name)
        page.fill('input[name="password"]', PASSWORDS[name])
        page.click('button[type="submit"]')
        page.wait_for_load_state()
    assert "/login" not in page.url, page.content()[:500]


def _open_study(page, url: str, uid: str) -> None:
    _sign_in(page, f"{url}/studies/{uid}", "alice")
    page.wait_for_selector("#study[data-ready='true']")


def _card(page, lesion: int):
    return page.locator(f'.card[data-lesion-id="{lesion}"]')


def _wait_decision(page, lesion: int, decision: str) -> None:
    page.wait_for_selector(f'.card[data-lesion-id="{lesion}"][data-decision="{decision}"]')


def _ids(page, uid: str) -> dict[str, int]:
    """The lesion id of each designed lesion, as the page's API gives the lesions."""
    return fx.lesion_ids(page.evaluate("async uid => (await (await fetch('/api/studies/' + uid)).json()).lesions", uid))


def _click_missed_lesion(page) -> None:
    """Go to the missed lesion's slice and click its centre voxel (identity geometry: canonical = stored)."""
    (z0, z1), (y0, y1), (x0, x1), _ = fx.LESIONS["missed"]
    k, row, col = (z0 + z1 - 1) // 2, (y0 + y1 - 1) // 2, (x0 + x1 - 1) // 2
    page.locator("#slice-range").fill(str(k))
    page.wait_for_function("k => { const s = document.getElementById('slice'); return s.dataset.slice === String(k)"
                           " && s.complete && s.naturalWidth > 0 && s.src.includes('/slices/' + k + '.png'); }", arg=k)
    box = page.locator("#slice").bounding_box()
    width, height = page.evaluate("() => [document.getElementById('slice').naturalWidth, "
                                  "document.getElementById('slice').naturalHeight]")
    page.mouse.click(box["x"] + (col + 0.5) * box["width"] / width, box["y"] + (row + 0.5) * box["height"] / height)


def _reviewed(orthanc: Orthanc, study: str) -> dict[str, list[str]]:
    """Orthanc instance ids of the study's ``bonemets reviewed`` series, by modality."""
    r = requests.get(f"{orthanc.url}/studies/{study}/series", timeout=10)
    r.raise_for_status()
    out: dict[str, list[str]] = {}
    for s in r.json():
        if s["MainDicomTags"].get("SeriesDescription", "").startswith("bonemets reviewed"):
            out.setdefault(s["MainDicomTags"]["Modality"], []).extend(s["Instances"])
    return out


def _fetch(orthanc: Orthanc, instance: str, path: Path) -> Path:
    path.write_bytes(requests.get(f"{orthanc.url}/instances/{instance}/file", timeout=10).content)
    return path


def _segments(seg_path: Path, files: list[Path]) -> dict[str, np.ndarray]:
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    headers = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in files),
                     key=lambda h: float(h.ImagePositionPatient[2]))
    pixels = np.asarray(seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(h.SOPInstanceUID) for h in headers], combine_segments=False,
        assert_missing_frames_are_empty=True))
    return {str(item.TrackingID): pixels[..., i].astype(bool) for i, item in enumerate(seg.SegmentSequence)}


def test_a_reader_reviews_and_signs_in_a_browser_and_the_pacs_gets_the_result_once(browser, orthanc, tmp_path):
    from analysis.imaging.dicom_sr import read_measurement_report

    shutil.rmtree(ARTEFACTS, ignore_errors=True)
    ARTEFACTS.mkdir(parents=True)
    files = fx.write_study(tmp_path / "in" / "pt")
    study = orthanc.upload(files)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    spool = tmp_path / "spool"
    destination = f"{orthanc.aet}@127.0.0.1:{orthanc.dicom}"
    fx.node_spool(spool, files, destination)  # the node's preliminary SEG and report go to the PACS
    assert len(orthanc.series_of(study, "SEG")) == 1 and not _reviewed(orthanc, study)
    users = tmp_path / "users.txt"
    for name in PASSWORDS:
        _add_user(users, name)
    port = free_port()
    server = ReviewServer(spool, users, port, destination, tmp_path)
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    console: list[str] = []  # a Content-Security-Policy violation is logged here ("Refused to ...")
    page.on("console", lambda msg: console.append(msg.text) if msg.type == "error" else None)
    try:
        _sign_in(page, server.url, "alice")
        page.wait_for_selector(f'tr[data-study-uid="{uid}"]')
        assert page.locator(f'tr[data-study-uid="{uid}"] .state').inner_text() == "to review"
        page.screenshot(path=str(ARTEFACTS / "worklist.png"))
        page.click(f'tr[data-study-uid="{uid}"] a')
        page.wait_for_selector("#study[data-ready='true']")
        ids = _ids(page, uid)
        # reject the bone island with its reason ("r" asks for the reason first), accept the hot lesion
        island = _card(page, ids["island"])
        island.locator('input[name="note"]').fill("dense, round")
        island.locator("h3").click()
        page.keyboard.press("r")
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Choose a reason')")
        assert island.get_attribute("data-decision") == ""
        island.locator('select[name="reason"]').select_option("bone island")
        _wait_decision(page, ids["island"], "reject")
        _card(page, ids["hot"]).locator('[data-action="accept"]').click()
        _wait_decision(page, ids["hot"], "accept")
        server.kill9()  # between two decisions
        server = ReviewServer(spool, users, port, destination, tmp_path)
        _open_study(page, server.url, uid)  # its session died with it: sign in again
        _wait_decision(page, ids["island"], "reject")
        _wait_decision(page, ids["hot"], "accept")
        assert island.locator('select[name="reason"]').input_value() == "bone island"
        assert "rejected (bone island) by alice" in island.locator(".decision").inner_text()
        # the keyboard: down to the next card, up to the warm lesion's, accept it with "a"
        _card(page, ids["warm"]).locator("h3").click()
        page.keyboard.press("ArrowDown" if ids["warm"] == 1 else "ArrowUp")
        page.keyboard.press("ArrowUp" if ids["warm"] == 1 else "ArrowDown")
        assert page.evaluate("() => document.activeElement.dataset.lesionId") == str(ids["warm"])
        page.keyboard.press("a")
        _wait_decision(page, ids["warm"], "accept")
        # the missed lesion: a click in the slice viewer
        _click_missed_lesion(page)
        page.wait_for_selector('.card[data-added="true"][data-lesion-id="4"]')
        assert page.locator('.card[data-added="true"]').count() == 1
        # an added lesion can be rejected again (the button), and accepted again
        added = _card(page, 4)
        added.locator('select[name="reason"]').select_option("other")
        added.locator('[data-action="reject"]').click()
        _wait_decision(page, 4, "reject")
        added.locator('[data-action="accept"]').click()
        _wait_decision(page, 4, "accept")
        page.wait_for_selector('button[data-action="sign"]:not([disabled])')
        page.wait_for_function("() => Array.from(document.querySelectorAll('.card img')).every(i => i.complete "
                               "&& i.naturalWidth > 0)")
        page.evaluate("() => window.scrollTo(0, 0)")
        page.screenshot(path=str(ARTEFACTS / "review-study.png"))  # docs/images/review-study.png
        page.screenshot(path=str(ARTEFACTS / "study-full.png"), full_page=True)
        # a second reader sees the first's decisions
        bob = browser.new_context().new_page()
        _sign_in(bob, f"{server.url}/studies/{uid}", "bob")
        bob.wait_for_selector('.card[data-lesion-id="4"][data-added="true"]')
        _wait_decision(bob, ids["island"], "reject")
        # sign, and kill the server as soon as the page says so
        page.click('button[data-action="sign"]')
        page.wait_for_function("() => document.getElementById('study-state').textContent.startsWith('signed by alice')")
        server.kill9()
        page.screenshot(path=str(ARTEFACTS / "signed.png"))
        server = ReviewServer(spool, users, port, destination, tmp_path)
        deadline = time.time() + 60
        while set(_reviewed(orthanc, study)) != {"SEG", "SR"}:
            assert time.time() < deadline, server.text()
            time.sleep(0.3)
        # bob's stale page: signing is refused with one line
        _sign_in(bob, f"{server.url}/studies/{uid}", "bob")
        bob.wait_for_selector("#study[data-ready='true']")
        answer = bob.evaluate("""async uid => { const r = await fetch('/api/studies/' + uid + '/sign', {method: 'POST',
            headers: {'X-CSRF-Token': document.querySelector('meta[name=csrf-token]').content}});
            return [r.status, (await r.json()).error]; }""", uid)
        assert answer[0] == 409 and answer[1].startswith("the study is signed by alice at "), answer
        _open_study(page, server.url, uid)
        assert page.locator("#study-state").inner_text().startswith("signed by alice at ")
        assert page.locator('button[data-action="sign"]').is_disabled()
        time.sleep(1.5)  # nothing more arrives
        server_text = server.text()
        assert server.stop() == 0
    finally:
        if server.proc.poll() is None:
            server.kill9()
        context.close()
        for log in tmp_path.glob("review.*.log"):
            shutil.copy(log, ARTEFACTS / log.name)
    assert not problems, problems
    (ARTEFACTS / "console.txt").write_text("\n".join(console), encoding="utf-8")
    assert not [m for m in console if "Refused to" in m or "Content Security Policy" in m], console
    # the PACS: the final SEG and report once each, besides the preliminary ones
    reviewed = _reviewed(orthanc, study)
    assert {m: len(v) for m, v in reviewed.items()} == {"SEG": 1, "SR": 1}
    assert len(orthanc.series_of(study, "SEG")) == 2 and len(orthanc.series_of(study, "SR")) == 2
    segments = _segments(_fetch(orthanc, reviewed["SEG"][0], tmp_path / "final-seg.dcm"), files)
    expected = {f"lesion {ids['hot']}": "hot", f"lesion {ids['warm']}": "warm", "lesion 4": "missed"}
    assert sorted(segments) == sorted(expected)
    for tracking, name in expected.items():
        assert np.array_equal(segments[tracking], fx.box(name)), name
    report = read_measurement_report(_fetch(orthanc, reviewed["SR"][0], tmp_path / "final-sr.dcm"))
    assert report["verification_flag"] == "VERIFIED" and report["verifying_observer"] == "alice"
    assert sorted(l["lesion_id"] for l in report["lesions"]) == sorted([ids["hot"], ids["warm"], 4])
    assert len(list((spool / "review" / "outbox" / "done").iterdir())) == 1
    # every decision, in reviews.csv
    rows = Journal(spool).rows()
    assert [(r["lesion_id"], r["decision"], r["reason"]) for r in rows] == [
        (str(ids["island"]), "reject", "bone island"), (str(ids["hot"]), "accept", ""),
        (str(ids["warm"]), "accept", ""), ("4", "add", ""), ("4", "reject", "other"), ("4", "accept", ""),
        ("", "sign", "")]
    assert {(r["reader"], r["source"], r["study_uid"]) for r in rows} == {("alice", "page", uid)}
    assert rows[0]["note"] == "dense, round"
    assert "DOE" not in server_text.upper() and "JANE" not in server_text.upper()
