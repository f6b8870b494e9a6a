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


def test_gpu_image_adds_tensorflow_cuda_libraries_of_the_locked_version():
    text = (ROOT / "docker" / "Dockerfile.gpu").read_text(encoding="utf-8")
    assert "tensorflow[and-cuda]==" in text
    assert re.search(r"^tensorflow==", (ROOT / "requirements.lock").read_text(encoding="utf-8"), re.M | re.I)
