"""`cli.py doctor`: the decision from a GPU host's facts (the probes' JSON and nvidia-smi, faked at
that boundary only), and the real probes of this machine's frameworks, each in its own process."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from study.doctor import Host, diagnose, read_host

ROOT = Path(__file__).resolve().parents[1]
LOCK = dict(line.split("==") for line in (ROOT / "requirements.lock").read_text(encoding="utf-8").split())

CUDNN = ".".join(LOCK["nvidia-cudnn-cu13"].split(".")[:3])  # 9.24.0.43 reports itself as 9.24.0
H100 = "0, NVIDIA H100 80GB HBM3, 81559 MiB, 580.65.06"


def _tf(**changes):
    """The TF probe's facts on a GPU host where everything works (as bonemets_tf.doctor prints them)."""
    site = "/opt/venv-tf/lib/python3.11/site-packages"
    facts = {"wing": "tf", "framework": "tensorflow", "version": "2.21.0", "versions": {"keras": "3.15.1"},
             "python": "/opt/venv-tf/bin/python", "gpus": 1,
             "devices": ["CPU:0", "GPU:0 NVIDIA H100 80GB HBM3 (compute capability (9, 0))"],
             "cuda_build": "12.5.1", "cudnn_build": "9", "cudnn_loaded": None, "xla": True, "log": [],
             "cuda_libraries": [f"{site}/nvidia/cuda_runtime/lib/libcudart.so.12", f"{site}/nvidia/cudnn/lib/libcudnn.so.9"]}
    return {**facts, **changes}


def _torch(**changes):
    site = "/usr/local/lib/python3.11/site-packages"
    facts = {"wing": "torch", "framework": "torch", "version": "2.14.1+cu130", "versions": {"nnunetv2": "2.8.1"},
             "python": "/usr/local/bin/python", "gpus": 1,
             "devices": ["CPU", "cuda:0 NVIDIA H100 80GB HBM3 (compute capability 9.0)"],
             "cuda_build": "13.0", "cudnn_build": None, "cudnn_loaded": "9.24.0", "xla": "torch_xla is not installed",
             "notes": [], "log": [], "cuda_libraries": [f"{site}/nvidia/cu13/lib/libcudart.so.13",
                                                        f"{site}/nvidia/cudnn/lib/libcudnn.so.9"]}
    return {**facts, **changes}


GPU_HOST = Host(gpus=(H100,), driver_cuda="13.0", bf16=("avx512_bf16", "amx_bf16"))


def _errors(diagnosis) -> list[str]:
    return [line for line in diagnosis.lines if line.startswith("error:")]


def test_a_gpu_host_where_both_frameworks_use_the_gpu_is_ok():
    d = diagnose(GPU_HOST, [_tf(), _torch()])
    assert d.ok and not _errors(d)
    assert d.lines[0] == f"GPUs (nvidia-smi): {H100}; the driver supports CUDA 13.0"
    assert d.lines[1] == "CPU bfloat16: avx512_bf16, amx_bf16"
    assert "  devices: CPU:0, GPU:0 NVIDIA H100 80GB HBM3 (compute capability (9, 0)); built for CUDA 12.5.1, " \
           "cuDNN 9; XLA: yes" in d.lines
    assert "  CUDA libraries loaded: nvidia/cu13/lib/libcudart.so.13, nvidia/cudnn/lib/libcudnn.so.9" in d.lines
    assert "  devices: CPU, cuda:0 NVIDIA H100 80GB HBM3 (compute capability 9.0); built for CUDA 13.0; cuDNN " \
           "9.24.0 loaded; XLA: torch_xla is not installed" in d.lines


def test_tensorflow_without_its_cuda_libraries_on_a_gpu_host_is_an_error_saying_what_to_install():
    d = diagnose(GPU_HOST, [_tf(gpus=0, devices=["CPU:0"], cuda_libraries=[], python="/x/.venv/bin/python"), _torch()])
    assert not d.ok
    assert _errors(d) == [
        "error: tf: a GPU is present but tensorflow cannot use it (it would run on the CPU): tensorflow 2.21.0 is "
        "built for CUDA 12.5.1 but loaded no CUDA 12 runtime (libcudart.so.12) in /x/.venv/bin/python; install "
        "TensorFlow's CUDA 12 libraries: `make setup GPU=1` (the Keras wing's environment .venv-tf from "
        "requirements-gpu-tf.lock) or the bonemets:gpu image"]


def test_a_driver_too_old_for_torchs_cuda_is_named():
    host = Host(gpus=(H100,), driver_cuda="12.4")
    d = diagnose(host, [_tf(), _torch(gpus=0, devices=["CPU"])])
    assert _errors(d) == ["error: torch: a GPU is present but torch cannot use it (it would run on the CPU): torch "
                          "2.14.1+cu130 is built for CUDA 13.0 but the NVIDIA driver supports CUDA 12.4 at most; "
                          "install a driver for CUDA 13 (R580 or newer)"]


def test_a_cpu_only_build_and_a_failed_probe_are_errors():
    d = diagnose(GPU_HOST, [_tf(), {"wing": "torch", "python": "/p/python", "failed": "ModuleNotFoundError: torch"}])
    assert _errors(d) == ["error: torch: the probe failed with /p/python: ModuleNotFoundError: torch"]
    d = diagnose(GPU_HOST, [_tf(), _torch(gpus=0, devices=["CPU"], cuda_build=None, version="2.14.1+cpu")])
    assert "torch 2.14.1+cpu is a CPU-only build; install torch's CUDA 13 build" in _errors(d)[0]


def test_a_gpu_the_runtime_loaded_but_cannot_use_shows_the_frameworks_own_words():
    said = "CUDA initialization: The NVIDIA driver on your system is too old (found version 12040)."
    d = diagnose(Host(gpus=(H100,)), [_tf(), _torch(gpus=0, devices=["CPU"], notes=[said])])
    assert _errors(d)[0].endswith("torch 2.14.1+cu130 loaded /usr/local/lib/python3.11/site-packages/nvidia/cu13/"
                                  f"lib/libcudart.so.13 but finds no usable GPU: {said}")


def test_a_driver_library_that_does_not_load_is_named():
    host = Host(gpus=(H100,), driver_cuda="13.0", libcuda="libcuda.so.1: cannot open shared object file")
    d = diagnose(host, [_tf(), _torch(gpus=0, devices=["CPU"])])
    assert _errors(d) == ["error: torch: a GPU is present but torch cannot use it (it would run on the CPU): the "
                          "NVIDIA driver's library does not load (libcuda.so.1: cannot open shared object file); "
                          "install the NVIDIA driver, or start the container with --gpus (NVIDIA Container Toolkit)"]


def test_no_gpu_is_fine_unless_one_is_required():
    cpu = [_tf(gpus=0, devices=["CPU:0"], cuda_libraries=[]), _torch(gpus=0, devices=["CPU"])]
    assert diagnose(Host(), cpu).ok
    d = diagnose(Host(), cpu, require_gpu=True)
    assert _errors(d) == ["error: nvidia-smi lists no GPU (is the NVIDIA driver installed, and the container started "
                          "with --gpus?)"]
    assert d.lines[:2] == ("GPUs (nvidia-smi): none", "CPU bfloat16: no (no avx512_bf16 / amx_bf16: mixed_bfloat16 "
                                                      "is emulated, slower than float32)")


NVIDIA_SMI = """#!/bin/sh
case "$1" in
  --query-gpu=*) echo "0, NVIDIA H100 80GB HBM3, 81559 MiB, 580.65.06" ;;
  *) printf '%s\\n' "+------------------------------------------------------------------------+" \\
       "| NVIDIA-SMI 580.65.06    Driver Version: 580.65.06    CUDA Version: 13.0     |" ;;
esac
"""


@pytest.fixture
def gpu_path(tmp_path) -> str:
    """PATH with an nvidia-smi that lists one H100 (the device query's boundary)."""
    (tmp_path / "nvidia-smi").write_text(NVIDIA_SMI, encoding="utf-8")
    (tmp_path / "nvidia-smi").chmod(0o755)
    return f"{tmp_path}{os.pathsep}{os.environ['PATH']}"


def test_read_host_parses_nvidia_smi_and_cpuinfo(gpu_path, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", gpu_path)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n\nprocessor\t: 1\n",
                       encoding="utf-8")
    host = read_host(cpuinfo)
    assert (host.gpus, host.driver_cuda, host.bf16) == ((H100,), "13.0", ("amx_bf16",))
    assert host.libcuda is None or "libcuda.so.1" in host.libcuda  # no driver here: it cannot load


def _doctor(path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), "doctor"], cwd=ROOT, capture_output=True, text=True,
                          encoding="utf-8", timeout=600, env={**os.environ, "PATH": path})


@pytest.mark.slow
def test_doctor_probes_this_machines_frameworks(gpu_path):
    no_gpu = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                             if not (Path(p) / "nvidia-smi").exists())
    proc = _doctor(no_gpu)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "GPUs (nvidia-smi): none"
    assert f"tensorflow {LOCK['tensorflow']} (keras {LOCK['keras']}) in {sys.executable}" in lines
    assert f"torch {LOCK['torch']}+cu130 (nnunetv2 {LOCK['nnunetv2']}) in {sys.executable}" in lines
    torch_devices = lines[lines.index(f"torch {LOCK['torch']}+cu130 (nnunetv2 {LOCK['nnunetv2']}) in {sys.executable}") + 1]
    assert torch_devices == f"  devices: CPU; built for CUDA 13.0; cuDNN {CUDNN} loaded; " \
                            "XLA: torch_xla is not installed"
    # the same frameworks on a host whose driver shows a GPU: both would fall back to the CPU
    proc = _doctor(gpu_path)
    assert proc.returncode == 1
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, proc.stdout
    assert re.fullmatch(r"error: tf: .* tensorflow \S+ is built for CUDA 12\.\S+ but loaded no CUDA 12 runtime "
                        r"\(libcudart\.so\.12\) in \S+; install TensorFlow's CUDA 12 libraries: `make setup GPU=1`.*",
                        errors[0]), errors[0]
    # torch has its CUDA 13 runtime; what it lacks here is the driver
    assert re.fullmatch(r"error: torch: .* the NVIDIA driver's library does not load \(libcuda\.so\.1.*", errors[1])


def test_cuda_libraries_of_two_majors_in_one_process_are_an_error_without_a_gpu():
    """What torch loads in an environment where tensorflow[and-cuda] overwrote its cuDNN (measured:
    torch 2.14.1+cu130 beside nvidia-cudnn-cu12 9.28 reports cuDNN 9.28.0 and maps CUDA 12's runtime)."""
    site = "/venv/lib/python3.11/site-packages/nvidia"
    loaded = [f"{site}/cu13/lib/libcudart.so.13", f"{site}/cu13/lib/libcublas.so.13", f"{site}/cublas/lib/libcublas.so.12",
              f"{site}/cuda_runtime/lib/libcudart.so.12", f"{site}/cudnn/lib/libcudnn.so.9"]
    d = diagnose(Host(), [_tf(gpus=0, devices=["CPU:0"]),
                          _torch(gpus=0, devices=["CPU"], cudnn_loaded="9.28.0", cuda_libraries=loaded, python="/venv/bin/python")])
    assert _errors(d) == ["error: torch: torch loaded libraries of several CUDA majors (libcublas.so.12, libcublas.so.13, "
                          "libcudart.so.12, libcudart.so.13): another CUDA major's wheel overwrote files of its own "
                          "(cuDNN, NCCL); `/venv/bin/python tools/check_wheels.py` names them; reinstall its environment"]
