"""tools/check_wheels.py on real installs: two tiny wheels written here (the wheel format: a zip
with METADATA, WHEEL and a RECORD of sha256 digests, PEP 427) and installed by pip into one
prefix, the way nvidia-cudnn-cu12 and nvidia-cudnn-cu13 both install libcudnn.so.9."""
from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "check_wheels.py"


def _write_wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A pure-Python wheel holding ``files``, its RECORD hashed with hashlib here (not by the tool)."""
    dist_info = f"{name.replace('-', '_')}-{version}.dist-info"
    files = {**files,
             f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    wheel = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        zf.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return wheel


def _pip_install(wheel: Path, prefix: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "--prefix", str(prefix), str(wheel)], check=True,
                   capture_output=True)


def _site(prefix: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))


def _check(site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), str(site)], capture_output=True, text=True, encoding="utf-8")


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("wheels")
    common = {"vendor/__init__.py": b""}  # the same bytes in both: sharing it harms nobody
    return {
        "cu12": _write_wheel(folder, "fake-dnn-cu12", "9.1", {**common, "vendor/lib/libdnn.so.9": b"built for CUDA 12",
                                                              "vendor/lib/only12.so": b"12"}),
        "cu13": _write_wheel(folder, "fake-dnn-cu13", "9.2", {**common, "vendor/lib/libdnn.so.9": b"built for CUDA 13",
                                                              "vendor/lib/only13.so": b"13"}),
    }


def test_one_wheel_per_path_passes(wheels, tmp_path):
    _pip_install(wheels["cu13"], tmp_path)
    result = _check(_site(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    # 8: its 3 files, METADATA and WHEEL, and the INSTALLER, REQUESTED and direct_url.json pip adds
    assert "8 files of 1 distributions match their RECORD" in result.stdout


def test_a_clobbered_file_is_named_with_both_wheels(wheels, tmp_path):
    _pip_install(wheels["cu13"], tmp_path)
    _pip_install(wheels["cu12"], tmp_path)  # pip overwrites cu13's libdnn.so.9 without a word
    site = _site(tmp_path)
    assert (site / "vendor/lib/libdnn.so.9").read_bytes() == b"built for CUDA 12"
    result = _check(site)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].endswith("1 of 16 files do not match their RECORD (an install overwrote or removed another "
                             "wheel's files):")
    assert lines[1:] == ["  fake-dnn-cu13 9.2: 1 file(s); the same paths are also installed by fake-dnn-cu12 9.1",
                         "    vendor/lib/libdnn.so.9: holds fake-dnn-cu12 9.1's copy"]


def test_a_missing_file_is_reported(wheels, tmp_path):
    _pip_install(wheels["cu12"], tmp_path)
    site = _site(tmp_path)
    (site / "vendor/lib/only12.so").unlink()
    result = _check(site)
    assert result.returncode == 1
    assert "  fake-dnn-cu12 9.1: 1 file(s)" in result.stdout
    assert "    vendor/lib/only12.so: missing" in result.stdout


def test_not_a_site_packages_folder_is_one_line_and_exit_2(tmp_path):
    result = _check(tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"check_wheels: {tmp_path}: not a site-packages folder (expected *.dist-info folders)"


def test_make_setup_checks_every_environment_it_installs():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for venv in ("$(PY)", "$(TF_VENV)/bin/python"):
        install = makefile.index(f"{venv} -m pip install --quiet --no-deps -e .")
        assert makefile[install:].split("\n")[1].strip() == f"{venv} tools/check_wheels.py"
