"""The CLI's filter of TensorFlow's start-up output: noise of a CPU machine dropped, errors kept."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cli

ROOT = Path(__file__).resolve().parents[1]
CPU_MACHINE = [  # what TensorFlow 2.21 printed on this project's CPU machine
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796624797.547507    8123 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
    "not be used.",
    "I0000 00:00:1796624797.716096    8123 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    "available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
    "appropriate compiler flags.",
    "E0000 00:00:1796624808.627841    8123 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed "
    "call to cuInit: UNKNOWN ERROR (303)",
]
REAL = ["E0000 00:00:1796624808.7    8123 kernel.cc:9] Op failed: out of range",
        "/x/keras/src/y.py:12: UserWarning: something worth reading"]


def test_a_cpu_machines_noise_is_dropped_and_errors_are_kept():
    assert cli.tensorflow_output(CPU_MACHINE + REAL, driver=False, show_info=False) == REAL
    # with a driver, a failed cuInit is a real error; TF_CPP_MIN_LOG_LEVEL=0 asks for INFO
    kept = cli.tensorflow_output(CPU_MACHINE, driver=True, show_info=False)
    assert kept == [CPU_MACHINE[-1]]
    assert cli.tensorflow_output(CPU_MACHINE, driver=True, show_info=True) == CPU_MACHINE[1:]


def test_what_the_process_writes_to_stderr_comes_back_filtered(tmp_path):
    """C++ output goes to file descriptor 2: collected during the block and written back filtered."""
    script = ("import os, cli\n"
              "with cli._filtered_stderr():\n"
              f"    os.write(2, {(chr(10).join(CPU_MACHINE + REAL[:1]) + chr(10)).encode()!r})\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "1"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    expected = REAL[:1] if not cli.nvidia_driver() else [CPU_MACHINE[-1], REAL[0]]
    assert r.stderr.splitlines() == expected


def test_the_cli_does_not_import_tensorflow_for_data_commands():
    r = subprocess.run([sys.executable, "-c", "import sys, cli\n"
                        "from click.testing import CliRunner\n"
                        "CliRunner().invoke(cli.main, ['split', '--help'])\n"
                        "print('tensorflow' in sys.modules, any(isinstance(f, cli.QuietTensorFlowImport) "
                        "for f in sys.meta_path))"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.stdout.split() == ["False", "True"], r.stderr
