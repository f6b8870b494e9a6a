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


def test_review_loop_reads_fp_per_case_at_a_sensitivity_off_the_froc_curve():
    """benchmarks/review_loop.py's target: the lowest FP per case among the operating points that
    reach a sensitivity, and the highest threshold doing so (hand-computed curve)."""
    import numpy as np

    from analysis.evaluation.metrics.froc import froc_case, froc_curve
    from benchmarks.review_loop import _fp_at, _threshold_at

    gt = np.zeros((1, 1, 9), np.int64)
    gt[0, 0, 0], gt[0, 0, 4] = 1, 2  # two true lesions
    prob = np.zeros((1, 1, 9))
    prob[0, 0, 0], prob[0, 0, 2], prob[0, 0, 4], prob[0, 0, 6] = 0.9, 0.8, 0.5, 0.3  # hit, FP, hit, FP
    curve = froc_curve([froc_case(prob, gt, 2), froc_case(np.zeros((1, 1, 9)), np.zeros((1, 1, 9), np.int64), 0)])
    assert curve.fp_per_case.tolist() == [0.0, 0.5, 0.5, 1.0] and curve.sensitivity.tolist() == [0.5, 0.5, 1.0, 1.0]
    assert (_fp_at(curve, 0.5), _threshold_at(curve, 0.5)) == (0.0, 0.9)
    assert (_fp_at(curve, 1.0), _threshold_at(curve, 1.0)) == (0.5, 0.5)
    assert np.isnan(_fp_at(curve, 1.01)) and np.isnan(_threshold_at(curve, 1.01))
