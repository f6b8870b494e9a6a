"""Scaled nnU-Net plans (issue #38): derived from nnU-Net's own plan, written beside it under their
own identifier, trained, counted and found again by prediction; nnU-Net's own plan unchanged."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from click.testing import CliRunner

from analysis.cohort.splits import write_splits
from analysis.errors import InputError
from analysis.imaging.io import read_array
from cli import main
from nnunet_bridge.env import DATASET_ID, WorkLayout, nnunet_environment
from nnunet_bridge.plans import PlanScale, scaled_features, scaled_plans, write_scaled_plans
from nnunet_bridge.train import TrainOptions, _scale
from tests.conftest import write_tiny_cohort

#: nnU-Net 2.8.1's 2d configuration for slices of 128^2 at 1 mm (the demo's phantom), as planned.
NNUNET_2D = {
    "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 36,
    "patch_size": [128, 128], "median_image_size_in_voxels": [128.0, 128.0], "spacing": [1.0, 1.0],
    "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
    "architecture": {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"n_stages": 6, "features_per_stage": [32, 64, 128, 256, 512, 512],
                        "conv_op": "torch.nn.modules.conv.Conv2d", "kernel_sizes": [[3, 3]] * 6,
                        "strides": [[1, 1]] + [[2, 2]] * 5, "n_conv_per_stage": [2] * 6,
                        "n_conv_per_stage_decoder": [2] * 5, "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                        "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
    "batch_dice": True,
}
PLANS = {"dataset_name": "Dataset501_Bonemets", "plans_name": "nnUNetPlans", "configurations": {"2d": NNUNET_2D}}


def plain_unet_parameters(arch: dict, input_channels: int = 1, num_classes: int = 2) -> int:
    """Parameters of dynamic_network_architectures' PlainConvUNet (2D, conv bias, affine InstanceNorm,
    a 1x1 segmentation head per decoder stage), counted by hand from its definition."""
    f, k, st = arch["features_per_stage"], arch["kernel_sizes"], arch["strides"]

    def conv(cin: int, cout: int, kernel: list[int]) -> int:
        return cin * cout * int(np.prod(kernel)) + cout + 2 * cout  # weights, bias, norm scale and shift

    total, cin = 0, input_channels
    for s in range(arch["n_stages"]):
        for i in range(arch["n_conv_per_stage"][s]):
            total += conv(cin if i == 0 else f[s], f[s], k[s])
        cin = f[s]
    for s in range(arch["n_stages"] - 1, 0, -1):  # decoder, bottom up
        below, skip = f[s], f[s - 1]
        total += below * skip * int(np.prod(st[s])) + skip  # transposed convolution
        for i in range(arch["n_conv_per_stage_decoder"][s - 1]):
            total += conv(2 * skip if i == 0 else skip, skip, k[s - 1])
        total += skip * num_classes + num_classes  # segmentation head
    return total


def test_identifier_names_what_departs_from_nnunet():
    assert PlanScale().identifier() == "nnUNetPlans" and PlanScale().is_default
    assert PlanScale(width=0.25, batch_size=16, patch_size=(64, 64)).identifier() == "nnUNetPlans_w0.25_b16_p64x64"
    assert PlanScale(batch_size=4).identifier() == "nnUNetPlans_b4"


def test_width_scales_every_stage_and_keeps_the_rest():
    scaled = scaled_plans(PLANS, PlanScale(width=0.25))
    config = scaled["configurations"]["2d"]
    assert config["architecture"]["arch_kwargs"]["features_per_stage"] == [8, 16, 32, 64, 128, 128]
    assert scaled["plans_name"] == "nnUNetPlans_w0.25"
    unchanged = copy.deepcopy(NNUNET_2D)
    unchanged["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 32, 64, 128, 128]
    assert config == unchanged  # same patch, batch, data_identifier (nnU-Net's preprocessed data), topology
    assert PLANS["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"][0] == 32  # not modified
    assert scaled_features([32, 64], 0.01) == [4, 4]


def test_patch_size_takes_nnunets_topology_for_it():
    scaled = scaled_plans(PLANS, PlanScale(width=0.25, batch_size=16, patch_size=(64, 64)))
    config = scaled["configurations"]["2d"]
    arch = config["architecture"]["arch_kwargs"]
    # 64 -> 32 -> 16 -> 8 -> 4 (nnU-Net stops at a 4-voxel bottleneck): 5 stages, features min(512, 32 * 2**i) / 4
    assert (arch["n_stages"], arch["features_per_stage"]) == (5, [8, 16, 32, 64, 128])
    assert arch["strides"] == [[1, 1]] + [[2, 2]] * 4 and arch["kernel_sizes"] == [[3, 3]] * 5
    assert arch["n_conv_per_stage"] == [2] * 5 and arch["n_conv_per_stage_decoder"] == [2] * 4
    assert (config["patch_size"], config["batch_size"], config["data_identifier"]) == ([64, 64], 16, "nnUNetPlans_2d")
    # a patch nnU-Net would pad is refused, naming sizes it takes
    with pytest.raises(InputError, match=r"--patch-size 100,100: .*multiple.*96,96 or 112,112"):
        scaled_plans(PLANS, PlanScale(patch_size=(100, 100)))
    with pytest.raises(InputError, match="--width 0"):
        scaled_plans(PLANS, PlanScale(width=0.0))


def test_the_hand_count_matches_the_network_nnunet_builds():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    for plans in (PLANS, scaled_plans(PLANS, PlanScale(width=0.25, patch_size=(64, 64)))):
        arch = plans["configurations"]["2d"]["architecture"]
        net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                     1, 2, allow_init=False, deep_supervision=True)
        assert sum(p.numel() for p in net.parameters()) == plain_unet_parameters(arch["arch_kwargs"])
    assert plain_unet_parameters(NNUNET_2D["architecture"]["arch_kwargs"]) > 20_000_000


def test_resume_keeps_the_recorded_plan(tmp_path):
    layout = WorkLayout(tmp_path)
    (tmp_path / "train_settings.json").write_text(json.dumps(
        {"plans": "nnUNetPlans_w0.5_p64x64", "scale": {"width": 0.5, "batch_size": None, "patch_size": [64, 64]}}),
        encoding="utf-8")
    assert layout.plans_identifier == "nnUNetPlans_w0.5_p64x64"  # prediction finds the plan trained last
    assert WorkLayout(tmp_path, "nnUNetPlans").model_folder.name == "nnUNetTrainerBonemets__nnUNetPlans__2d"
    assert _scale(TrainOptions(resume=True), layout) == PlanScale(width=0.5, patch_size=(64, 64))
    assert _scale(TrainOptions(resume=False), layout) == PlanScale()
    with pytest.raises(InputError, match="--resume: .* trained the plan nnUNetPlans_w0.5_p64x64"):
        _scale(TrainOptions(resume=True, width=0.25), layout)


def test_cli_refuses_bad_scale_options(tmp_path, tiny_cohort):
    write_splits(tiny_cohort, test_fraction=0.0, folds=2)
    runner = CliRunner()
    for args, message in ((["--patch-size", "64"], "ROWS,COLS"), (["--width", "0"], "--width"),
                          (["--batch-size", "0"], "--batch-size")):
        r = runner.invoke(main, ["nnunet", "train", "--dataset", str(tiny_cohort), "--work", str(tmp_path / "w"),
                                 *args])
        assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_default_plan_is_nnunets_and_a_scaled_plan_trains_counts_and_predicts(tmp_path, one_thread):
    ds = write_tiny_cohort(tmp_path / "ds", n_cases=4, shape=(4, 32, 32))
    splits = json.loads(write_splits(ds, test_fraction=0.25, folds=2, seed=0).read_text(encoding="utf-8"))
    work = tmp_path / "work"
    runner = CliRunner()
    short = ["--folds", "0", "--epochs", "1", "--iterations", "1", "--val-iterations", "1", "--device", "cpu"]
    r = runner.invoke(main, ["nnunet", "train", "--dataset", str(ds), "--work", str(work), *short],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    default = WorkLayout(work)
    assert default.plans_identifier == "nnUNetPlans" and default.trained_folds() == [0]
    nnunet_file = default.preprocessed_dataset / "nnUNetPlans.json"
    ours = nnunet_file.read_bytes()
    with nnunet_environment(work):  # nnU-Net's own planner on the same fingerprint writes the same plan
        from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiments

        assert plan_experiments([DATASET_ID]) == "nnUNetPlans"
    assert json.loads(nnunet_file.read_bytes()) == json.loads(ours)
    nnunet_plans = json.loads(ours)
    params = json.loads(default.params_json.read_text(encoding="utf-8"))
    assert params["plans"] == "nnUNetPlans" and params["width"] == 1.0
    assert params["parameters"] == plain_unet_parameters(nnunet_plans["configurations"]["2d"]["architecture"]["arch_kwargs"])

    # --width 0.5 (and a smaller patch and batch): a derived plan beside nnU-Net's, which stays as it was
    r = runner.invoke(main, ["nnunet", "train", "--dataset", str(ds), "--work", str(work), *short, "--width", "0.5",
                             "--batch-size", "3", "--patch-size", "16,16"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "plan nnUNetPlans_w0.5_b3_p16x16" in r.output
    assert nnunet_file.read_bytes() == ours
    layout = WorkLayout(work)
    assert layout.plans_identifier == "nnUNetPlans_w0.5_b3_p16x16" and layout.trained_folds() == [0]
    assert default.with_plans("nnUNetPlans").trained_folds() == [0]  # nnU-Net's own model is still there
    scaled = json.loads((layout.preprocessed_dataset / "nnUNetPlans_w0.5_b3_p16x16.json").read_text(encoding="utf-8"))
    trained = json.loads((layout.model_folder / "plans.json").read_text(encoding="utf-8"))
    assert trained == scaled  # the trainer ran the derived plan
    arch = scaled["configurations"]["2d"]["architecture"]["arch_kwargs"]
    own = nnunet_plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"]
    # 16 -> 8 -> 4: three stages of nnU-Net's first three widths, halved
    assert arch["features_per_stage"] == [round(f * 0.5) for f in own[:3]]
    assert scaled["configurations"]["2d"]["batch_size"] == 3 and scaled["configurations"]["2d"]["patch_size"] == [16, 16]
    params = json.loads(layout.params_json.read_text(encoding="utf-8"))
    assert params["parameters"] == plain_unet_parameters(arch) and params["plans"] == "nnUNetPlans_w0.5_b3_p16x16"
    assert params["width"] == 0.5 and params["features_per_stage"] == arch["features_per_stage"]
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    a = scaled["configurations"]["2d"]["architecture"]
    net = get_network_from_plans(a["network_class_name"], a["arch_kwargs"], a["_kw_requires_import"], 1, 2,
                                 allow_init=False, deep_supervision=True)
    assert params["parameters"] == sum(p.numel() for p in net.parameters())
    settings = json.loads(layout.train_settings_json.read_text(encoding="utf-8"))
    assert settings["plans"] == "nnUNetPlans_w0.5_b3_p16x16" and settings["scale"]["patch_size"] == [16, 16]

    # prediction finds the derived plan in WORK and slides its 16x16 window over the whole slices
    pred = tmp_path / "pred"
    r = runner.invoke(main, ["nnunet", "predict", "--dataset", str(ds), "--work", str(work), "--out", str(pred),
                             "--device", "cpu", "--no-mirroring"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    test_case = splits["test"][0]
    mask, _ = read_array(pred / f"{test_case}.nii.gz")
    assert mask.shape == (4, 32, 32) and set(np.unique(mask)) <= {0, 1}
    record = json.loads((pred / "predict.json").read_text(encoding="utf-8"))
    assert record["model"]["plans"] == "nnUNetPlans_w0.5_b3_p16x16"
    assert record["model"]["model_folder"].endswith("nnUNetTrainerBonemets__nnUNetPlans_w0.5_b3_p16x16__2d")
    budget = dict(record["budget"])
    # the pixel spacing trained at: the plan's (nnU-Net keeps it (rows, cols)), here the cohort's 0.8 x 0.9 mm
    assert budget.pop("spacing_xy_mm") == pytest.approx([0.8, 0.9])
    assert budget == {"width": 0.5, "steps": 1, "batch_size": 3, "samples": 3, "patch": [16, 16],
                      "plan": "nnUNetPlans_w0.5_b3_p16x16"}
    assert scaled["configurations"]["2d"]["spacing"] == pytest.approx([0.9, 0.8])
    assert record["model"]["spacing_xy_mm"] == pytest.approx([0.8, 0.9])
    spacing = record["inference"]["spacing"]
    assert spacing["resample"] is True and spacing["model"]["xy_mm"] == pytest.approx([0.8, 0.9])
    assert spacing["model"]["used"].startswith("model's")
    assert record["training"]["validation_dice"] is not None


def test_scaled_plans_are_written_once_beside_nnunets(tmp_path):
    folder = tmp_path / "Dataset501_Bonemets"
    folder.mkdir()
    (folder / "nnUNetPlans.json").write_text(json.dumps(PLANS), encoding="utf-8")
    before = (folder / "nnUNetPlans.json").read_bytes()
    assert write_scaled_plans(folder, PlanScale()) == "nnUNetPlans"
    assert sorted(p.name for p in folder.iterdir()) == ["nnUNetPlans.json"]
    scale = PlanScale(width=0.5)
    assert write_scaled_plans(folder, scale) == "nnUNetPlans_w0.5"
    written = folder / "nnUNetPlans_w0.5.json"
    stamp = written.stat().st_mtime_ns
    write_scaled_plans(folder, scale)
    assert written.stat().st_mtime_ns == stamp  # unchanged content is not rewritten (parallel folds)
    assert (folder / "nnUNetPlans.json").read_bytes() == before
    assert json.loads(written.read_text(encoding="utf-8"))["plans_name"] == "nnUNetPlans_w0.5"

