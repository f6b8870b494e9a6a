"""Refusing work that cannot fit in memory, before allocating it.

A command that would need more memory than the machine has available is refused with a
one-line :class:`~analysis.errors.InputError` that says how much it needs and how much
is free, instead of being killed by the operating system half-way (or swapping for hours).
Estimates are per-voxel upper bounds measured on this project's code (peak resident memory
of a run on a phantom case, see the constants below); they are meant to catch volumes that
obviously cannot fit, not to predict usage exactly.

It also reads what the machine offers a framework (the CPU's flags, the shared libraries a
process loaded), for ``cli.py doctor``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from analysis.errors import InputError

#: Peak bytes per voxel of one phantom case being generated and written (int16 CT, uint8
#: label and bone map, the SimpleITK copies written to disk, slab-wise rendering buffers).
#: Measured: about 12 B/voxel + 60 MB at 128x384x384; rounded up.
PHANTOM_BYTES_PER_VOXEL = 16

#: Peak bytes per voxel of the largest analysed case (ground truth and one prediction as
#: bool, their cc3d instance maps as uint32, bone map, CT for radiomics and the HU bone rule).
#: Measured: 10.5 B/voxel without radiomics, 13.4 with; rounded up.
ANALYZE_BYTES_PER_VOXEL = 16


def available_memory() -> int:
    """Bytes of memory available to a new allocation without swapping (psutil's ``available``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def voxels(shape: Sequence[int]) -> int:
    """Number of voxels of an array shape."""
    n = 1
    for s in shape:
        n *= int(s)
    return n


def gib(n_bytes: float) -> str:
    """``n_bytes`` as a short GiB string, e.g. ``'2.3 GiB'``."""
    return f"{n_bytes / 2**30:.1f} GiB"


def require_memory(bytes_needed: int, what: str, *, hint: str = "") -> None:
    """Refuse work needing more memory than is available, before any allocation.

    Args:
        bytes_needed: estimated peak bytes of the work.
        what: the work, naming its file or case, e.g. ``"case_007 (385, 512, 512)"``.
        hint: what the user can change, e.g. ``"use a smaller --batch-size"``.

    Raises:
        InputError: ``bytes_needed`` exceeds :func:`available_memory`.
    """
    available = available_memory()
    if bytes_needed > available:
        tail = f"; {hint}" if hint else ""
        raise InputError(f"{what}: needs about {gib(bytes_needed)} of memory but only {gib(available)} "
                         f"is available{tail}")


#: CPU flags (``/proc/cpuinfo``) of bfloat16 arithmetic: AVX-512 BF16 (Cooper Lake, Zen 4) and AMX
#: tiles with BF16 (Sapphire Rapids); Intel's Architecture Instruction Set Extensions reference.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (the first ``flags`` line of ``cpuinfo``); empty where there is none."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


#: CUDA libraries whose loaded copies ``cli.py doctor`` lists: the runtime, cuBLAS, cuDNN, NCCL.
CUDA_LIBRARIES = ("libcudart.so", "libcublas.so", "libcublasLt.so", "libcudnn.so", "libnccl.so")


def loaded_libraries(stems: Sequence[str], maps: str | Path = "/proc/self/maps") -> list[str]:
    """Shared libraries this process has loaded whose file name starts with one of ``stems``.

    Args:
        stems: name prefixes, e.g. ``("libcudart", "libcudnn.so")``.
        maps: the memory map to read (Linux ``/proc/self/maps``).

    Returns:
        Their paths, sorted and without repeats; empty where ``maps`` cannot be read.
    """
    try:
        text = Path(maps).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    found = set()
    for line in text.splitlines():
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        path = fields[5] if len(fields) == 6 else ""
        if path.startswith("/") and Path(path).name.startswith(tuple(stems)):
            found.add(path)
    return sorted(found)
