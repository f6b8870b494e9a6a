"""Refusing work that cannot fit in memory, before allocating it.

A command that would need more memory than the machine has available is refused with a
one-line :class:`~analysis.errors.InputError` that says how much it needs and how much
is free, instead of being killed by the operating system half-way (or swapping for hours).
Estimates are per-voxel upper bounds measured on this project's code (peak resident memory
of a run on a phantom case, see the constants below); they are meant to catch volumes that
obviously cannot fit, not to predict usage exactly.
"""
from __future__ import annotations

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
