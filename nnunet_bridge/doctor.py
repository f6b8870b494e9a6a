"""What PyTorch sees in this environment, as one JSON line: ``python -m nnunet_bridge.doctor``.

``cli.py doctor`` (:mod:`study.doctor`) runs this probe with the nnU-Net wing's interpreter
and decides what the facts mean; the probe only reports them: torch's CUDA build
(``torch.version.cuda``), the cuDNN it loaded (``torch.backends.cudnn.version()``), the CUDA
libraries this process mapped, and the devices it can use.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from typing import Any

from analysis.resources import CUDA_LIBRARIES, loaded_libraries


def _cudnn(version: int | None) -> str | None:
    """cuDNN's version number as text: 92400 -> '9.24.0' (major*10000 + minor*100 + patch since cuDNN 9)."""
    if not version:
        return None
    if version >= 90000:
        return f"{version // 10000}.{version % 10000 // 100}.{version % 100}"
    return f"{version // 1000}.{version % 1000 // 100}.{version % 100}"  # cuDNN 8: major*1000 + minor*100


def probe() -> dict[str, Any]:
    """torch's versions, devices, CUDA build, loaded cuDNN and CUDA libraries, as plain data."""
    with warnings.catch_warnings(record=True) as caught:  # e.g. "the NVIDIA driver ... is too old"
        warnings.simplefilter("always")
        import nnunetv2
        import torch

        available = torch.cuda.is_available()
        devices = ["CPU"] + [f"cuda:{i} {torch.cuda.get_device_name(i)} (compute capability "
                             f"{'.'.join(map(str, torch.cuda.get_device_capability(i)))})"
                             for i in range(torch.cuda.device_count() if available else 0)]
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "wing": "torch",
        "framework": "torch",
        "version": torch.__version__,
        "versions": {"nnunetv2": getattr(nnunetv2, "__version__", None) or _distribution_version("nnunetv2")},
        "python": sys.executable,
        "devices": devices,
        "gpus": len(devices) - 1,
        "cuda_build": torch.version.cuda,
        "cudnn_build": None,
        "cudnn_loaded": _cudnn(cudnn),
        "cuda_libraries": loaded_libraries(CUDA_LIBRARIES),
        "xla": importlib.util.find_spec("torch_xla") is not None or "torch_xla is not installed",
        "notes": sorted({str(w.message).strip().splitlines()[0] for w in caught if "cuda" in str(w.message).lower()}),
    }


def _distribution_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main() -> int:
    print(json.dumps(probe()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
