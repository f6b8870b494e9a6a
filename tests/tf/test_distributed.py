"""Scale-out training on CPUs: two workers under MultiWorkerMirroredStrategy (separate
processes talking over 127.0.0.1, as on a cluster), and MirroredStrategy over two logical
CPU devices. Each TensorFlow run is its own process: logical devices and TF_CONFIG must be
in place before TensorFlow initialises, which this pytest process already did."""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from analysis.cohort.phantom import generate_cohort
from analysis.cohort.splits import write_splits
from analysis.errors import InputError
from bonemets_tf.checkpoint import RunState
from bonemets_tf.distribute import is_chief, worker_scratch

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240
#: tiny segmenter: 1 epoch of 2 steps, global batch 2 (one slice per replica)
TINY = {"task": "segment", "arch": "unet", "width": 0.25, "image_size": 32, "epochs": 1, "steps_per_epoch": 2,
        "batch_size": 2}
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
         "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    ds = generate_cohort(tmp_path_factory.mktemp("scaleout") / "DATASET", cases=6, shape=(8, 48, 48))
    write_splits(ds, test_fraction=0.2, folds=2, seed=0)
    return ds


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes of every process; kill all of them (whole sessions) on timeout."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _train_args(ds: Path, out: Path, cache: Path, strategy: str) -> list[str]:
    args = ["cli.py", "train", "--dataset", str(ds), "--out", str(out), "--cache", str(cache), "--strategy", strategy]
    for key, value in TINY.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_two_cpu_workers_train_and_only_the_chief_writes_run(phantom, tmp_path):
    run, cache = tmp_path / "RUN", tmp_path / "cache"
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    scratch = [tmp_path / f"tmp{i}" for i in range(2)]
    procs, logs = [], []
    for i in range(2):
        scratch[i].mkdir()
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
        env = {**os.environ, **QUIET, "TF_CONFIG": json.dumps(tf_config), "TMPDIR": str(scratch[i])}
        logs.append(tmp_path / f"worker{i}.log")
        with open(logs[-1], "w", encoding="utf-8") as log:  # same command and the same --out on both, as on a cluster
            procs.append(subprocess.Popen([sys.executable, *_train_args(phantom, run, cache, "multiworker")],
                                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    codes = _wait_all(procs, TIMEOUT_S)
    assert codes == [0, 0], "\n".join(f"--- worker {i} (exit {c})\n{logs[i].read_text(encoding='utf-8')[-3000:]}"
                                      for i, c in enumerate(codes))

    assert {"model.keras", "config.json", "history.csv"} <= {p.name for p in run.iterdir()}
    runtime = json.loads((run / "config.json").read_text(encoding="utf-8"))["runtime"]
    assert runtime["strategy"] == "MultiWorkerMirroredStrategy"
    assert runtime["workers"] == 2 and runtime["replicas"] == 2
    assert [row["epoch"] for row in _history(run)] == ["1"]
    # TensorBoard names each event file after the process writing it: only the chief's are in RUN
    events = [p.name for p in run.rglob("events.out.tfevents.*")]
    assert events and all(f".{procs[0].pid}." in name for name in events), events
    assert not any(f".{procs[1].pid}." in p.name for p in run.rglob("*"))
    # the other worker trained in a scratch folder (under its TMPDIR) and removed it
    assert not any(p.name.startswith("bonemets-worker-") for p in scratch[1].iterdir())
    assert "val_dice:" in logs[1].read_text(encoding="utf-8")  # it trained and validated too


def test_mirrored_strategy_uses_every_logical_device(phantom, tmp_path):
    run = tmp_path / "RUN"
    script = textwrap.dedent("""
        import json, sys
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from bonemets_tf.train import TrainConfig, train
        settings = json.loads(sys.argv[1])
        train(TrainConfig(dataset=sys.argv[2], strategy="mirrored", **settings), sys.argv[3], cache_dir=sys.argv[4])
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(TINY), str(phantom), str(run),
                             str(tmp_path / "cache")], cwd=ROOT, env={**os.environ, **QUIET},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, encoding="utf-8", errors="replace")
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        _wait_all([proc], 1)
    assert proc.returncode == 0, output[-3000:]
    runtime = json.loads((run / "config.json").read_text(encoding="utf-8"))["runtime"]
    assert runtime["strategy"] == "MirroredStrategy" and runtime["replicas"] == 2 and runtime["workers"] == 1
    assert [row["epoch"] for row in _history(run)] == ["1"] and (run / "model.keras").is_file()


@pytest.mark.parametrize("tf_config, chief", [
    ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}, True),
    ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}, False),
    ({"cluster": {"chief": ["c:0"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}, False),
    ({"cluster": {"chief": ["c:0"], "worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}, True),
])
def test_chief_follows_tensorflows_rule(monkeypatch, tf_config, chief):
    monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    assert is_chief("multiworker") is chief
    assert is_chief("mirrored") is True  # TF_CONFIG matters only to multiworker


@pytest.mark.parametrize("raw, message", [
    (None, "TF_CONFIG is not set"),
    ("{cluster", "not valid JSON"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}', "0 <= index"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}}', "listed in the cluster"),
])
def test_bad_tf_config_is_an_input_error(monkeypatch, raw, message):
    if raw is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", raw)
    with pytest.raises(InputError, match=message):
        is_chief("multiworker")


def test_resuming_worker_copies_the_chiefs_committed_epoch(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    run = tmp_path / "RUN"
    chief = RunState(run=run, epoch=3, best=0.5, best_epoch=2, history=[{"epoch": e} for e in (1, 2, 3)])
    chief.folder.mkdir(parents=True)
    chief.weights_path(3).write_bytes(b"weights of epoch 3")
    chief.commit()
    before = sorted(p.name for p in chief.folder.iterdir())

    scratch = worker_scratch(run, resume=True)
    state = RunState.load(scratch)
    assert scratch.parent == tmp_path and scratch != run
    assert (state.epoch, state.best_epoch) == (3, 2) and state.weights_path(3).read_bytes() == b"weights of epoch 3"
    assert sorted(p.name for p in chief.folder.iterdir()) == before  # the chief's files are only read
    assert not list(worker_scratch(run, resume=False).iterdir())  # a fresh run starts empty
