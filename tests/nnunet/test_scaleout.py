"""nnU-Net scale-out without a GPU: --num-gpus reaches nnU-Net's run_training (its DDP) and is
refused with one line when the GPUs are not there; `nnunet prepare` builds the work folder
once so folds can train in parallel; sharded `nnunet predict` runs add up to an unsharded one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from analysis.cohort.splits import write_splits
from cli import main
from nnunet_bridge import train as bridge_train
from nnunet_bridge.env import WorkLayout
from tests.conftest import write_tiny_cohort, wrong_modes


@pytest.fixture
def split_cohort(tmp_path: Path) -> Path:
    ds = write_tiny_cohort(tmp_path / "ds", n_cases=4)
    write_splits(ds, test_fraction=0.25, folds=2, seed=0)
    return ds


def _train(*args: str):
    return CliRunner().invoke(main, ["nnunet", "train", *args])


def test_num_gpus_needs_cuda_devices(split_cohort, tmp_path, monkeypatch):
    common = ["--dataset", str(split_cohort), "--work", str(tmp_path / "w"), "--folds", "0", "--num-gpus", "2"]
    r = _train(*common, "--device", "cpu")
    assert r.exit_code == 2 and "--num-gpus 2: multi-GPU training needs --device cuda, got cpu" in r.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    r = _train(*common, "--device", "cuda")
    assert r.exit_code == 2 and "--num-gpus 2: only 1 CUDA device(s) are visible" in r.output
    assert not (tmp_path / "w").exists()  # refused before any work


def test_num_gpus_passes_through_to_nnunet_ddp(split_cohort, tmp_path, monkeypatch):
    """With 2 GPUs present, each fold is one nnU-Net run_training(num_gpus=2, device=cuda)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(bridge_train, "prepare", lambda *a, **k: {})  # no data work in this test
    monkeypatch.setattr(bridge_train, "count_parameters", lambda layout, fold: 123)
    calls = []
    import nnunetv2.run.run_training as nnunet_run

    monkeypatch.setattr(nnunet_run, "run_training", lambda *a, **k: calls.append((a, k)))
    r = _train("--dataset", str(split_cohort), "--work", str(tmp_path / "w"), "--folds", "0,1", "--num-gpus", "2",
               "--device", "cuda", "--epochs", "1")
    assert r.exit_code == 0, r.output
    assert [a[2] for a, _ in calls] == [0, 1]
    assert all(k["num_gpus"] == 2 and k["device"].type == "cuda" for _, k in calls)
    settings = json.loads((tmp_path / "w" / "train_settings.json").read_text(encoding="utf-8"))
    assert settings["num_gpus"] == 2 and settings["device"] == "cuda"


@pytest.mark.slow
def test_prepare_once_then_sharded_predictions_equal_an_unsharded_run(tmp_path, one_thread, umask_022):
    ds = write_tiny_cohort(tmp_path / "ds", n_cases=5, shape=(3, 32, 32))
    write_splits(ds, test_fraction=0.2, folds=2, seed=0)
    work = tmp_path / "work"
    runner = CliRunner()
    r = runner.invoke(main, ["nnunet", "prepare", "--dataset", str(ds), "--work", str(work)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    layout = WorkLayout(work)
    assert layout.prepared_json.is_file() and (layout.preprocessed_dataset / "splits_final.json").is_file()
    assert layout.trained_folds() == []
    stamp = layout.prepared_json.stat().st_mtime_ns
    r = runner.invoke(main, ["nnunet", "train", "--dataset", str(ds), "--work", str(work), "--folds", "0",
                             "--epochs", "1", "--iterations", "2", "--val-iterations", "1", "--device", "cpu"],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert layout.prepared_json.stat().st_mtime_ns == stamp  # training reused the prepared data

    def predict(out: Path, *extra: str) -> list[Path]:
        r = runner.invoke(main, ["nnunet", "predict", "--dataset", str(ds), "--work", str(work), "--out", str(out),
                                 "--cases", "all", "--device", "cpu", "--no-mirroring", *extra], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return sorted(out.glob("*.nii.gz"))

    whole = predict(tmp_path / "whole")
    shards = [predict(tmp_path / "shards", "--shard", f"{i}/3") for i in range(3)]  # one folder, shard by shard
    assert len(whole) == 5 and [p.name for p in shards[-1]] == [p.name for p in whole]
    record = json.loads((tmp_path / "shards" / "predict.json").read_text(encoding="utf-8"))
    assert record["cases"] == [p.name[:-len(".nii.gz")] for p in whole]  # one record lists every case
    assert sorted(r["cases_run"] for r in record["runs"]) == [["case_000", "case_003"], ["case_001", "case_004"],
                                                              ["case_002"]]
    for ref in whole:  # byte for byte
        assert (tmp_path / "shards" / ref.name).read_bytes() == ref.read_bytes(), ref.name
    assert wrong_modes(tmp_path / "shards", 0o022) == [] and wrong_modes(work, 0o022) == []  # the umask is honoured
