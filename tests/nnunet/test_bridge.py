"""nnunet_bridge: environment scoping, 2D conversion, patient-grouped splits, CLI errors, and
(slow) a real 1-epoch nnU-Net training of one fold with prediction back to the CT's geometry."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from analysis.cohort.layout import Cohort
from analysis.cohort.splits import write_splits
from analysis.errors import InputError
from analysis.imaging.io import read_array, read_image, write_array
from analysis.imaging.orientation import Reorientation
from analysis.prediction.folder import remove_components_in_air, select_cases
from analysis.prediction.probabilities import read_probability
from cli import main
from nnunet_bridge.convert import convert_patients, nnunet_splits, slice_case_id
from nnunet_bridge.env import DATASET_NAME, SCHEDULE_ENV, TRAINERS_DIR, WorkLayout, nnunet_environment
from nnunet_bridge.predict import lesion_probability
from nnunet_bridge.train import TrainOptions, _schedule
from tests.conftest import make_geometry, write_tiny_cohort

ROOT = Path(__file__).resolve().parents[2]
#: rotated 90 degrees about z, anisotropic spacing: a wrong axis order or flip cannot go unnoticed
ROTATED = dict(spacing=(0.7, 1.1, 3.0), origin=(12.0, -30.0, 7.5),
               direction=(0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
NNUNET_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_def_n_proc",
               "nnUNet_n_proc_DA", SCHEDULE_ENV)


def test_importing_the_bridge_imports_neither_tensorflow_nor_torch():
    code = ("import sys, nnunet_bridge, nnunet_bridge.env, nnunet_bridge.convert, nnunet_bridge.train, "
            "nnunet_bridge.predict, nnunet_bridge.device; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'torch', 'nnunetv2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, encoding="utf-8", errors="replace")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_trainer_module_imports_torch_but_never_tensorflow():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import bonemets_nnunet_trainer as t; "
            "print(t.nnUNetTrainerBonemets.__name__, t.SCHEDULE_ENV, 'tensorflow' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(TRAINERS_DIR)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, encoding="utf-8", errors="replace")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-4:] == ["nnUNetTrainerBonemets", SCHEDULE_ENV, "False", "True"]


def test_environment_is_scoped_and_restored(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", "/somewhere/else")
    for name in NNUNET_VARS[1:]:
        monkeypatch.delenv(name, raising=False)
    with nnunet_environment(tmp_path / "w", augmentation_workers=0, schedule={"num_epochs": 3}) as layout:
        assert os.environ["nnUNet_raw"] == str(layout.raw) == str((tmp_path / "w" / "nnUNet_raw").absolute())
        assert os.environ["nnUNet_results"] == str(layout.results)
        assert os.environ["nnUNet_extTrainer"] == str(TRAINERS_DIR)
        assert os.environ["nnUNet_n_proc_DA"] == "0"
        assert json.loads(os.environ[SCHEDULE_ENV]) == {"num_epochs": 3}
        assert layout.preprocessed.is_dir()
    assert os.environ["nnUNet_raw"] == "/somewhere/else"
    assert not [name for name in NNUNET_VARS[1:] if name in os.environ]
    with pytest.raises(RuntimeError), nnunet_environment(tmp_path / "w"):
        raise RuntimeError("boom")
    assert os.environ["nnUNet_raw"] == "/somewhere/else" and "nnUNet_results" not in os.environ


def test_user_process_counts_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "5")
    with nnunet_environment(tmp_path, augmentation_workers=0):
        assert os.environ["nnUNet_n_proc_DA"] == "5"
    assert os.environ["nnUNet_n_proc_DA"] == "5"


def test_conversion_writes_true_2d_slices_in_array_order(tmp_path):
    geom = make_geometry((5, 12, 10), **ROTATED)
    ds = write_tiny_cohort(tmp_path / "ds", n_cases=3, shape=(5, 12, 10), geometry=geom)
    cohort = Cohort(ds)
    raw = tmp_path / "raw" / DATASET_NAME
    slices = convert_patients(cohort, ["case_000", "case_002"], raw)
    assert slices == {"case_000": [f"case_000_{z:04d}" for z in range(5)],
                      "case_002": [f"case_002_{z:04d}" for z in range(5)]}
    assert sorted(p.name for p in (raw / "imagesTr").iterdir())[:2] == ["case_000_0000_0000.nii.gz",
                                                                        "case_000_0001_0000.nii.gz"]
    assert len(list((raw / "labelsTr").iterdir())) == 10
    assert not list((raw / "imagesTr").glob("case_001_*")), "an unlisted (e.g. test) patient was converted"
    reo = Reorientation.of(geom)  # slices of the canonical (LPS) view: ROTATED swaps x and y
    ct = reo.forward(read_array(cohort.image_path("case_000"))[0])
    lab = reo.forward(read_array(cohort.label_path("case_000"))[0])
    for z in (0, 2, 4):
        img = read_image(raw / "imagesTr" / f"case_000_{z:04d}_0000.nii.gz", ndim=2)
        assert img.GetSpacing() == pytest.approx((1.1, 0.7))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), ct[z])
        seg = read_image(raw / "labelsTr" / f"case_000_{z:04d}.nii.gz", ndim=2)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(seg), lab[z])
    ds_json = json.loads((raw / "dataset.json").read_text(encoding="utf-8"))
    assert ds_json["channel_names"] == {"0": "CT"}
    assert ds_json["labels"] == {"background": 0, "lesion": 1}
    assert ds_json["numTraining"] == 10 and ds_json["file_ending"] == ".nii.gz"


def test_conversion_rejects_non_binary_labels(tmp_path):
    ds = write_tiny_cohort(tmp_path / "ds", n_cases=2)
    geom = make_geometry()
    lab = np.zeros((6, 16, 20), np.uint8)
    lab[0, 0, 0] = 2
    write_array(lab, geom, Cohort(ds).label_path("case_001"))
    with pytest.raises(InputError, match=r"case_001\.nii\.gz: label values \{2\} found; expected only 0 and 1"):
        convert_patients(Cohort(ds), ["case_000", "case_001"], tmp_path / "raw" / DATASET_NAME)
    assert not (tmp_path / "raw" / DATASET_NAME).exists(), "no partial dataset may be left behind"


def test_splits_are_grouped_by_patient_and_fold_k_is_ours():
    splits = {"test": ["p9"], "folds": [{"train": ["p1", "p2"], "val": ["p3"]},
                                        {"train": ["p2", "p3"], "val": ["p1"]}]}
    slices = {p: [slice_case_id(p, z) for z in range(3)] for p in ("p1", "p2", "p3")}
    folds = nnunet_splits(splits, slices)
    assert len(folds) == 2
    assert folds[0]["val"] == ["p3_0000", "p3_0001", "p3_0002"]
    assert folds[1]["val"] == ["p1_0000", "p1_0001", "p1_0002"]
    assert folds[0]["train"] == slices["p1"] + slices["p2"]
    for fold in folds:
        patients = {c.rsplit("_", 1)[0] for part in ("train", "val") for c in fold[part]}
        assert "p9" not in patients
        assert not {c.rsplit("_", 1)[0] for c in fold["train"]} & {c.rsplit("_", 1)[0] for c in fold["val"]}
    with pytest.raises(InputError, match="p9"):
        nnunet_splits({"test": [], "folds": [{"train": ["p9"], "val": ["p1"]}]}, slices)


def test_resume_reuses_the_recorded_schedule_unless_overridden(tmp_path):
    layout = WorkLayout(tmp_path)
    (tmp_path / "train_settings.json").write_text(json.dumps(
        {"schedule": {"num_epochs": 7, "num_iterations_per_epoch": 11}}), encoding="utf-8")
    assert _schedule(TrainOptions(resume=True, epochs=9), layout) == {"num_epochs": 9, "num_iterations_per_epoch": 11}
    assert _schedule(TrainOptions(resume=False), layout) == {}
    assert _schedule(TrainOptions(iterations=4, val_iterations=2), layout) == {
        "num_iterations_per_epoch": 4, "num_val_iterations_per_epoch": 2}


class _ThresholdPredictor:
    """Stands in for nnUNetPredictor's array interface: lesion probability 0.9 wherever the input
    exceeds 500 HU (the real predictor runs in test_train_then_predict_end_to_end)."""

    def predict_single_npy_array(self, image, properties, previous, truncated, probabilities):
        assert image.ndim == 4 and image.shape[0] == 1 and probabilities is True
        self.spacing = properties["spacing"]
        p = np.where(image[0] > 500, 0.9, 0.1).astype(np.float32)
        return (p > 0.5).astype(np.uint8), np.stack([1 - p, p])


def test_lesion_probability_keeps_array_order(tmp_path):
    ct = np.full((5, 12, 10), -1000, np.int16)
    ct[1:3, 2:5, 6:9] = 900
    fake = _ThresholdPredictor()
    prob = lesion_probability(fake, ct, (3.0, 1.1, 0.7))
    assert fake.spacing == [3.0, 1.1, 0.7]  # (z, y, x), the order of the array axes
    assert prob.shape == ct.shape and prob.dtype == np.float32
    np.testing.assert_array_equal(np.argwhere(prob >= 0.5), np.argwhere(ct > 500))


def test_shards_partition_the_cases(tiny_cohort):
    cohort = Cohort(tiny_cohort)
    shards = [select_cases(cohort, "all", (i, 2)) for i in range(2)]
    assert sorted(shards[0] + shards[1]) == cohort.cases() and not set(shards[0]) & set(shards[1])
    with pytest.raises(InputError, match="--shard 2/2"):
        select_cases(cohort, "all", (2, 2))


def test_cli_errors_are_one_line_exit_2(tmp_path, tiny_cohort):
    runner = CliRunner()
    r = runner.invoke(main, ["nnunet", "train", "--dataset", str(tiny_cohort), "--work", str(tmp_path / "w")])
    assert r.exit_code == 2 and "splits.json: not found" in r.output
    write_splits(tiny_cohort, test_fraction=0.0, folds=2)
    r = runner.invoke(main, ["nnunet", "train", "--dataset", str(tiny_cohort), "--work", str(tmp_path / "w"),
                             "--folds", "0,5", "--device", "cpu"])
    assert r.exit_code == 2 and "--folds 0,5: splits.json has folds 0..1" in r.output
    (tmp_path / "w").mkdir(exist_ok=True)
    r = runner.invoke(main, ["nnunet", "predict", "--dataset", str(tiny_cohort), "--work", str(tmp_path / "w"),
                             "--out", str(tmp_path / "pred"), "--device", "cpu", "--cases", "all"])
    assert r.exit_code == 2 and "no trained nnU-Net fold" in r.output
    assert not (tmp_path / "pred").exists()
    r = runner.invoke(main, ["nnunet", "predict", "--dataset", str(tiny_cohort), "--work", str(tmp_path / "w"),
                             "--out", str(tmp_path / "pred"), "--shard", "3/2"])
    assert r.exit_code == 2 and "0 <= i < n" in r.output


@pytest.mark.slow
def test_train_one_fold_and_predict_back_to_the_ct_geometry(tmp_path, one_thread):
    geom = make_geometry((4, 32, 32), **ROTATED)
    ds = write_tiny_cohort(tmp_path / "ds", n_cases=4, shape=(4, 32, 32), geometry=geom)
    splits = json.loads(write_splits(ds, test_fraction=0.25, folds=2, seed=0).read_text(encoding="utf-8"))
    test_case = splits["test"][0]
    work, pred = tmp_path / "work", tmp_path / "pred"
    runner = CliRunner()
    r = runner.invoke(main, ["nnunet", "train", "--dataset", str(ds), "--work", str(work), "--folds", "0",
                             "--epochs", "1", "--iterations", "2", "--val-iterations", "1", "--device", "cpu"],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    layout = WorkLayout(work)
    assert layout.trained_folds() == [0]
    assert not list((layout.raw_dataset / "imagesTr").glob(f"{test_case}_*")), "a test patient reached nnU-Net"
    final = json.loads((layout.preprocessed_dataset / "splits_final.json").read_text(encoding="utf-8"))
    assert sorted({c.rsplit("_", 1)[0] for c in final[0]["val"]}) == splits["folds"][0]["val"]
    debug = json.loads((layout.fold_folder(0) / "debug.json").read_text(encoding="utf-8"))
    assert (debug["num_epochs"], debug["num_iterations_per_epoch"], debug["num_val_iterations_per_epoch"]) == \
        ("1", "2", "1")
    params = json.loads(layout.params_json.read_text(encoding="utf-8"))
    assert params["parameters"] > 100_000 and params["paper_parameters"] == 30_600_000
    assert "nnUNet_raw" not in os.environ

    r = runner.invoke(main, ["nnunet", "predict", "--dataset", str(ds), "--work", str(work), "--out", str(pred),
                             "--device", "cpu", "--no-mirroring", "--probabilities"],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    mask, g = read_array(pred / f"{test_case}.nii.gz")
    assert g.mismatch(geom) is None, g.mismatch(geom)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    r = runner.invoke(main, ["nnunet", "predict", "--dataset", str(ds), "--work", str(work), "--out", str(pred),
                             "--device", "cpu", "--folds", "1"])
    assert r.exit_code == 2 and "fold 1 is not trained" in r.output

    # The volume path must equal predicting the 2D slice images nnU-Net was trained on.
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with nnunet_environment(work):
        predictor = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(layout.model_folder), use_folds=(0,))
        native, _ = read_array(Cohort(ds).image_path(test_case))
        reo = Reorientation.of(geom)  # ROTATED swaps x and y: the network sees the canonical (LPS) view
        ct = np.ascontiguousarray(reo.forward(native))
        spacing = reo.canonical_spacing_zyx
        logits_volume = _logits(predictor, ct[None].astype(np.float32), list(spacing))
        for z in range(ct.shape[0]):
            logits_slice = _logits(predictor, ct[None, z:z + 1].astype(np.float32), [999.0, *spacing[1:]])
            np.testing.assert_allclose(logits_volume[:, z], logits_slice[:, 0], rtol=1e-4, atol=1e-4)
        prob = lesion_probability(predictor, ct, spacing)
        raw = reo.backward(prob >= 0.5)
        # the mask is the network's >= 0.5 less the components whose median HU is air (#32): an
        # untrained network's noise may or may not fall there, so both outcomes are checked
        kept, in_air = remove_components_in_air(raw, native)
        np.testing.assert_array_equal(kept, mask)
        record = json.loads((pred / "predict.json").read_text(encoding="utf-8"))
        assert record["removed_in_air"]["lesions"] == in_air.size  # the test split is this one case
    stored = read_probability(pred / "probabilities" / f"{test_case}.nii.gz")  # same geometry, >= 0.5 is the raw mask
    np.testing.assert_array_equal(stored >= 0.5, raw)
    np.testing.assert_allclose(stored, reo.backward(prob), atol=1 / 255 + 1e-6)

    # new patients: the same CT stored with its rows and columns reversed (sitk.Flip keeps every voxel's
    # physical position, changing direction and origin) gives the same mask in physical space
    (tmp_path / "images").mkdir()
    flipped = sitk.Flip(sitk.ReadImage(str(Cohort(ds).image_path(test_case))), [True, True, False])
    sitk.WriteImage(flipped, str(tmp_path / "images" / f"{test_case}_0000.nii.gz"))
    ras_geometry = read_array(tmp_path / "images" / f"{test_case}_0000.nii.gz")[1]
    r = runner.invoke(main, ["nnunet", "predict", "--images", str(tmp_path / "images"), "--work", str(work),
                             "--out", str(tmp_path / "new"), "--device", "cpu", "--no-mirroring"],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["nnunet", "predict", "--images", str(tmp_path / "images"), "--work", str(work),
                             "--out", str(tmp_path / "cropped"), "--device", "cpu", "--no-mirroring", "--crop"],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    cropped = json.loads((tmp_path / "cropped" / "predict.json").read_text(encoding="utf-8"))
    assert cropped["crop"] is True and cropped["per_case"][test_case]["crop"]["boxes"] >= 1
    def lps(path):
        return sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS"))
    np.testing.assert_array_equal(lps(tmp_path / "new" / f"{test_case}.nii.gz"), lps(pred / f"{test_case}.nii.gz"))
    assert read_array(tmp_path / "new" / f"{test_case}.nii.gz")[1].mismatch(ras_geometry) is None
    assert (tmp_path / "new" / "lesions.csv").is_file() and (tmp_path / "new" / "preview" / f"{test_case}.png").is_file()

    _resume_then_interrupt(ds, work, layout)


def _resume_then_interrupt(ds: Path, work: Path, layout: WorkLayout) -> None:
    """``--resume`` continues from the checkpoint (prepared data reused); Ctrl-C during training
    ends the command promptly with exit code 130 and leaves no worker process behind."""
    import signal
    import time

    import psutil

    logs_before = set(layout.fold_folder(0).glob("training_log_*.txt"))
    # a new session, so that SIGINT reaches exactly the command's process group, as Ctrl-C does
    proc = subprocess.Popen([sys.executable, "cli.py", "nnunet", "train", "--dataset", str(ds), "--work", str(work),
                             "--folds", "0", "--epochs", "1000", "--resume", "--device", "cpu"],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, encoding="utf-8", errors="replace",
                            # a terminal's Ctrl-C meets SIGINT's default action; a suite started in the
                            # background (`make test &`) would hand SIG_IGN down, and Python then never
                            # raises KeyboardInterrupt
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 180
        new_logs: set[Path] = set()
        while not new_logs and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
            new_logs = set(layout.fold_folder(0).glob("training_log_*.txt")) - logs_before
        assert new_logs and proc.poll() is None, f"training did not start: {proc.poll()} {proc.stderr.read() if proc.poll() is not None else ''}"
        time.sleep(3)
        children = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 130, proc.stderr.read()
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"orphaned workers: {alive}"
    log_text = next(iter(new_logs)).read_text(encoding="utf-8")
    assert "Epoch 1" in log_text and "Epoch 0\n" not in log_text, "--resume did not continue after epoch 0"
    assert layout.trained_folds() == [0]  # the interrupted run destroyed nothing


def _logits(predictor, image: np.ndarray, spacing: list[float]) -> np.ndarray:
    _, probabilities = predictor.predict_single_npy_array(image, {"spacing": spacing}, None, None, True)
    return np.asarray(probabilities)


def test_serve_names_an_nnunet_model_by_its_folds_checkpoints(tmp_path):
    """serve --nnunet-work: the node's model is 'nnunet' with the fingerprint predict records (the
    folds' checkpoints), read again on each load (SIGHUP); an untrained work folder is refused."""
    import cli
    from nnunet_bridge.predict import layout_fingerprint, model_identity

    layout = WorkLayout(tmp_path / "work")
    with pytest.raises(InputError, match="no trained nnU-Net fold"):
        model_identity(layout.work)
    for fold in (0, 1):
        layout.checkpoint(fold).parent.mkdir(parents=True)
        layout.checkpoint(fold).write_bytes(f"weights {fold}".encode())
    work, name, fingerprint = model_identity(layout.work)
    assert (work, name, fingerprint) == (layout.work.resolve(), "nnunet", layout_fingerprint(layout, [0, 1]))
    load = cli._node_model_loader(None, str(layout.work), {"crop": False, "min_size": 0, "bones": None,
                                                          "bones_from": "project"})
    first = load()
    assert (first.name, first.fingerprint, first.source) == ("nnunet", fingerprint, str(layout.work.resolve()))
    layout.checkpoint(1).write_bytes(b"fine-tuned")
    assert load().fingerprint != first.fingerprint and model_identity(layout.work, [0])[2] != fingerprint
