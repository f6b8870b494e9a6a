"""Seconds per added scan of ``timeline`` on paper-sized CT (issue #36).

Writes (or reuses) ``phantom --scale paper --cases 1 --timepoints 4`` (385 x 512 x 512 at 0.82 x 0.82 x
2.5 mm; each later scan moved and stored on its own grid), then runs ``python cli.py timeline`` in mask mode
on the first 2, 3 and 4 scans, each as a subprocess under ``/usr/bin/time -v``, and prints, per run, the
seconds of each scan (reading, registration to the first, placement, tracking, preview) from
``timeline.json``, the total, the peak resident memory, and whether every track and status (and, for
all four scans, every PCWG3 state) equals the phantom's truth; then ``followup`` on t0 and t1 (the
two-scan case) in the same minutes, for the ratio. Usage:
``python benchmarks/timeline_scans.py [--work DIR]``.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.imaging.records import read_csv  # noqa: E402
from analysis.monitoring.timeline_phantom import SCANS_CSV, TRUTH_CSV, scan_folder  # noqa: E402

CASE = "case_000"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default=None, help="Folder for the phantom and the outputs (default: a temp dir).")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="timeline_bench_"))
    ds = work / "paper"
    if not (ds / SCANS_CSV).is_file():
        subprocess.run([sys.executable, str(ROOT / "cli.py"), "phantom", "--out", str(ds), "--scale", "paper",
                        "--cases", "1", "--timepoints", "4", "--overwrite"], check=True, cwd=ROOT)
    dates = [r["date"] for r in read_csv(ds / SCANS_CSV) if r["case"] == CASE]
    truth = [r for r in read_csv(ds / TRUTH_CSV) if r["case"] == CASE]
    states = [r["state"] for r in read_csv(ds / SCANS_CSV) if r["case"] == CASE]
    results = []
    for n in (2, 3, 4):
        out = work / f"out{n}"
        cmd = [sys.executable, str(ROOT / "cli.py"), "timeline",
               *(str(scan_folder(ds, k) / "imagesTr" / f"{CASE}_0000.nii.gz") for k in range(n))]
        for k in range(n):
            cmd += ["--masks", str(scan_folder(ds, k) / "labelsTr" / f"{CASE}.nii.gz")]
        # the truth calls changes of any size (as the follow-up phantom's): no minimum lesion size here
        cmd += ["--dates", ",".join(dates[:n]), "--min-lesion-ml", "0", "--out", str(out), "--overwrite"]
        run = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=ROOT, capture_output=True, text=True)
        if run.returncode:
            sys.exit(run.stderr[-2000:])
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1)) / 1e6
        record = json.loads((out / "timeline.json").read_text(encoding="utf-8"))
        keys = ("scan", "track", "present", "status", "event", "lesion_ids")
        got = [tuple(r[k] for k in keys) for r in read_csv(out / "tracks.csv")]
        want = [tuple(r[k] for k in keys) for r in truth if int(r["scan"]) < n]
        # the phantom's states are those of all four scans (a shorter timeline has not seen the confirmations)
        same_states = [r["state"] for r in read_csv(out / "timeline.csv")] == states if n == len(states) else None
        results.append({"scans": n, "per_scan": record["seconds"]["scans"], "writing": record["seconds"]["writing"],
                        "total": record["seconds"]["total"], "peak_rss_gb": round(rss, 2),
                        "tracks_equal_truth": got == want, "states_equal_truth": same_states,
                        "bone_dice": [r and r["bone_dice"] for r in record["registrations"]]})
        print(json.dumps(results[-1]), flush=True)
    # the same machine, the same minutes: followup on t0 and t1, the two-scan case, for the ratio
    folder = [scan_folder(ds, k) for k in (0, 1)]
    cmd = [sys.executable, str(ROOT / "cli.py"), "followup", "--baseline", str(folder[0] / "imagesTr" / f"{CASE}_0000.nii.gz"),
           "--followup", str(folder[1] / "imagesTr" / f"{CASE}_0000.nii.gz"),
           "--baseline-mask", str(folder[0] / "labelsTr" / f"{CASE}.nii.gz"),
           "--followup-mask", str(folder[1] / "labelsTr" / f"{CASE}.nii.gz"), "--out", str(work / "followup"),
           "--overwrite"]
    run = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=ROOT, capture_output=True, text=True)
    if run.returncode:
        sys.exit(run.stderr[-2000:])
    pair = json.loads((work / "followup" / "followup.json").read_text(encoding="utf-8"))["seconds"]
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1)) / 1e6
    print(json.dumps({"followup_pair": pair, "peak_rss_gb": round(rss, 2)}), flush=True)
    print(json.dumps({"work": str(work), "results": results, "followup_pair": pair}, indent=1))


if __name__ == "__main__":
    main()
