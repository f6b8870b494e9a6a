"""No docker engine runs here: check what can be checked without one. Each Dockerfile
installs the exact lock, copies everything the CLI imports, and runs `python cli.py`."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))


def test_both_images_exist():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.gpu"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_lock_and_copies_the_cli(dockerfile):
    text = dockerfile.read_text(encoding="utf-8")
    assert re.search(r"^COPY requirements\.lock ", text, re.M)
    assert re.search(r"pip install -r requirements\.lock", text)
    copied = set()
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (ROOT / src).exists(), f"{dockerfile.name} copies missing {src}"
            copied.add(src)
    # every top-level package and module the CLI needs is copied
    for needed in ("cli.py", "setup.cfg", "analysis", "bonemets_tf", "nnunet_bridge"):
        assert needed in copied, f"{dockerfile.name} does not copy {needed}"
    assert _installed_packages() <= copied, f"{dockerfile.name} misses packages {_installed_packages() - copied}"
    assert 'ENTRYPOINT ["python", "/opt/bonemets/cli.py"]' in text
    assert re.search(r"^FROM python:3\.11", text, re.M)


def _installed_packages() -> set[str]:
    """Top-level packages that `pip install .` installs (setup.cfg's packages.find include);
    developer-only packages such as benchmarks/ need not be in the images."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    include = cfg["options.packages.find"]["include"].split()
    return {name for name in include if "." not in name and (ROOT / name / "__init__.py").is_file()}


def test_dockerignore_keeps_the_venv_and_outputs_out():
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    for entry in (".venv", ".git", "demo_out"):
        assert entry in ignored


def _lock(name: str) -> dict[str, str]:
    lines = (ROOT / name).read_text(encoding="utf-8").split()
    return {line.split("==")[0].lower(): line.split("==")[1] for line in lines}


def test_the_gpu_image_keeps_one_cuda_major_per_environment():
    text = (ROOT / "docker" / "Dockerfile.gpu").read_text(encoding="utf-8")
    assert "/opt/venv-tf/bin/pip install -r requirements-gpu-tf.lock" in text
    assert "tensorflow[and-cuda]" not in text  # its CUDA 12 wheels come pinned from the lock
    assert "python -m study.wings --tf /opt/venv-tf/bin/python --torch /usr/local/bin/python" in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_install_is_followed_by_the_record_check(dockerfile):
    runs = re.findall(r"^RUN (?:.*\\\n)*.*$", dockerfile.read_text(encoding="utf-8"), re.M)
    installs = [run for run in runs if "pip install" in run]
    assert installs
    for run in installs:
        for python in re.findall(r"(\S*?)(?:python -m pip|pip) install", run):
            interpreter = python.replace("bin/", "bin/python") if python else "python"
            assert f" {interpreter} tools/check_wheels.py" in run, (dockerfile.name, run)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_index_and_ca_come_as_build_secrets_and_stay_out_of_the_image(dockerfile):
    text = dockerfile.read_text(encoding="utf-8")
    for run in re.findall(r"^RUN (?:.*\\\n)*.*$", text, re.M):
        if "pip install -r" in run:
            assert "--mount=type=secret,id=pipconf,target=/etc/pip.conf --mount=type=secret,id=cabundle" in run
    assert "ARG" not in text and "COPY pip.conf" not in text


def test_the_tensorflow_lock_pins_cuda_12_only_and_agrees_with_the_main_lock():
    tf, main = _lock("requirements-gpu-tf.lock"), _lock("requirements.lock")
    assert tf["tensorflow"] == main["tensorflow"]
    cuda = {name: version for name, version in tf.items() if name.startswith("nvidia-")}
    assert {"nvidia-cudnn-cu12", "nvidia-nccl-cu12", "nvidia-cublas-cu12", "nvidia-cuda-runtime-cu12"} <= set(cuda)
    assert all(name.endswith("-cu12") for name in cuda), cuda
    assert not {"torch", "torchvision", "triton", "nnunetv2", "cuda-toolkit"} & set(tf)
    assert not [name for name in main if name.startswith("nvidia-") and name.endswith("-cu12")]
    differ = {name: (tf[name], main[name]) for name in set(tf) & set(main) if tf[name] != main[name]}
    assert differ == {}, differ
