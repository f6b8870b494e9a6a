"""The OHIF test harness's own server (tests/ohif.py), without a browser: the viewer's files, its
configuration and the DICOMweb proxy on one origin. The viewer itself is exercised in
tests/tf/test_ohif.py."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tests import ohif


class _Upstream(BaseHTTPRequestHandler):
    """A stand-in for Orthanc that echoes what it received."""

    def _echo(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.dumps({"method": self.command, "path": self.path, "host": self.headers["Host"],
                           "accept": self.headers.get("Accept"),
                           "body": self.rfile.read(length).decode("utf-8") if length else None}).encode("utf-8")
        self.send_response(201 if self.command == "POST" else 200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _echo

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served(tmp_path):
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "index.html").write_text("<html>viewer</html>", encoding="utf-8")
    (dist / "a.wasm").write_bytes(b"\0asm\1\0\0\0")
    (dist / "app.bundle.js").write_text("1;", encoding="utf-8")
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=upstream.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    server = ohif.ViewerServer(dist, f"http://127.0.0.1:{upstream.server_address[1]}")
    yield server
    server.stop()
    upstream.shutdown()
    upstream.server_close()


def test_static_files_routes_and_isolation_headers(served):
    wasm = requests.get(f"{served.url}/a.wasm", timeout=10)
    assert wasm.content == b"\0asm\1\0\0\0" and wasm.headers["Content-Type"] == "application/wasm"
    assert requests.get(f"{served.url}/app.bundle.js", timeout=10).headers["Content-Type"] == "application/javascript"
    route = requests.get(f"{served.url}/viewer?StudyInstanceUIDs=1.2.3", timeout=10)  # a route of the viewer
    assert route.status_code == 200 and route.text == "<html>viewer</html>"
    for r in (wasm, route):
        assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"
        assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"


def test_app_config_points_the_viewer_at_the_proxy_on_its_own_origin(served):
    text = requests.get(f"{served.url}/app-config.js", timeout=10).text
    assert text.startswith("window.config = ") and text.rstrip().endswith(";")
    config = json.loads(text[len("window.config = "):].rstrip().rstrip(";"))
    (source,) = config["dataSources"]
    roots = {source["configuration"][k] for k in ("wadoRoot", "qidoRoot", "wadoUriRoot")}
    assert roots == {f"{served.url}/dicom-web"}
    assert config["defaultDataSourceName"] == source["sourceName"]
    assert config["investigationalUseDialog"] == {"option": "never"}


def test_dicomweb_requests_go_to_orthanc_unchanged(served):
    r = requests.get(f"{served.url}/dicom-web/studies?PatientID=P1&includefield=00081030", timeout=10,
                     headers={"Accept": "application/dicom+json"})
    echo = r.json()
    assert (r.status_code, echo["method"], echo["path"]) == (200, "GET", "/dicom-web/studies?PatientID=P1&includefield=00081030")
    # Orthanc builds its bulk-data URLs from the Host header: the viewer's origin must reach it
    assert echo["host"] == served.url.removeprefix("http://") and echo["accept"] == "application/dicom+json"
    assert r.headers["Content-Type"] == "application/dicom+json"
    posted = requests.post(f"{served.url}/dicom-web/studies", data="stow", timeout=10)
    assert posted.status_code == 201 and posted.json()["body"] == "stow"
    assert served.requests_seen[-1] == "POST /dicom-web/studies 201"


def test_a_cached_viewer_is_reused_without_npm(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    dist = tmp_path / "bonemets-tests" / f"ohif-{ohif.OHIF_VERSION}" / "dist"
    dist.mkdir(parents=True)
    (dist / "index.html").write_text("<html></html>", encoding="utf-8")
    monkeypatch.setenv("PATH", "")  # no npm on the path: the cache must answer
    assert ohif.viewer_dist() == dist


def test_without_npm_the_viewer_is_unavailable_with_a_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", "")
    with pytest.raises(ohif.ViewerUnavailable, match="npm missing.*apt-get install -y npm"):
        ohif.viewer_dist()


def test_in_ci_a_missing_viewer_fails_instead_of_skipping(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="npm missing"):
        ohif.unavailable("npm missing")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        ohif.unavailable("npm missing")
