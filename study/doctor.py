"""``cli.py doctor``: what each framework sees on this machine, and whether a GPU goes unused.

Each wing is probed in a process of its own, with the wing's interpreter
(:func:`study.wings.wing_python`): ``python -m bonemets_tf.doctor`` and ``python -m
nnunet_bridge.doctor`` print one JSON line of facts (versions, devices, the CUDA build, the
cuDNN and CUDA libraries loaded, XLA). This module adds the machine's facts that need no
framework (the GPUs ``nvidia-smi`` lists, the CUDA version the driver supports, the CPU's
bfloat16 flags) and decides, in :func:`diagnose`, a pure function of those facts: a GPU that
the driver shows but a framework cannot use is an error that says why and what to install.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.resources import BF16_FLAGS, cpu_flags
from study.wings import WINGS, wing_python

ROOT = Path(__file__).resolve().parents[1]

#: The probe module of each wing.
PROBES = {"tf": "bonemets_tf.doctor", "torch": "nnunet_bridge.doctor"}

#: What installs each wing's GPU libraries.
GPU_INSTALL = {
    "tf": "TensorFlow's CUDA 12 libraries: `make setup GPU=1` (the Keras wing's environment .venv-tf from "
          "requirements-gpu-tf.lock) or the bonemets:gpu image",
    "torch": "torch's CUDA 13 build with its libraries: `make setup` (requirements.lock) or the bonemets:gpu image",
}

#: The oldest Linux driver branch of each CUDA major (NVIDIA's CUDA Toolkit release notes, table
#: "CUDA Toolkit and minimum required driver version": 12.x >= 525, 13.x >= 580).
MIN_DRIVER = {12: 525, 13: 580}

#: Lines of a probe's stderr worth showing when a framework finds no GPU.
_WHY = re.compile(r"dlopen|cannot load|could not load|cuinit|driver|libcud|cuda", re.I)


@dataclass(frozen=True)
class Host:
    """What the machine shows without a framework.

    Attributes:
        gpus: one line per GPU from ``nvidia-smi`` (name, memory, driver); empty without one.
        driver_cuda: the newest CUDA version the NVIDIA driver supports (``nvidia-smi``'s
            "CUDA Version"), or None.
        bf16: the CPU's bfloat16 flags present (of :data:`analysis.resources.BF16_FLAGS`).
        libcuda: why the driver's library ``libcuda.so.1`` cannot be loaded (a container started
            without the NVIDIA Container Toolkit's ``--gpus``), or None.
    """

    gpus: tuple[str, ...] = ()
    driver_cuda: str | None = None
    bf16: tuple[str, ...] = ()
    libcuda: str | None = None


@dataclass(frozen=True)
class Diagnosis:
    """The doctor's report: lines to print, and whether every framework can use the GPUs shown."""

    lines: tuple[str, ...]
    ok: bool


def read_host(cpuinfo: str | Path = "/proc/cpuinfo") -> Host:
    """The GPUs ``nvidia-smi`` lists (none when it is missing or fails) and the CPU's bf16 flags."""
    flags = cpu_flags(cpuinfo)
    bf16 = tuple(f for f in BF16_FLAGS if f in flags)
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return Host(bf16=bf16)
    try:
        listed = subprocess.run([exe, "--query-gpu=index,name,memory.total,driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=60)
        header = subprocess.run([exe], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=60)
    except (OSError, subprocess.SubprocessError):
        return Host(bf16=bf16)
    gpus = tuple(line.strip() for line in listed.stdout.splitlines() if line.strip()) if listed.returncode == 0 else ()
    found = re.search(r"CUDA Version:\s*([0-9.]+)", header.stdout)
    return Host(gpus=gpus, driver_cuda=found.group(1) if found else None, bf16=bf16,
                libcuda=_libcuda_error() if gpus else None)


def _libcuda_error() -> str | None:
    """Why the NVIDIA driver's ``libcuda.so.1`` does not load in this process, or None when it does."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return str(exc)
    return None


def run_probe(wing: str, timeout: float = 600) -> dict[str, Any]:
    """Run ``wing``'s probe with its interpreter; its facts, or ``{"wing", "python", "failed"}``.

    The probe's stderr lines that explain a missing GPU (library loading, the driver) come back
    as ``"log"``.
    """
    python = wing_python(wing)
    try:
        proc = subprocess.run([python, "-m", PROBES[wing]], capture_output=True, text=True, encoding="utf-8",
                              errors="replace", timeout=timeout, cwd=ROOT)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"wing": wing, "python": python, "failed": str(exc)}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"wing": wing, "python": python, "failed": last}
    facts = json.loads(lines[-1])
    facts["log"] = sorted({re.sub(r"^[IWEF]\d{4} [\d:.]+\s+\d+ \S+\] ", "", line).strip()
                           for line in proc.stderr.splitlines() if _WHY.search(line)})
    return facts


def _version_tuple(text: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text or "")[:2])


def _why_no_gpu(facts: dict[str, Any], host: Host) -> str:
    """Why a framework that the driver shows GPUs to sees none, and what to install."""
    wing, name, version = facts["wing"], facts["framework"], facts["version"]
    build = facts.get("cuda_build")
    if not build:
        return f"{name} {version} is a CPU-only build; install {GPU_INSTALL[wing]}"
    major = _version_tuple(build)[0]
    if host.driver_cuda and _version_tuple(host.driver_cuda)[0] < major:
        return (f"{name} {version} is built for CUDA {build} but the NVIDIA driver supports CUDA {host.driver_cuda} at "
                f"most; install a driver for CUDA {major} (R{MIN_DRIVER.get(major, '?')} or newer)")
    runtime = [p for p in facts.get("cuda_libraries", []) if Path(p).name.startswith(f"libcudart.so.{major}")]
    if not runtime:
        return (f"{name} {version} is built for CUDA {build} but loaded no CUDA {major} runtime "
                f"(libcudart.so.{major}) in {facts.get('python')}; install {GPU_INSTALL[wing]}")
    if host.libcuda:
        return (f"the NVIDIA driver's library does not load ({host.libcuda}); install the NVIDIA driver, or start "
                f"the container with --gpus (NVIDIA Container Toolkit)")
    said = "; ".join(facts.get("notes", []) + facts.get("log", [])[:3])
    return f"{name} {version} loaded {runtime[0]} but finds no usable GPU" + (f": {said}" if said else "")


def _mixed_cuda(libraries: list[str]) -> list[str]:
    """The CUDA runtime and cuBLAS libraries loaded when they come from more than one CUDA major
    (``libcudart.so.12`` beside ``libcudart.so.13``): what a cuDNN or NCCL overwritten by another
    CUDA major's wheel drags into the process. Empty when they agree."""
    versioned = [Path(p).name for p in libraries if re.match(r"lib(cudart|cublas|cublasLt)\.so\.\d+", Path(p).name)]
    majors = {name.split(".so.")[1].split(".")[0] for name in versioned}
    return sorted(versioned) if len(majors) > 1 else []


def diagnose(host: Host, probes: list[dict[str, Any]], require_gpu: bool = False) -> Diagnosis:
    """The report of ``cli.py doctor`` from the machine's facts and each wing's probe.

    Args:
        host: :func:`read_host`'s facts.
        probes: each wing's :func:`run_probe` facts.
        require_gpu: a machine without a GPU is an error too (``benchmarks/gpu.sh``).

    Returns:
        The lines (``error:`` lines for what stops the GPU path) and whether there is none.
    """
    lines = [f"GPUs (nvidia-smi): {'; '.join(host.gpus) if host.gpus else 'none'}"
             + (f"; the driver supports CUDA {host.driver_cuda}" if host.driver_cuda else ""),
             f"CPU bfloat16: {', '.join(host.bf16) if host.bf16 else 'no (no avx512_bf16 / amx_bf16: mixed_bfloat16 is emulated, slower than float32)'}"]
    errors = []
    if require_gpu and not host.gpus:
        errors.append("nvidia-smi lists no GPU (is the NVIDIA driver installed, and the container started with --gpus?)")
    for facts in probes:
        wing = facts["wing"]
        if "failed" in facts:
            errors.append(f"{wing}: the probe failed with {facts['python']}: {facts['failed']}")
            continue
        extra = ", ".join(f"{k} {v}" for k, v in facts.get("versions", {}).items())
        cuda = (f"built for CUDA {facts['cuda_build']}" if facts.get("cuda_build") else "CPU-only build")
        if facts.get("cudnn_build"):
            cuda += f", cuDNN {facts['cudnn_build']}"
        if facts.get("cudnn_loaded"):
            cuda += f"; cuDNN {facts['cudnn_loaded']} loaded"
        xla = facts.get("xla")
        lines.append(f"{facts['framework']} {facts['version']} ({extra}) in {facts['python']}")
        lines.append(f"  devices: {', '.join(facts['devices'])}; {cuda}; "
                     f"XLA: {'yes' if xla is True else 'no' if xla is False else xla}")
        libraries = facts.get("cuda_libraries") or []
        shown = [p.split("site-packages/", 1)[-1] for p in libraries]  # nvidia/<wheel folder>/lib/<file>
        lines.append(f"  CUDA libraries loaded: {', '.join(shown) if shown else 'none'}")
        mixed = _mixed_cuda(libraries)
        if mixed:
            errors.append(f"{wing}: {facts['framework']} loaded libraries of several CUDA majors ({', '.join(mixed)}): "
                          f"another CUDA major's wheel overwrote files of its own (cuDNN, NCCL); "
                          f"`{facts['python']} tools/check_wheels.py` names them; reinstall its environment")
        if host.gpus and not facts.get("gpus"):
            errors.append(f"{wing}: a GPU is present but {facts['framework']} cannot use it (it would run on the "
                          f"CPU): {_why_no_gpu(facts, host)}")
    lines.extend(f"error: {e}" for e in errors)
    return Diagnosis(tuple(lines), ok=not errors)


def run_doctor(require_gpu: bool = False) -> Diagnosis:
    """Probe every wing in its own process (both at once) and diagnose (see :func:`diagnose`)."""
    with ThreadPoolExecutor(len(WINGS)) as pool:
        probes = list(pool.map(run_probe, WINGS))
    return diagnose(read_host(), probes, require_gpu=require_gpu)
