"""A TensorFlow command of the CLI starts without the CUDA platform's noise on a CPU machine."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tensorflow_starts_quietly_through_the_cli():
    """Imported after the CLI's set-up: no cuInit error line without a driver, no absl INFO lines;
    a Python warning raised while TensorFlow runs still shows."""
    script = ("import sys, warnings, cli\n"
              "cli.quiet_tensorflow()\n"
              "import tensorflow as tf\n"
              "assert not any(isinstance(f, cli.QuietTensorFlowImport) for f in sys.meta_path)\n"
              "print(float(tf.reduce_sum(tf.ones(3))))\n"
              "warnings.warn('still shown')\n")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env={**env, "PYTHONPATH": str(ROOT)}, timeout=240)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "3.0"
    lines = r.stderr.splitlines()
    import cli

    if not cli.nvidia_driver():
        assert not any("cuInit" in line or "cuda drivers" in line for line in lines), r.stderr
    assert not any(line.startswith("I0000") for line in lines), r.stderr
    assert any("UserWarning: still shown" in line for line in lines), r.stderr
