"""Commands that write into a dataset, on a read-only one (as `docker run -v cohort:/data/cohort:ro`
mounts it): one `error:` line naming the folder, exit code 2, nothing changed.

The tests run as root, whom permission bits do not stop, so the dataset is made read-only the
way a container sees it: a read-only bind mount, in a mount namespace of the test's own
(``unshare``), which disappears with the command."""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis.imaging.io import write_array
from tests.conftest import make_geometry, tree_hash, write_tiny_cohort
from tests.test_dicom import hu_volume, write_ct

ROOT = Path(__file__).resolve().parents[1]


def _can_mount_read_only(tmp: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    folder = tmp / "probe"
    folder.mkdir()
    script = f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && ! touch {folder}/x 2>/dev/null"
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True).returncode == 0


def _run_on_read_only(dataset: Path, commands: list[list[str]]) -> list[tuple[int, str]]:
    """Run each ``cli.py`` command with ``dataset`` mounted read-only; (exit code, stderr) of each."""
    folder = shlex.quote(str(dataset))
    lines = [f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} || exit 9"]
    for i, args in enumerate(commands):
        cmd = shlex.join([sys.executable, str(ROOT / "cli.py"), *args])
        lines.append(f"{cmd} 2> {dataset.parent}/err{i}.txt; echo $? > {dataset.parent}/rc{i}.txt")
    subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(lines)], check=True,
                   cwd=ROOT, timeout=600)
    return [(int((dataset.parent / f"rc{i}.txt").read_text(encoding="utf-8")),
             (dataset.parent / f"err{i}.txt").read_text(encoding="utf-8")) for i in range(len(commands))]


def test_commands_writing_into_a_read_only_dataset_fail_with_one_line(tmp_path):
    if not _can_mount_read_only(tmp_path):
        pytest.skip("no read-only bind mount here (unshare --mount needs CAP_SYS_ADMIN)")
    dataset = write_tiny_cohort(tmp_path / "cohort", n_cases=3)
    series = tmp_path / "export" / "P9"
    write_ct(series, hu_volume())
    seg = tmp_path / "total.nii.gz"
    write_array(np.zeros((6, 16, 20), np.uint8), make_geometry(), seg)
    before = tree_hash(dataset)
    commands = {
        "split": ["split", str(dataset), "--folds", "2"],
        "import-dicom": ["import-dicom", str(series), "--dataset", str(dataset), "--case", "P9"],
        "import-dicom --all": ["import-dicom", str(series.parent), "--dataset", str(dataset), "--all"],
        "import-bones": ["import-bones", str(seg), "--dataset", str(dataset), "--case", "case_000"],
        "phantom": ["phantom", "--out", str(dataset / "more"), "--cases", "1", "--shape", "8,16,16"],
    }
    results = dict(zip(commands, _run_on_read_only(dataset, list(commands.values()))))
    for name, (code, stderr) in results.items():
        assert code == 2, (name, stderr)
        assert "Traceback" not in stderr, (name, stderr)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert errors == [f"error: {dataset}: cannot write into this folder (Read-only file system); the command "
                          "writes its output here, so give a writable folder (a read-only mount, or another user's "
                          "folder?)"], (name, stderr)
    assert tree_hash(dataset) == before
