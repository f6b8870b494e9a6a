"""Each wing's interpreter (study.wings): the file `make setup GPU=1` writes, read in one place, and
the command line handing a wing's command to it. The environments here are real venvs made in
tmp_path that see this environment's packages (a .pth file), each with its own sys.prefix."""
from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from cli import command_wing
from study.stages import KINDS, stage_wing
from study.wings import CONFIG_NAME, read_config, wing_python

ROOT = Path(__file__).resolve().parents[1]


def _environment(path: Path) -> Path:
    """A venv at ``path`` that imports this environment's packages; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    purelib = path / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (purelib / "ours.pth").write_text("\n".join([str(ROOT), *site.getsitepackages()]) + "\n", encoding="utf-8")
    return path / "bin" / "python"


def _run(python: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BONEMETS_WING"}
    return subprocess.run([str(python), *args], cwd=ROOT, capture_output=True, text=True, encoding="utf-8",
                          timeout=120, env=env, **kw)


def test_without_the_file_every_wing_runs_here():
    assert not (Path(sys.prefix) / CONFIG_NAME).exists()  # the CPU path: one environment
    assert read_config() == {}
    assert wing_python("tf") == wing_python("torch") == sys.executable


def test_write_config_names_both_interpreters_in_both_environments(tmp_path):
    tf, torch = _environment(tmp_path / "venv-tf"), _environment(tmp_path / "venv")
    proc = _run(torch, "-m", "study.wings", "--tf", str(tf), "--torch", str(torch))
    assert proc.returncode == 0, proc.stderr
    expected = {"tf": str(tf), "torch": str(torch)}
    for env in ("venv-tf", "venv"):
        assert json.loads((tmp_path / env / CONFIG_NAME).read_text(encoding="utf-8")) == expected
    for python in (tf, torch):
        code = "from study.wings import wing_python as w; print(w('tf')); print(w('torch'))"
        assert _run(python, "-c", code).stdout.split() == [str(tf), str(torch)]


def test_the_command_line_hands_a_wings_command_to_its_interpreter(tmp_path):
    torch = _environment(tmp_path / "venv")
    record = tmp_path / "handed.txt"
    fake_tf = tmp_path / "tf-python"  # stands at the boundary: shows how it was started
    fake_tf.write_text(f'#!/bin/sh\necho "$@ BONEMETS_WING=$BONEMETS_WING" > {record}\n', encoding="utf-8")
    fake_tf.chmod(0o755)
    (tmp_path / "venv" / CONFIG_NAME).write_text(json.dumps({"tf": str(fake_tf), "torch": str(torch)}),
                                                 encoding="utf-8")
    proc = _run(torch, "cli.py", "-v", "train", "--help")
    assert proc.returncode == 0, proc.stderr
    assert record.read_text(encoding="utf-8").split() == [str(ROOT / "cli.py"), "-v", "train", "--help",
                                                          "BONEMETS_WING=tf"]
    record.unlink()
    for args in (("nnunet", "train", "--help"), ("followup", "--nnunet-work", "W", "--help"), ("validate", "--help")):
        proc = _run(torch, "cli.py", *args)  # the torch wing and data commands run here
        assert proc.returncode == 0 and proc.stdout.startswith("Usage:"), proc.stderr
    assert not record.exists()


def test_a_missing_interpreter_is_one_line_and_exit_2(tmp_path):
    torch = _environment(tmp_path / "venv")
    config = tmp_path / "venv" / CONFIG_NAME
    config.write_text(json.dumps({"tf": str(tmp_path / "gone" / "python"), "torch": str(torch)}), encoding="utf-8")
    proc = _run(torch, "cli.py", "predict", "--help")
    assert proc.returncode == 2
    assert proc.stderr == (f"error: {config}: the tf interpreter {tmp_path / 'gone' / 'python'} does not exist; "
                           "rerun `make setup GPU=1`\n")
    config.write_text("{not json", encoding="utf-8")
    proc = _run(torch, "cli.py", "export", "--help")
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {config}: not readable JSON")


@pytest.mark.parametrize("args, wing", [
    (["train", "--dataset", "D"], "tf"), (["--debug", "predict"], "tf"), (["models"], "tf"), (["gradcam"], "tf"),
    (["export"], "tf"), (["nnunet", "predict"], "torch"), (["serve", "--model", "R"], "tf"),
    (["serve", "--nnunet-work=W"], "torch"), (["followup", "--baseline", "a", "--nnunet-work", "W"], "torch"),
    (["followup", "--baseline-mask", "m"], None), (["timeline", "a", "b", "--model", "R"], "tf"),
    (["timeline", "a", "b", "--nnunet-work=W"], "torch"), (["timeline", "a", "b", "--masks", "m"], None),
    (["validate", "D"], None), (["demo"], None), (["doctor"], None),
    ([], None)])
def test_command_wing(args, wing):
    assert command_wing(args) == wing


def test_every_stage_kind_names_its_wing():
    assert {kind: stage_wing(kind) for kind in KINDS} == {
        "phantom": None, "split": None, "examples": None, "analyze": None, "train": "tf", "predict": "tf",
        "gradcam": "tf", "export": "tf", "nnunet-train": "torch", "nnunet-predict": "torch"}


def test_the_demo_starts_each_framework_group_with_its_wings_interpreter(tmp_path):
    torch = _environment(tmp_path / "venv")
    record = tmp_path / "handed.txt"
    fake_tf = tmp_path / "tf-python"
    fake_tf.write_text(f'#!/bin/sh\necho "$@" >> {record}\n', encoding="utf-8")
    fake_tf.chmod(0o755)
    (tmp_path / "venv" / CONFIG_NAME).write_text(json.dumps({"tf": str(fake_tf), "torch": str(torch)}),
                                                 encoding="utf-8")
    code = f"""
from pathlib import Path
from study.demo import QUICK, Demo, StageFailed
demo = Demo(Path({str(tmp_path / 'demo')!r}), QUICK)
demo.run_group(demo.data_stages()[:2], 1, 3)        # phantom and split: no framework, run here
try:
    demo.run_group([demo.train_stage("unet")], 3, 3)  # Keras: handed to the tf interpreter
except StageFailed as exc:
    print("failed", exc.stage)
"""
    proc = _run(torch, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["failed", "train-unet"]  # the stand-in ran nothing
    assert (tmp_path / "demo" / "dataset" / "splits.json").is_file()
    handed = record.read_text(encoding="utf-8").split()
    assert handed[:2] == ["-m", "study.batch"] and handed[2].endswith("group-train-unet.plan.json")


def test_the_wing_table_covers_every_command_that_imports_a_wing():
    """cli.py's WING_OF cannot drift from the commands: a command whose code imports a wing is
    handed to that wing (serve, followup and timeline import both and go by their model option)."""
    import inspect

    import click

    import cli

    def sources(command: click.Command) -> str:
        if isinstance(command, click.Group):
            return "".join(sources(c) for c in command.commands.values())
        text = inspect.getsource(command.callback)
        helpers = [h for h in ("_series_predictor", "_scan_predictor") if h in text]  # code it calls in cli.py
        return text + "".join(inspect.getsource(getattr(cli, h)) for h in helpers)

    for name, command in cli.main.commands.items():
        text = sources(command)
        wings = {wing for wing, package in (("tf", "bonemets_tf"), ("torch", "nnunet_bridge")) if package in text}
        if len(wings) == 2:
            assert name in ("serve", "followup", "timeline"), name
            assert command_wing([name, "--model", "M"]) == "tf" and command_wing([name, "--nnunet-work", "W"]) == "torch"
        else:
            assert command_wing([name]) == (wings.pop() if wings else None), name
