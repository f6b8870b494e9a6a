"""Smoke tests of the benchmark suite's driver (no timing assertions: speed is measured by
``benchmarks/run.py``, never asserted in tests)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import run as bench  # noqa: E402
from unet_flops import unet_forward_flops  # noqa: E402


def test_help_runs_without_frameworks():
    code = ("import sys, runpy; sys.argv = ['run.py', '--help']\n"
            "try:\n    runpy.run_path('benchmarks/run.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "assert 'tensorflow' not in sys.modules and 'torch' not in sys.modules, 'framework imported'")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, encoding="utf-8", errors="replace")
    assert out.returncode == 0, out.stderr
    assert "--quick" in out.stdout and "--only" in out.stdout


def test_table_has_ratio_per_row():
    rows = [bench.Row("pipeline: a vs b", 300.0, 20.0, "slices/s"), bench.Row("missing side", None, 2.0, "s")]
    table = bench.format_table(rows).splitlines()
    assert len(table) == 4
    assert "ratio 15" in table[2] and "ratio -" in table[3]
    assert table[2].index("ratio") == table[3].index("ratio")  # aligned columns


def test_rows_from_measurements():
    res = {"analysis": {"metrics": {"metrics": {"project_s": 2.0, "scipy_baseline_s": 10.0}},
                        "radiomics": {"metrics": {"radiomics_jobs1_s_per_lesion": 1.0,
                                                  "radiomics_jobs2_s_per_lesion": 0.5}}}}
    rows = bench.build_rows(res, bench.QUICK)
    assert [round(r.ratio, 6) for r in rows] == [5.0, 2.0]


def test_unet_flops_by_hand():
    # 1-filter-per-level toy UNet at 8x8, context 1: convs (s*s*cin*cout*9*2) and up-convs by hand
    enc = 2 * 64 * 9 * 2 + 2 * 16 * 9 * 2 + 2 * 4 * 9 * 2 + 2 * 1 * 9 * 2
    dec = sum(2 * (s // 2) ** 2 * 4 + s * s * 2 * 9 * 2 for s in (2, 4, 8))
    assert unet_forward_flops(8, filters=(1, 1, 1, 1)) == enc + dec + 64 * 2
