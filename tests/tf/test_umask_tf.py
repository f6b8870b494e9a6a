"""Outputs of the Keras commands honour the umask: under umask 022 every file is 0644 and
every folder 0755 (train's RUN and slice cache, predict's masks and records, Grad-CAM, export)."""
from __future__ import annotations

import pytest

from tests.badinput import invoke
from tests.conftest import wrong_modes
from tests.tf.infer_runs import shared_runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


def test_every_keras_command_writes_with_the_umask(runs, tmp_path, umask_022):
    out = tmp_path / "out"
    out.mkdir()
    r = invoke(["train", "--dataset", runs.train_dataset, "--task", "segment", "--arch", "unet", "--out", out / "run",
                "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--image-size", "32", "--width", "0.25",
                "--cache", out / "cache"])
    assert r.exit_code == 0, r.output
    for args in (["predict", "--model", out / "run", "--dataset", runs.train_dataset, "--out", out / "pred" / "unet",
                  "--cases", "all"],
                 ["predict", "--model", runs.detector, "--dataset", runs.train_dataset, "--out", out / "pred" / "det",
                  "--cases", "all", "--shard", "0/2"],
                 ["gradcam", "--model", runs.detector, "--dataset", runs.train_dataset, "--out", out / "gradcam",
                  "--cases", "all", "--max-slices", "1"],
                 ["export", "--model", runs.detector, "--out", out / "savedmodel"]):
        r = invoke(args)
        assert r.exit_code == 0, r.output
    assert (out / "pred" / "unet" / "predict.json").is_file() and list((out / "gradcam").glob("*.png"))
    assert wrong_modes(out, 0o022) == []
