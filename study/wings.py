"""Which Python interpreter runs each wing: the one place that says it.

On a CPU machine (``make setup``) one environment, ``.venv``, holds everything and every
command runs in it. On a GPU host the two frameworks need different CUDA majors:
TensorFlow 2.21's ``and-cuda`` extra asks for CUDA 12 wheels (``nvidia-*-cu12``), torch
2.14's PyPI build is linked against CUDA 13, and cuDNN and NCCL of both majors install files
of the same names (``nvidia/cudnn/lib/libcudnn*.so.9``, ``nvidia/nccl/lib/libnccl.so.2``), so
one environment cannot hold both (see ``tools/check_wheels.py`` and docs/gpu.md). ``make setup
GPU=1`` therefore makes a second environment for the Keras wing (``.venv-tf``, from
``requirements-gpu-tf.lock``: TensorFlow with its pinned CUDA 12 wheels, no torch) beside
``.venv`` (``requirements.lock``: the data and analysis commands and the nnU-Net wing, with
torch's pinned CUDA 13 wheels), and writes :data:`CONFIG_NAME` into both::

    {"tf": "/path/.venv-tf/bin/python", "torch": "/path/.venv/bin/python"}

``cli.py`` hands a wing's command to that wing's interpreter, the demo
(:mod:`study.demo`) starts each stage group with it, and ``cli.py doctor`` probes each wing
with it. Without the file every wing runs with the current interpreter. Write the file for
environments made by hand with ``python -m study.wings --tf PYTHON --torch PYTHON``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from analysis.errors import InputError

#: The wings, by framework: the Keras wing (bonemets_tf) and the nnU-Net wing (nnunet_bridge).
WINGS = ("tf", "torch")

#: The file naming each wing's interpreter, in the environment's ``sys.prefix``.
CONFIG_NAME = "bonemets-wings.json"


def config_path(prefix: str | Path | None = None) -> Path:
    """Where the environment at ``prefix`` (default: this interpreter's) keeps :data:`CONFIG_NAME`."""
    return Path(prefix if prefix is not None else sys.prefix) / CONFIG_NAME


def read_config(prefix: str | Path | None = None) -> dict[str, str]:
    """The wings' interpreters named by the environment at ``prefix``; empty when it names none.

    Raises:
        InputError: the file is not a JSON object of wing names to interpreter paths.
    """
    path = config_path(prefix)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc}); rewrite it with `python -m study.wings`") from exc
    if not isinstance(data, dict) or not set(data) <= set(WINGS) or not all(isinstance(v, str) for v in data.values()):
        raise InputError(f"{path}: expected {{\"tf\": PYTHON, \"torch\": PYTHON}}, found {data!r}")
    return data


def wing_python(wing: str) -> str:
    """The interpreter that runs ``wing`` (``"tf"`` or ``"torch"``): the configured one, else this one.

    Raises:
        InputError: the configured interpreter does not exist.
    """
    if wing not in WINGS:
        raise ValueError(f"unknown wing {wing!r}; expected one of {WINGS}")
    python = read_config().get(wing)
    if python is None:
        return sys.executable
    if not os.access(python, os.X_OK):
        raise InputError(f"{config_path()}: the {wing} interpreter {python} does not exist; rerun `make setup GPU=1`")
    return python


def runs_here(python: str) -> bool:
    """Whether ``python`` is the interpreter of this process (no new process needed)."""
    return os.path.abspath(python) == os.path.abspath(sys.executable)


def write_config(tf: str, torch: str) -> list[Path]:
    """Write :data:`CONFIG_NAME` naming both interpreters into each one's environment.

    Args:
        tf: interpreter of the Keras wing; torch: interpreter of the nnU-Net wing.

    Returns:
        The files written (one per distinct environment).

    Raises:
        InputError: an interpreter cannot be run.
    """
    pythons = {"tf": tf, "torch": torch}
    facts = {}
    for wing, python in pythons.items():
        try:
            out = subprocess.run([python, "-c", "import sys; print(sys.executable); print(sys.prefix)"],
                                 capture_output=True, text=True, encoding="utf-8", check=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            raise InputError(f"--{wing} {python}: cannot run it ({exc})") from exc
        facts[wing] = out.splitlines()
    config = {wing: facts[wing][0] for wing in WINGS}
    written = []
    for prefix in dict.fromkeys(facts[wing][1] for wing in WINGS):
        path = config_path(prefix)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.wings",
                                     description="Name each wing's interpreter in both environments.")
    parser.add_argument("--tf", required=True, help="Python of the Keras wing's environment")
    parser.add_argument("--torch", required=True, help="Python of the nnU-Net wing's environment")
    args = parser.parse_args(argv)
    try:
        written = write_config(args.tf, args.torch)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
