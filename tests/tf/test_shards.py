"""Sharded `predict`: the union of the shards of a cohort equals one unsharded run, for a
segmenter's masks (same files, same voxels and geometry) and a detector's slices.csv
(concatenated rows equal the unsharded rows). Uses the shared tiny RUNs of the inference tests."""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from analysis.io import read_array
from tests.tf.infer_runs import shared_runs

N = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


def _predict(model: Path, dataset: Path, out: Path, *extra: str) -> Path:
    args = ["predict", "--model", str(model), "--dataset", str(dataset), "--out", str(out), "--cases", "all", *extra]
    result = CliRunner().invoke(cli.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(folder: Path) -> list[list[str]]:
    with open(folder / "slices.csv", newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_segmenter_shards_union_equals_unsharded_run(runs, tmp_path):
    whole = _predict(runs.segmenter, runs.train_dataset, tmp_path / "whole")
    shards = [_predict(runs.segmenter, runs.train_dataset, tmp_path / f"shard{i}", "--shard", f"{i}/{N}")
              for i in range(N)]
    per_shard = [{p.name for p in s.glob("*.nii.gz")} for s in shards]
    assert all(per_shard) and not set.intersection(*per_shard)  # disjoint and none empty
    assert set.union(*per_shard) == {p.name for p in whole.glob("*.nii.gz")} and len(set.union(*per_shard)) == 5
    for shard, names in zip(shards, per_shard):
        for name in names:
            if _sha(shard / name) == _sha(whole / name):
                continue
            mask, geometry = read_array(shard / name)  # gzip headers may differ; voxels and geometry may not
            ref, ref_geometry = read_array(whole / name)
            assert geometry.mismatch(ref_geometry) is None
            np.testing.assert_array_equal(mask, ref)


def test_detector_shards_concatenate_to_the_unsharded_slices_csv(runs, tmp_path):
    whole = _rows(_predict(runs.detector, runs.train_dataset, tmp_path / "whole"))
    parts = [_rows(_predict(runs.detector, runs.train_dataset, tmp_path / f"shard{i}", "--shard", f"{i}/{N}"))
             for i in range(N)]
    assert all(p[0] == whole[0] == ["case", "slice", "probability"] for p in parts)
    merged = sorted((row for p in parts for row in p[1:]), key=lambda r: (r[0], int(r[1])))
    assert merged == whole[1:] and len(whole) - 1 == 5 * 6  # 5 cases of 6 slices, each scored once
