"""A real OHIF Viewer for the tests: the prebuilt viewer of the npm package ``@ohif/app`` at a pinned
version, served with this module's own ``app-config.js`` beside a proxy to a test Orthanc's DICOMweb on
one loopback origin, opened in Debian's Chromium (headless, WebGL through SwiftShader) driven by
Playwright. Framework-free: the test modules that need a model bring their own fixtures.

- :func:`viewer_dist`: ``npm pack @ohif/app@VERSION`` once into a cache folder (``$XDG_CACHE_HOME``
  or ``~/.cache``, then ``bonemets-tests/ohif-VERSION``), checked against the registry's sha512 pinned
  here, and its ``package/dist/`` unpacked there; later runs reuse it.
- :class:`ViewerServer`: a threaded HTTP server on 127.0.0.1 serving ``dist/`` (``index.html`` for
  the viewer's routes, ``.wasm`` as ``application/wasm``, the cross-origin isolation headers OHIF's
  workers need) and forwarding ``/dicom-web/`` to Orthanc (Orthanc 1.10 sends no CORS headers, so
  viewer and DICOMweb must share an origin).
- :class:`Browser` / :class:`ViewerPage`: one headless Chromium, one page per study, with the page's
  console and uncaught errors kept, OHIF's own services read through ``page.evaluate``, screenshots
  written to :func:`artefact_dir`.

Without npm, the registry, Chromium or Playwright a test skips with one line saying what is missing,
except in CI (env ``CI=true``), where it fails.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

OHIF_VERSION = "3.13.2"
#: ``npm view @ohif/app@3.13.2 dist.integrity``: the tarball is refused when its sha512 differs.
OHIF_INTEGRITY = ("sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA==")
CHROMIUM = "/usr/bin/chromium"
#: WebGL without a GPU: ANGLE on SwiftShader (OHIF then logs "software rasterizer detected").
CHROMIUM_ARGS = ("--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--ignore-gpu-blocklist")
#: Where a test's screenshots go when env BONEMETS_TEST_ARTEFACTS names no folder.
ARTEFACTS_ENV = "BONEMETS_TEST_ARTEFACTS"
#: Set to 1 to let the test that takes the documentation's screenshot write it into docs/images/.
DOCS_SCREENSHOT_ENV = "BONEMETS_UPDATE_DOCS_SCREENSHOT"
#: Text of OHIF's error boundary (``ErrorBoundary`` in @ohif/ui).
ERROR_BOUNDARY = "Something went wrong"


class ViewerUnavailable(RuntimeError):
    """The viewer, npm or the browser is missing; the message says how to get it."""


def unavailable(reason: str) -> None:
    """Skip with ``reason``; fail in CI (env CI=true), where everything must be there."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (.ci/run installs it)", pytrace=False)
    pytest.skip(reason)


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/bonemets-tests`` (``~/.cache/bonemets-tests`` without the variable)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bonemets-tests"


def _sri(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode("ascii")


def viewer_dist(version: str = OHIF_VERSION, integrity: str = OHIF_INTEGRITY) -> Path:
    """The prebuilt viewer's ``dist/`` folder, fetched with ``npm pack`` on first use.

    Raises:
        ViewerUnavailable: no npm, the registry unreachable, or a tarball whose sha512 is not
            ``integrity``.
    """
    home = cache_root() / f"ohif-{version}"
    dist = home / "dist"
    if (dist / "index.html").is_file():
        return dist
    npm = shutil.which("npm")
    if npm is None:
        raise ViewerUnavailable("npm missing (OHIF Viewer for the viewer tests): as root, apt-get install -y npm")
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home) as tmp:
        r = subprocess.run([npm, "pack", f"@ohif/app@{version}", "--pack-destination", tmp, "--json"],
                           capture_output=True, text=True, timeout=600, cwd=tmp)
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["no message"])[-1]
            raise ViewerUnavailable(f"npm pack @ohif/app@{version} failed: {tail}")
        (tarball,) = Path(tmp).glob("*.tgz")
        got = _sri(tarball)
        if got != integrity:
            raise ViewerUnavailable(f"{tarball.name}: sha512 {got} differs from the pinned {integrity}")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(tarball) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")]
            tar.extractall(unpacked, members=members, filter="data")
        try:
            os.replace(unpacked / "package" / "dist", dist)
        except OSError:  # another process unpacked it first
            if not (dist / "index.html").is_file():
                raise
    return dist


def require_browser() -> None:
    """Playwright importable and Chromium installed, else skip (fail in CI)."""
    if not Path(CHROMIUM).is_file():
        unavailable("Chromium missing (the OHIF viewer tests' browser): as root, apt-get install -y chromium")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        unavailable("playwright missing: pip install -r requirements.lock")


def require_viewer() -> Path:
    """:func:`require_browser`, then :func:`viewer_dist` (skip, or fail in CI, when unavailable)."""
    require_browser()
    try:
        return viewer_dist()
    except ViewerUnavailable as exc:
        unavailable(str(exc))
        raise  # unreachable: skip/fail raise


def artefact_dir(fallback: Path) -> Path:
    """Where screenshots are kept: env ``BONEMETS_TEST_ARTEFACTS`` (CI uploads it), else ``fallback``."""
    folder = Path(os.environ.get(ARTEFACTS_ENV) or fallback)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def app_config(origin: str) -> str:
    """OHIF's ``window.config``: one DICOMweb data source at ``origin + /dicom-web`` (Orthanc's
    plugin through the proxy), WADO-RS rendering, no study-list or "investigational use" dialogs."""
    root = f"{origin}/dicom-web"
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "test Orthanc", "name": "orthanc",
            "wadoUriRoot": root, "qidoRoot": root, "wadoRoot": root,
            "qidoSupportsIncludeField": True, "supportsWildcard": True, "supportsFuzzyMatching": False,
            "imageRendering": "wadors", "thumbnailRendering": "wadors", "staticWado": False,
            "enableStudyLazyLoad": True, "bulkDataURI": {"enabled": True},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": "/", "extensions": [], "modes": [], "showStudyList": True,
        "maxNumberOfWebWorkers": 2, "showWarningMessageForCrossOrigin": False, "showCPUFallbackMessage": False,
        "showLoadingIndicator": False, "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"}, "showErrorDetails": "always",
        "defaultDataSourceName": "orthanc", "dataSources": [source],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
        "proxy-authenticate"}


class _Handler(SimpleHTTPRequestHandler):
    """Static files of ``dist/`` (index.html for unknown paths), ``/app-config.js`` from memory and
    ``/dicom-web/`` forwarded to Orthanc; every answer cross-origin isolated."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm",
                      ".js": "application/javascript", ".mjs": "application/javascript"}
    upstream: tuple[str, int] = ("127.0.0.1", 0)
    config: bytes = b""
    requests_seen: list[str]
    activity: dict[str, int]  # DICOMweb requests forwarded so far and in flight now
    lock: threading.Lock

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the base class's name)
        pass

    def _proxy(self) -> None:
        with self.lock:
            self.activity["in_flight"] += 1
            self.activity["requests"] += 1
        try:
            self._forward()
        finally:
            with self.lock:
                self.activity["in_flight"] -= 1

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
        finally:
            conn.close()
        self.requests_seen.append(f"{self.command} {self.path} {answer.status}")
        self.send_response(answer.status)
        for k, v in answer.getheaders():
            if k.lower() not in _HOP and k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _static(self) -> None:
        path = urlsplit(self.path).path
        if path == "/app-config.js":
            self.send_response(200)
            self.send_header("Content-Type", "application/javascript")
            self.send_header("Content-Length", str(len(self.config)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(self.config)
            return
        if not Path(self.translate_path(self.path)).is_file():
            self.path = "/index.html"  # the viewer's own routes (/viewer, /segmentation, ...)
        super().do_GET() if self.command == "GET" else super().do_HEAD()

    def do_GET(self) -> None:  # noqa: N802  (http.server's name)
        self._proxy() if self.path.startswith("/dicom-web/") else self._static()

    def do_HEAD(self) -> None:  # noqa: N802
        self._proxy() if self.path.startswith("/dicom-web/") else self._static()

    def do_POST(self) -> None:  # noqa: N802
        if self.path.startswith("/dicom-web/"):
            self._proxy()
        else:
            self.send_error(405)


class ViewerServer:
    """``dist/`` and a DICOMweb proxy to ``orthanc_url`` on ``http://127.0.0.1:PORT``, in a thread."""

    def __init__(self, dist: Path, orthanc_url: str) -> None:
        up = urlsplit(orthanc_url)
        handler = type("Handler", (_Handler,), {"upstream": (up.hostname, up.port), "requests_seen": [],
                                                 "activity": {"requests": 0, "in_flight": 0}, "lock": threading.Lock()})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(dist)))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        handler.config = app_config(self.url).encode("utf-8")
        self.requests_seen = handler.requests_seen
        self.activity = handler.activity
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), name="ohif-viewer", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


#: Tours OHIF shows on a first visit (localStorage ``shownTours``), marked as seen before the page loads.
_TOURS_SEEN = "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"


class Browser:
    """One headless Chromium (Debian's, never a downloaded one) driven by Playwright."""

    def __init__(self) -> None:
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        try:
            self.browser = self._pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=list(CHROMIUM_ARGS))
        except Exception:
            self._pw.stop()
            raise

    def open(self, server: ViewerServer, study_uid: str, *, width: int = 1280, height: int = 800) -> ViewerPage:
        """OHIF's basic viewer on ``study_uid``, once its display sets are known."""
        context = self.browser.new_context(viewport={"width": width, "height": height})
        context.add_init_script(_TOURS_SEEN)
        return ViewerPage(context.new_page(), server, study_uid)

    def close(self) -> None:
        self.browser.close()
        self._pw.stop()


class ViewerPage:
    """OHIF's basic viewer on one study, with what the page logged (``console``, ``errors``)."""

    def __init__(self, page: Any, server: ViewerServer, study_uid: str) -> None:
        self.page = page
        self.server = server
        self.console: list[str] = []
        self.errors: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.goto(f"{server.url}/viewer?StudyInstanceUIDs={study_uid}", wait_until="networkidle", timeout=120_000)
        self.wait_for("() => window.services && services.displaySetService.getActiveDisplaySets().length > 0",
                      what="display sets of the study")
        self.answer("Skip all")
        self.settle()

    def settle(self, quiet: float = 1.5, timeout: float = 60.0) -> None:
        """Wait until the viewer has asked the archive for nothing during ``quiet`` seconds (the
        images it shows are loaded): OHIF fails when a display set is swapped while it loads."""
        deadline = time.time() + timeout
        activity = self.server.activity
        seen, since = activity["requests"], time.time()
        while time.time() - since < quiet and time.time() < deadline:
            self.page.wait_for_timeout(250)
            if activity["requests"] != seen or activity["in_flight"]:
                seen, since = activity["requests"], time.time()

    def wait_for(self, js: str, *, what: str, timeout: float = 60.0) -> Any:
        """Poll the page's JavaScript function ``js`` until it returns something truthy."""
        deadline = time.time() + timeout
        while True:
            value = self.page.evaluate(js)
            if value:
                return value
            if time.time() > deadline:
                raise AssertionError(f"OHIF: no {what} after {timeout:.0f} s; page errors {self.errors[-3:]}, "
                                     f"console {self.console[-5:]}")
            self.page.wait_for_timeout(250)

    def answer(self, button: str, timeout: float = 0.0) -> bool:
        """Click the button named ``button`` if OHIF shows one (within ``timeout`` seconds)."""
        locator = self.page.get_by_role("button", name=button, exact=True)
        deadline = time.time() + timeout
        while not locator.count():
            if time.time() >= deadline:
                return False
            self.page.wait_for_timeout(200)
        locator.first.click()
        return True

    def display_sets(self) -> list[dict[str, Any]]:
        """OHIF's display sets: ``{"uid", "modality", "series_uid", "description"}`` each."""
        return self.page.evaluate("""() => services.displaySetService.getActiveDisplaySets().map(d => ({
            uid: d.displaySetInstanceUID, modality: d.Modality, series_uid: d.SeriesInstanceUID,
            description: d.SeriesDescription || ''}))""")

    def _open(self, series_uid: str) -> str:
        """Double-click the thumbnail of ``series_uid`` in the study panel, as a reader does."""
        (uid,) = [d["uid"] for d in self.display_sets() if d["series_uid"] == series_uid]
        self.page.locator(f'[id="thumbnail-{uid}"]').dblclick()
        return uid

    def open_seg(self, series_uid: str) -> list[dict[str, Any]]:
        """Load the SEG ``series_uid`` ("open this segmentation?": Yes), open the segmentation panel
        and return OHIF's own statistics of each segment: ``{"label", "count", "volume_mm3",
        "mean", "max", "center"}`` (OHIF computes them when the panel shows the segmentation)."""
        self._open(series_uid)
        self.answer("Yes", timeout=20)
        self.wait_for("() => services.segmentationService.getSegmentations().length > 0", what="segmentation")
        self.settle()
        panel = self.page.locator('[data-cy="panelSegmentation-btn"]')
        if panel.count():
            panel.first.click()
        js = """() => { const s = services.segmentationService.getSegmentations()[0];
            const segs = Object.values(s.segments);
            const ready = g => g.cachedStats && g.cachedStats.namedStats && g.cachedStats.namedStats.volume;
            if (!segs.every(ready)) return null;
            return segs.map(g => { const n = g.cachedStats.namedStats; return {label: g.label, count: n.count.value,
                volume_mm3: n.volume.value, mean: n.mean.value, max: n.max.value, center: n.center.value}; }); }"""
        return self.wait_for(js, what="segment statistics", timeout=90)

    def open_sr(self, series_uid: str) -> list[dict[str, Any]]:
        """Load the SR ``series_uid`` into the viewport (declining OHIF's offer to track its
        measurements) and return OHIF's reading of it: one ``{"tracking_id", "tracking_uid",
        "loaded", "labels": [[label, value]...], "sop_instance_uid", "graphic_type", "points"}`` per
        measurement (``loaded``: OHIF placed it on an image of the study; ``points`` the SCOORD's
        GraphicData as (column, row) pairs)."""
        self.settle()
        uid = self._open(series_uid)
        self.answer("No", timeout=10)
        js = f"""() => {{ const d = services.displaySetService.getDisplaySetByUID('{uid}');
            if (!d || !d.isLoaded || !d.measurements) return null;
            return d.measurements.map(m => ({{tracking_id: m.TrackingIdentifier,
                tracking_uid: m.TrackingUniqueIdentifier, loaded: m.loaded === true,
                labels: (m.labels || []).map(l => [l.label, l.value]),
                sop_instance_uid: m.ReferencedSOPInstanceUID || null,
                graphic_type: m.coords && m.coords[0] ? m.coords[0].GraphicType : null,
                points: m.coords && m.coords[0] ? Array.from(m.coords[0].GraphicData) : []}})); }}"""
        found = self.wait_for(js, what="SR measurements", timeout=60)
        try:  # give OHIF a moment to place the measurements on the images it loads
            self.wait_for(js.replace("return d.measurements.map", "if (!d.measurements.every(m => m.loaded)) "
                                     "return null; return d.measurements.map"), what="placed measurements",
                          timeout=20)
        except AssertionError:
            pass
        self.settle()
        deadline = time.time() + 15
        while not self.viewport_text() and time.time() < deadline:  # the first lesion's label box drawn
            self.page.wait_for_timeout(250)
        return self.page.evaluate(js) or found

    def viewport_text(self) -> list[str]:
        """Text drawn over the viewport's image (an SR measurement's label box), line by line."""
        return self.page.locator('[data-cy="viewport-pane"] svg text').evaluate_all(
            """els => els.flatMap(e => { const spans = Array.from(e.querySelectorAll('tspan'));
                return (spans.length ? spans : [e]).map(s => (s.textContent || '').trim()); }).filter(t => t)""")

    def next_measurement(self) -> None:
        """The SR viewport's "next measurement" arrow."""
        self.page.locator('[data-cy="viewport-action-arrows-right"]').first.click()
        self.page.wait_for_timeout(500)

    def boundary_errors(self) -> list[str]:
        """Uncaught page errors and OHIF's error boundary ("Something went wrong"), which logs the
        exception it caught and replaces the viewport."""
        caught = [c for c in self.console if "Error Boundary" in c or ERROR_BOUNDARY in c]
        if self.page.get_by_text(ERROR_BOUNDARY).count():
            caught.append(f"page shows {ERROR_BOUNDARY!r}")
        return self.errors + caught

    def screenshot(self, path: Path) -> Path:
        self.page.screenshot(path=str(path))
        return path

    def close(self) -> None:
        self.page.context.close()


def small_png(page: ViewerPage, path: Path, *, colours: int = 256) -> Path:
    """A screenshot of ``page`` as a palette PNG of ``colours`` colours (about 25 kB instead of 120:
    fit for docs/)."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(page.page.screenshot())).convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=colours, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    return path
