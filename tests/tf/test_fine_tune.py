"""train --init-from (a fine-tune keeps its parent's weights and architecture, and says so) and
--hard-negative-fraction (crops centred on a reader's rejected regions)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from click.testing import CliRunner  # noqa: E402

import cli  # noqa: E402
from analysis.cohort.layout import Cohort  # noqa: E402
from analysis.imaging.io import read_array, write_mask  # noqa: E402
from bonemets_tf import cache, data  # noqa: E402
from bonemets_tf.run import read_run  # noqa: E402

TINY = ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2"]


def _train(*args: str) -> str:
    result = CliRunner().invoke(cli.main, ["train", *args])
    return result.exit_code, result.output


def _history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A tiny UNet RUN on the tiny cohort (two steps: its weights differ from any fresh start)."""
    from tests.tf.conftest import make_cohort

    root = tmp_path_factory.mktemp("fine_tune")
    dataset = make_cohort(root / "DATASET")
    run = root / "PARENT"
    code, output = _train("--dataset", str(dataset), "--task", "segment", "--arch", "unet", "--out", str(run),
                          "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--image-size", "32",
                          "--width", "0.25", "--seed", "1", "--no-guard", "--cache", str(root / "cache"))
    assert code == 0, output
    return dataset, run, root / "cache"


def _first_batch_loss(model, dataset: Path, cache_dir: Path, config: dict) -> float:
    """The loss of ``model`` (training mode, as a train step computes it) on the first batch a
    run with ``config``'s settings draws."""
    from bonemets_tf.losses import DiceBCELoss
    from bonemets_tf.train import _training_view

    cases = cache.ensure_cached(Cohort(dataset), config["split"]["train"], cache_dir)
    s = config["settings"]
    sampling = data.Sampling(s["task"], image_size=s["image_size"], positive_fraction=s["positive_fraction"],
                             lesion_crop_p=s["lesion_crop_p"])
    store = data.SliceStore(cases, context=s["context"])
    x, y = next(iter(data.training_dataset(store, sampling, batch_size=s["batch_size"], seed=s["seed"])))
    logits = _training_view(model, s["task"])(x, training=True)
    return float(DiceBCELoss(from_logits=True, batch_dice=True)(y, logits))


def test_init_from_keeps_weights_architecture_and_records_its_parent(parent, tmp_path):
    dataset, parent_run, cache_dir = parent
    child = tmp_path / "CHILD"
    code, output = _train("--dataset", str(dataset), "--init-from", str(parent_run), "--out", str(child),
                          "--no-guard", "--cache", str(cache_dir), *TINY)
    assert code == 0, output
    config = json.loads((child / "config.json").read_text(encoding="utf-8"))
    settings = config["settings"]
    # the architecture came from the parent, not from train's defaults (width 1, image size 256)
    assert (settings["task"], settings["arch"], settings["width"], settings["context"], settings["image_size"]) == \
        ("segment", "unet", 0.25, 1, 32)
    before = read_run(parent_run)
    assert settings["init_from"] == str(parent_run.resolve())
    assert config["init_from"]["fingerprint"] == before.fingerprint() and config["init_from"]["name"] == "unet"
    assert config["lineage"] == [config["init_from"]]
    after = read_run(child)
    assert after.name == f"unet fine-tuned from {before.fingerprint()[:8]}"
    assert after.describe()["lineage"][0]["fingerprint"] == before.fingerprint()
    # the first step's loss is the parent's on the same batch (a fresh start's is not)
    parent_loss = _first_batch_loss(before.load_model(), dataset, cache_dir, config)
    first_step = float(_history(child)[0]["loss"])
    assert first_step == pytest.approx(parent_loss, rel=1e-4, abs=1e-5)
    from bonemets_tf.models.registry import build_model

    keras.utils.set_random_seed(0)
    fresh = build_model("unet", width=0.25, image_size=32)
    assert abs(_first_batch_loss(fresh, dataset, cache_dir, config) - parent_loss) > 1e-3
    # the name shows the lineage where the model is named: predict.json and analyze's model table
    pred = tmp_path / "PRED" / "child"
    result = CliRunner().invoke(cli.main, ["predict", "--model", str(child), "--dataset", str(dataset), "--out",
                                           str(pred), "--cases", "case_04", "--no-preview"])
    assert result.exit_code == 0, result.output
    record = json.loads((pred / "predict.json").read_text(encoding="utf-8"))["model"]
    assert record["name"] == after.name and record["lineage"][0]["fingerprint"] == before.fingerprint()
    from analysis.evaluation.settings import MODEL_COLUMNS, model_rows

    row = dict(zip(MODEL_COLUMNS, model_rows(pred.parent, ["child"], {})[0]))
    assert (row["network"], row["fingerprint"]) == (after.name, after.fingerprint())
    # a grandchild carries the whole lineage, oldest first
    grandchild = tmp_path / "GRANDCHILD"
    code, output = _train("--dataset", str(dataset), "--init-from", str(child), "--out", str(grandchild),
                          "--no-guard", "--cache", str(cache_dir), *TINY)
    assert code == 0, output
    lineage = read_run(grandchild).lineage
    assert [a["fingerprint"] for a in lineage] == [before.fingerprint(), after.fingerprint()]
    assert lineage[1]["name"] == after.name


def test_init_from_refuses_another_architecture_in_one_line(parent, tmp_path):
    dataset, parent_run, cache_dir = parent
    for extra, needle in ((["--arch", "resunet"], "--arch resunet: --init-from"),
                          (["--width", "0.5"], "--width 0.5: --init-from"),
                          (["--task", "detect"], "--task detect: --init-from"),
                          (["--weights", str(parent_run / "model.keras")], "--init-from and --weights exclude")):
        code, output = _train("--dataset", str(dataset), "--init-from", str(parent_run), "--out",
                              str(tmp_path / "X"), "--cache", str(cache_dir), *TINY, *extra)
        assert code == 2, output
        assert output.startswith("error: ") and needle in output and output.count("\n") == 1, output
        assert not (tmp_path / "X").exists()
    # the same value as the parent's is no conflict
    code, output = _train("--dataset", str(dataset), "--init-from", str(parent_run), "--arch", "unet", "--width",
                          "0.25", "--out", str(tmp_path / "Y"), "--no-guard", "--cache", str(cache_dir), *TINY)
    assert code == 0, output
    # without --init-from, --task and --arch are still required
    code, output = _train("--dataset", str(dataset), "--out", str(tmp_path / "Z"), *TINY)
    assert code == 2 and "--task and --arch are required" in output


def _add_negatives(dataset: Path, cases: list[str]) -> dict[str, np.ndarray]:
    """A hard-negative block in the soft tissue beside the bone (no lesion there, noisy HU) of ``cases``."""
    cohort = Cohort(dataset)
    written = {}
    for case in cases:
        label, geometry = read_array(cohort.label_path(case))
        hard = np.zeros_like(label, np.uint8)
        hard[2, 32:36, 38:42] = 1
        hard[label > 0] = 0
        write_mask(hard, geometry, cohort.negatives_path(case))
        written[case] = hard
    return written


def test_hard_negative_crops_are_centred_on_the_maps(tmp_path):
    from tests.tf.conftest import make_cohort

    dataset = make_cohort(tmp_path / "D")
    cohort = Cohort(dataset)
    cases = ["case_01", "case_02"]
    hard = _add_negatives(dataset, cases)
    cached = cache.ensure_cached(cohort, cases, tmp_path / "cache")
    assert [c.has_negatives for c in cached] == [True, True] and all(c.hard[2] for c in cached)
    store = data.SliceStore(cached, negatives=True)
    assert np.array_equal(np.asarray(store.read_negatives(np.int64(2)))[..., 0], hard["case_01"][2])
    size = 16
    sampling = data.Sampling("segment", image_size=size, positive_fraction=0.5, lesion_crop_p=0.7,
                             augmentation=data.Augmentation(flip=False, rotate_deg=0, scale=0, hu_offset=0, hu_scale=0),
                             hard_negative_fraction=0.5)
    images = np.concatenate([np.asarray(x) for x, _ in
                             data.training_dataset(store, sampling, batch_size=8, seed=0).take(8)])
    # the hard-negative block (its noisy soft-tissue HU, found nowhere else) sits at rows 32..35,
    # cols 38..41 of slice 2: a crop centred on it holds it; a uniformly placed crop rarely does
    blocks = [np.asarray(c.ct()[2, 32:36, 38:42], np.float32) for c in cached]

    def centred(img: np.ndarray) -> bool:
        return any(np.array_equal(img[r:r + 4, c:c + 4, 0], b) for b in blocks for r in range(13)
                   for c in range(13))

    share = np.mean([centred(img) for img in images])
    assert 0.35 < share < 0.65, share
    without = data.Sampling("segment", image_size=size, augmentation=sampling.augmentation)
    plain = [np.asarray(x) for x, _ in data.training_dataset(store, without, batch_size=8, seed=0).take(8)]
    assert np.mean([centred(img) for img in np.concatenate(plain)]) < 0.1
    # F = 0 draws exactly the stream of a store without hard negatives
    plain = data.Sampling("segment", image_size=size)
    a = next(iter(data.training_dataset(data.SliceStore(cached), plain, batch_size=4, seed=3)))
    b = next(iter(data.training_dataset(store, plain, batch_size=4, seed=3)))
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_hard_negative_fraction_needs_maps_and_refuses_overlap(tmp_path):
    from tests.tf.conftest import make_cohort

    dataset = make_cohort(tmp_path / "D")
    common = ["--dataset", str(dataset), "--task", "segment", "--arch", "unet", "--width", "0.25", "--image-size",
              "32", "--cache", str(tmp_path / "cache"), "--hard-negative-fraction", "0.3", *TINY]
    code, output = _train(*common, "--out", str(tmp_path / "A"))
    assert code == 2 and output == f"error: --hard-negative-fraction 0.3: {dataset / 'negativesTr'} not found; " \
                                   f"expected hard-negative maps negativesTr/<case>.nii.gz (written by import-reviews)\n"
    # a map that marks a lesion voxel is refused, naming the file
    cohort = Cohort(dataset)
    label, geometry = read_array(cohort.label_path("case_01"))
    write_mask((label > 0).astype(np.uint8), geometry, cohort.negatives_path("case_01"))
    code, output = _train(*common, "--out", str(tmp_path / "B"))
    assert code == 2 and f"{cohort.negatives_path('case_01')}: {int(label.sum())} voxel(s) are also lesion" in output
    assert not (tmp_path / "B").exists()
    # with a proper map the run trains, and its config records the fraction and the cohort's review set
    _add_negatives(dataset, ["case_01"])
    (dataset / "reviews.json").write_text(json.dumps({"cases": {"case_01": {"reader": "alice"},
                                                                "case_00": {"reader": "bob"}}}), encoding="utf-8")
    code, output = _train(*common, "--out", str(tmp_path / "C"), "--no-guard")
    assert code == 0, output
    saved = json.loads((tmp_path / "C" / "config.json").read_text(encoding="utf-8"))
    assert saved["settings"]["hard_negative_fraction"] == 0.3
    assert {k: saved["review_set"][k] for k in ("cases", "train", "val")} == {"cases": 2, "train": ["case_01"],
                                                                              "val": ["case_00"]}


def test_a_fine_tune_inherits_the_recorded_spacing_and_the_lineage(tmp_path):
    """lineage_record: the parent's training spacing (config.json "spacing", when recorded) passes to
    the child, the ancestors come first, and the parent's name shows its own lineage."""
    from bonemets_tf.lineage import lineage_record
    from bonemets_tf.run import RunInfo

    (tmp_path / "model.keras").write_bytes(b"weights")
    grand = {"run": "/runs/g", "fingerprint": "0" * 16, "name": "unet", "arch": "unet", "dataset": "/d"}
    config = {"settings": {"arch": "unet", "dataset": "/d2"}, "init_from": grand, "lineage": [grand],
              "spacing": {"in_plane_xy_mm": [0.8, 0.8], "source": "median over the 4 training cases"}}
    parent = RunInfo(path=tmp_path, config=config, arch="unet", task="segment", context=1, image_size=64, stride=8)
    assert parent.name == "unet fine-tuned from 00000000"
    record = lineage_record(parent)
    assert record["spacing"]["in_plane_xy_mm"] == [0.8, 0.8]
    assert record["spacing"]["source"].startswith(f"inherited from --init-from {tmp_path}")
    assert [a["fingerprint"] for a in record["lineage"]] == ["0" * 16, parent.fingerprint()]
    assert record["init_from"] == record["lineage"][-1] and record["init_from"]["name"] == parent.name
    del config["spacing"]
    assert "spacing" not in lineage_record(parent)  # nothing recorded: the child's own median stands
