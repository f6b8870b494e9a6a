"""The framework-neutral core imports neither TensorFlow nor torch (STYLE: shape of the project)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sys.modules))"],
                         cwd=ROOT, capture_output=True, text=True, check=True, encoding="utf-8", errors="replace")
    return set(out.stdout.split())


def test_analysis_imports_no_framework():
    mods = _modules_after("import analysis, analysis.imaging.io, analysis.cohort.layout, analysis.cohort.validate, analysis.cohort.splits, "
                          "analysis.cohort.imports\nimport importlib, pkgutil\n"
                          "for m in pkgutil.walk_packages(analysis.__path__, 'analysis.'):\n"
                          "    importlib.import_module(m.name)")
    assert not {"tensorflow", "torch", "keras", "nnunetv2"} & mods


def test_cli_help_imports_no_framework():
    mods = _modules_after("import cli")
    assert not {"tensorflow", "torch", "keras", "nnunetv2"} & mods
