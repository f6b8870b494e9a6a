"""What TensorFlow sees in this environment, as one JSON line: ``python -m bonemets_tf.doctor``.

``cli.py doctor`` (:mod:`study.doctor`) runs this probe with the Keras wing's interpreter and
decides what the facts mean; the probe only reports them. TensorFlow reports the CUDA and
cuDNN versions it was built for (``tf.sysconfig.get_build_info()``), not the ones it loaded,
so the CUDA libraries this process actually mapped are listed by path.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

from analysis.resources import CUDA_LIBRARIES, loaded_libraries


def _xla() -> str | bool:
    """True when a ``jit_compile=True`` function compiles and runs; else the first line of the error."""
    import tensorflow as tf

    try:
        value = tf.function(lambda x: x * 2.0 + 1.0, jit_compile=True)(tf.constant([1.0, 2.0]))
        return bool(value.numpy().tolist() == [3.0, 5.0])
    except Exception as exc:  # noqa: BLE001 - any failure means "not available", reported as text
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def probe() -> dict[str, Any]:
    """TensorFlow's versions, devices, CUDA build, loaded CUDA libraries and XLA, as plain data."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # keep the "cannot load a GPU library" warnings
    import keras
    import tensorflow as tf

    build = dict(tf.sysconfig.get_build_info())
    devices = []
    for device in tf.config.list_physical_devices():
        name = device.name.replace("/physical_device:", "")
        if device.device_type == "GPU":
            details = tf.config.experimental.get_device_details(device)
            name += f" {details.get('device_name', '')} (compute capability {details.get('compute_capability')})"
        devices.append(name.strip())
    return {
        "wing": "tf",
        "framework": "tensorflow",
        "version": tf.__version__,
        "versions": {"keras": keras.__version__},
        "python": sys.executable,
        "devices": devices,
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "cuda_build": build.get("cuda_version") if build.get("is_cuda_build") else None,
        "cudnn_build": build.get("cudnn_version") if build.get("is_cuda_build") else None,
        "cudnn_loaded": None,  # TensorFlow does not report it; see cuda_libraries
        "cuda_libraries": loaded_libraries(CUDA_LIBRARIES),
        "xla": _xla(),
    }


def main() -> int:
    print(json.dumps(probe()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
