"""A real CT through ``predict`` and ``followup --model``: what a phantom-trained RUN does on it.

The CT is the head CT of Debian's ``invesalius-examples`` (108 x 256 x 256, 0.957 x 0.957 x 1.5
mm; ``tests/real_ct.py`` reads it). Steps, with one Keras RUN (``--run``, e.g. the 1 mm UNet of
``benchmarks/spacing.py``):

1. ``predict --images head.nii.gz``: the case passes the CT check, runs resampled to the RUN's
   pixel spacing; lesions kept, components removed in air or lung;
2. the same CT moved rigidly (``--rotation`` degrees about z and half of it about x, ``--shift`` mm; linear
   resampling onto the same grid, air outside), then ``followup --model RUN --baseline head
   --followup moved``: the motion recovered by the registration, the statuses, and the
   new-lesion flag, which an unchanged patient must not raise.

    python benchmarks/real_ct.py --run RUN --work /tmp/realct_ct [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.imaging.io import write_array  # noqa: E402
from analysis.imaging.records import read_csv  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    from click.testing import CliRunner

    from cli import main as cli
    from tests.real_ct import head_ct, moved

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--rotation", type=float, default=4.0)
    p.add_argument("--shift", default="5,-3,2")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    ct, geometry = head_ct()
    base = args.work / "head.nii.gz"
    write_array(ct, geometry, base)
    shift = tuple(float(v) for v in args.shift.split(","))
    follow = args.work / "moved.nii.gz"
    write_array(np.rint(moved(ct.astype(np.float32), geometry, args.rotation, shift)).astype(np.int16), geometry,
                follow)
    runner = CliRunner()
    pred = args.work / "pred"
    r = runner.invoke(cli, ["predict", "--model", str(args.run), "--images", str(base), "--out", str(pred),
                            "--overwrite"], catch_exceptions=False)
    if r.exit_code != 0:
        raise SystemExit(f"predict failed: {r.output}")
    record = json.loads((pred / "predict.json").read_text(encoding="utf-8"))
    lesions = read_csv(pred / "lesions.csv")
    fu = args.work / "followup"
    r = runner.invoke(cli, ["followup", "--baseline", str(base), "--followup", str(follow), "--model", str(args.run),
                            "--out", str(fu), "--overwrite"], catch_exceptions=False)
    if r.exit_code != 0:
        raise SystemExit(f"followup failed: {r.output}")
    summary = read_csv(fu / "summary.csv")[0]
    rows = read_csv(fu / "lesions.csv")
    fu_record = json.loads((fu / "followup.json").read_text(encoding="utf-8"))
    result = {
        "predict": {"lesions": len(lesions), "volume_ml": round(sum(float(x["volume_ml"]) for x in lesions), 3),
                    "removed_in_air": record["per_case"]["head"].get("removed_in_air"),
                    "spacing": record["per_case"]["head"]["spacing"]},
        "followup": {"summary": summary, "statuses": [(x["status"], x["baseline_ml"], x["followup_ml"]) for x in rows],
                     "registration": {k: fu_record["registration"].get(k) for k in ("bone_dice", "rotation_deg",
                                                                                      "translation_mm")}},
        "motion": {"rotation_deg": args.rotation, "shift_mm": shift},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
