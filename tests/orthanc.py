"""A real Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) for the node's tests: started per test
module on free loopback ports with a temporary storage folder, stopped by its pid."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
INSTALL = "Orthanc missing: as root, apt-get update && apt-get install -y orthanc orthanc-dicomweb"


def require_orthanc() -> None:
    """Skip (one line saying how to install) without Orthanc; never in CI (env CI=true): fail there."""
    if Path(ORTHANC).is_file() and Path(DICOMWEB_PLUGIN).is_file():
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(INSTALL + " (.ci/run installs it)")
    pytest.skip(INSTALL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """One Orthanc process; ``modalities`` are ``{name: (AE, host, port)}`` it may C-STORE to."""

    def __init__(self, folder: Path, modalities: dict[str, tuple[str, str, int]]) -> None:
        self.folder = folder
        self.http, self.dicom = free_port(), free_port()
        self.aet = "ORTHANC"
        self.url = f"http://127.0.0.1:{self.http}"
        config = {"Name": "test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
                  "HttpPort": self.http, "DicomPort": self.dicom, "DicomAet": self.aet,
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "OverwriteInstances": True,
                  "DicomModalities": {k: list(v) for k, v in modalities.items()},
                  "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "orthanc.json").write_text(json.dumps(config), encoding="utf-8")
        self.log = open(folder / "orthanc.log", "wb")
        self.proc = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if requests.get(f"{self.url}/system", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not start; see {folder / 'orthanc.log'}")

    def set_modality(self, name: str, ae: str, port: int, **permissions: bool) -> None:
        """Declare (or change) a modality; ``permissions`` e.g. ``AllowGet=False`` (Orthanc's keys)."""
        requests.put(f"{self.url}/modalities/{name}", json={"AET": ae, "Host": "127.0.0.1", "Port": port,
                                                            **permissions}, timeout=10).raise_for_status()

    def upload(self, files) -> str:
        """POST each file to /instances; returns the Orthanc id of their study."""
        study = None
        for f in files:
            r = requests.post(f"{self.url}/instances", data=Path(f).read_bytes(), timeout=30)
            r.raise_for_status()
            study = r.json()["ParentStudy"]
        return study

    def send(self, modality: str, study: str) -> requests.Response:
        """Ask Orthanc to C-STORE the study to ``modality`` (synchronously)."""
        return requests.post(f"{self.url}/modalities/{modality}/store", json={"Resources": [study], "Synchronous": True},
                             timeout=60)

    def series_of(self, study: str, modality: str) -> list[dict]:
        r = requests.get(f"{self.url}/studies/{study}/series", timeout=10)
        r.raise_for_status()
        return [s for s in r.json() if s["MainDicomTags"].get("Modality") == modality]

    def wait_for(self, study: str, modalities=("SEG", "SR"), timeout: float = 60.0) -> dict[str, list[bytes]]:
        """The files of each modality's instances once every one is in the study."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = {m: self.series_of(study, m) for m in modalities}
            if all(found.values()):
                return {m: [requests.get(f"{self.url}/instances/{i}/file", timeout=10).content
                            for s in found[m] for i in s["Instances"]] for m in modalities}
            time.sleep(0.3)
        raise AssertionError(f"no {modalities} in study {study} after {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.folder / "db", ignore_errors=True)
