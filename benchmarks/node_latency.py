"""Seconds from the last CT instance sent to the SEG being in the PACS, for the DICOM node (``serve``).

A real Orthanc (Debian's orthanc + orthanc-dicomweb) C-STOREs a 100-slice phantom series to
``python cli.py serve`` (a subprocess, a Keras RUN given as argument); the clock starts when
Orthanc's synchronous store returns (the last instance was acknowledged) and stops when the SEG is
listed in Orthanc's study. Prints the latency, the idle wait inside it, and the node's peak
resident memory (VmHWM). Usage: ``python benchmarks/node_latency.py RUN [--slices 100] [--idle 2]``.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.cohort.examples import write_dicom_series  # noqa: E402
from analysis.imaging.io import Geometry  # noqa: E402
from tests.orthanc import Orthanc, require_orthanc  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run")
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--idle", type=float, default=2.0)
    args = parser.parse_args()
    require_orthanc()
    tmp = Path(tempfile.mkdtemp(prefix="node_latency_"))
    z, n = args.slices, args.size
    rng = np.random.default_rng(0)
    ct = np.full((z, n, n), -1000.0) + rng.normal(0, 3, (z, n, n))
    body = (slice(None), slice(n // 5, 4 * n // 5), slice(n // 6, 5 * n // 6))
    ct[body] = rng.normal(40, 20, ct[body].shape)
    ct[z // 3:z // 2, n // 3:n // 3 + 8, n // 3:n // 3 + 8] = 900
    geometry = Geometry(size=(n, n, z), spacing=(0.8, 0.8, 2.5), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    files = write_dicom_series(np.rint(ct), geometry, tmp / "in", patient_id="LATENCY", localizer=False)
    import subprocess

    from tests.orthanc import free_port

    port = free_port()
    orthanc = Orthanc(tmp / "orthanc", {"bonemets": ("BONEMETS", "127.0.0.1", port)})
    log = open(tmp / "node.log", "wb")
    node = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", "--model", args.run, "--spool",
                             str(tmp / "spool"), "--destination", f"ORTHANC@127.0.0.1:{orthanc.dicom}", "--port",
                             str(port), "--idle-seconds", str(args.idle)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        while "listening on" not in (tmp / "node.log").read_text(encoding="utf-8", errors="replace"):
            time.sleep(0.2)
        study = orthanc.upload(files)
        t0 = time.perf_counter()
        assert orthanc.send("bonemets", study).ok
        sent = time.perf_counter()
        while not orthanc.series_of(study, "SEG"):
            time.sleep(0.05)
        seg = time.perf_counter()
        status = Path(f"/proc/{node.pid}/status").read_text(encoding="utf-8")
        peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
        text = (tmp / "node.log").read_text(encoding="utf-8", errors="replace")
        predicted = re.search(r"predicted in ([0-9.]+) s", text)
        print(f"{z} slices of {n}x{n}: sending took {sent - t0:.2f} s; last instance sent -> SEG in Orthanc "
              f"{seg - sent:.2f} s, of which idle wait {args.idle:.1f} s and prediction (model load, predict, "
              f"SEG+SR written and read back) {predicted.group(1) if predicted else '?'} s; node peak RSS {peak:.0f} MiB")
    finally:
        node.terminate()
        node.wait(60)
        orthanc.stop()


if __name__ == "__main__":
    main()
