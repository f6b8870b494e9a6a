"""Choosing the torch device for training and prediction."""
from __future__ import annotations

from typing import TYPE_CHECKING

from analysis.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str) -> "torch.device":
    """The torch device for ``--device``: ``auto`` picks CUDA when available, else the CPU.

    Raises:
        InputError: an unknown name, or a device this machine does not have.
    """
    import torch

    if name not in DEVICES:
        raise InputError(f"--device {name!r}: expected one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available on this machine; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise InputError("--device mps: Apple MPS is not available on this machine; use --device cpu or auto")
    return torch.device(name)
