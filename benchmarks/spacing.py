"""Does a lesion's mask depend on the scanner's pixel size? A Keras UNet trained on a 1 mm phantom
predicts the same patients resampled to 0.6 mm and 1.4 mm in-plane, with ``predict``'s
resampling to the training spacing (the default) and without it (``--no-resample``).

Steps (one TensorFlow process; the cohort and the RUN are kept in ``--work`` and reused):

1. a phantom cohort at 1 x 1 x 3 mm (``phantom``, ``--cases`` patients of 48 x 128 x 128; splits
   20 % test);
2. a UNet trained on it (the demo's default segmenter budget: 6 epochs of 40 steps of 16
   crops of 64^2, width 0.25, lr 2e-3 cosine); its ``config.json`` records 1 mm;
3. the evaluated cases (``--eval``: ``all`` by default: the measure is the model against itself
   across pixel sizes, not its accuracy, so the training patients count too; ``test``: the test
   split only) resampled in-plane with SimpleITK (B-spline for the CT, nearest for the
   label; edge-aligned, the same extent) to each ``--spacings`` value: another interpolator
   than ``predict``'s linear one, so the round trip is not an identity by construction;
4. ``predict`` on the 1 mm originals (the reference masks) and on each resampled copy with
   and without resampling;
5. per variant against the 1 mm prediction: mask Dice pooled over the test cases on the finer
   of the two grids (the other mask resampled to it, nearest), and for each reference lesion
   of at least ``--min-ml`` the relative difference of the volume the variant predicts there
   (its components overlapping the lesion, in its own voxels' ml): the median over lesions;
   and Dice against the ground truth on the variant's own grid.

    python benchmarks/spacing.py --work /tmp/spacing [--cases 12] [--spacings 0.6,1.4] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.cohort.layout import Cohort, write_dataset_json  # noqa: E402
from analysis.lesions.overlap import dice  # noqa: E402
from analysis.imaging.io import Geometry, read_array, write_array, write_mask  # noqa: E402
from analysis.imaging.resample import resample_in_plane  # noqa: E402
from analysis.lesions import lesion_instances  # noqa: E402

TRAIN = dict(task="segment", arch="unet", epochs=6, steps_per_epoch=40, batch_size=16, image_size=64, width=0.25,
             lr=2e-3, lr_schedule="cosine", seed=0)


def cohort(work: Path, cases: int) -> Path:
    from analysis.cohort.phantom import generate_cohort
    from analysis.cohort.splits import write_splits

    root = work / "ds1mm"
    if not (root / "splits.json").is_file():
        generate_cohort(root, cases=cases, seed=0, shape=(48, 128, 128), spacing=(1.0, 1.0, 3.0), overwrite=True)
        write_splits(root, test_fraction=0.2, folds=5, seed=0)
    return root


def trained_run(work: Path, dataset: Path) -> tuple[Path, float]:
    from bonemets_tf.run import MODEL_FILE
    from bonemets_tf.train import TrainConfig, train

    run = work / "unet_1mm"
    if (run / MODEL_FILE).is_file():
        return run, float("nan")
    t0 = time.perf_counter()
    train(TrainConfig(dataset=str(dataset), **TRAIN), run, overwrite=True)
    return run, time.perf_counter() - t0


def resampled_copy(src: Cohort, cases: list[str], pixel_mm: float, out: Path) -> Path:
    """The cases on ``pixel_mm`` pixels in-plane (SimpleITK: B-spline CT, nearest label), same extent."""
    import SimpleITK as sitk

    dst = Cohort(out)
    for case in cases:
        for path, target, interp, kind in ((src.image_path(case), dst.image_path(case), sitk.sitkBSpline, "ct"),
                                           (src.label_path(case), dst.label_path(case), sitk.sitkNearestNeighbor,
                                            "mask")):
            if target.is_file():
                continue
            image = sitk.ReadImage(str(path))
            size, spacing = image.GetSize(), image.GetSpacing()
            new_size = [int(round(size[i] * spacing[i] / pixel_mm)) for i in (0, 1)] + [size[2]]
            new_spacing = [size[i] * spacing[i] / new_size[i] for i in (0, 1)] + [spacing[2]]
            d = np.asarray(image.GetDirection()).reshape(3, 3)
            shift = sum((new_spacing[i] - spacing[i]) / 2.0 * d[:, i] for i in (0, 1))  # edge-aligned
            origin = (np.asarray(image.GetOrigin()) + shift).tolist()
            out_img = sitk.Resample(image, new_size, sitk.Transform(), interp, origin, new_spacing,
                                    image.GetDirection(), -1024.0 if kind == "ct" else 0.0, image.GetPixelID())
            arr = sitk.GetArrayFromImage(out_img)
            geometry = Geometry.of(out_img)
            if kind == "ct":
                write_array(np.clip(np.rint(arr), -1024, 3071).astype(np.int16), geometry, target)
            else:
                write_mask(arr.astype(np.uint8), geometry, target)
    write_dataset_json(out, len(cases))
    return out


def _on(mask: np.ndarray, shape_rc) -> np.ndarray:
    return resample_in_plane(mask.astype(np.uint8), shape_rc, order=0, dtype=np.uint8)


def compare(ref_dir: Path, ref_cohort: Cohort, var_dir: Path, var_cohort: Cohort, cases: list[str],
            min_ml: float) -> dict[str, float]:
    inter = total = 0
    rel = []
    gt_dice = []
    for case in cases:
        ref, g_ref = read_array(ref_dir / f"{case}.nii.gz")
        var, g_var = read_array(var_dir / f"{case}.nii.gz")
        finer = ref.shape[1] >= var.shape[1]
        a, b = (ref, _on(var, ref.shape[1:])) if finer else (_on(ref, var.shape[1:]), var)
        inter += int(np.count_nonzero(a & b))
        total += int(a.sum() + b.sum())
        # lesion volumes: each reference lesion >= min_ml against the variant's components touching it
        ref_labels, n = lesion_instances(ref)
        var_labels, _ = lesion_instances(var)
        ref_on_var = resample_in_plane(ref_labels.astype(np.float32), var.shape[1:], order=0).astype(np.int64)
        for i in range(1, n + 1):
            v_ref = float((ref_labels == i).sum()) * g_ref.voxel_volume_ml
            if v_ref < min_ml:
                continue
            touching = np.unique(var_labels[(ref_on_var == i) & (var_labels > 0)])
            v_var = float(np.isin(var_labels, touching).sum()) * g_var.voxel_volume_ml if touching.size else 0.0
            rel.append(abs(v_var - v_ref) / v_ref)
        truth = read_array(var_cohort.label_path(case))[0]
        gt_dice.append(dice(var, truth))
    return {"dice_vs_1mm": 2.0 * inter / total if total else float("nan"),
            "median_rel_volume_diff": float(np.median(rel)) if rel else float("nan"), "lesions": len(rel),
            "dice_vs_truth": float(np.nanmean(gt_dice))}


def predict_into(run: Path, dataset: Path, out: Path, resample: bool, cases: list[str]) -> float:
    from bonemets_tf.predict import PredictOptions, predict

    t0 = time.perf_counter()
    predict(run, dataset, out, options=PredictOptions(cases=",".join(cases), resample=resample, preview=False,
                                                      overwrite=True))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--eval", choices=("all", "test"), default="all")
    p.add_argument("--spacings", default="0.6,1.4")
    p.add_argument("--min-ml", type=float, default=0.5)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    ds = cohort(args.work, args.cases)
    run, train_s = trained_run(args.work, ds)
    src = Cohort(ds)
    held_out = sorted(json.loads((ds / "splits.json").read_text(encoding="utf-8"))["test"])
    test = src.cases() if args.eval == "all" else held_out
    pred = args.work / "pred"
    seconds = {"train": train_s, "1mm": predict_into(run, ds, pred / "1mm", True, test)}
    rows = []
    for mm in (float(v) for v in args.spacings.split(",")):
        var_ds = resampled_copy(src, test, mm, args.work / f"ds{mm:g}mm")
        for resample in (True, False):
            name = f"{mm:g}mm_{'resample' if resample else 'native'}"
            seconds[name] = predict_into(run, var_ds, pred / name, resample, test)
            rows.append({"pixel_mm": mm, "resample": resample, "seconds": round(seconds[name], 1),
                         **compare(pred / "1mm", src, pred / name, Cohort(var_ds), test, args.min_ml)})
    ref_truth = float(np.nanmean([dice(read_array(pred / "1mm" / f"{c}.nii.gz")[0], read_array(src.label_path(c))[0])
                                  for c in held_out]))
    result = {"cases": test, "held_out": held_out, "train_seconds": train_s, "reference_dice_vs_truth": ref_truth,
              "rows": rows, "cpu": _cpu(), "min_ml": args.min_ml}
    print(_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return platform.processor()
    keep = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Model name", "CPU(s)", "Flags"):
            keep[key.strip()] = value.strip()
    flags = [f for f in keep.get("Flags", "").split() if f.startswith(("avx", "fma", "amx"))]
    return f"{keep.get('Model name', '?')}, {keep.get('CPU(s)', '?')} CPUs, flags {' '.join(flags)}"


def _table(result: dict) -> str:
    lines = [f"reference: the 1 mm prediction (mean Dice vs truth {result['reference_dice_vs_truth']:.3f} on the "
             f"held-out {', '.join(result['held_out'])}); {len(result['cases'])} cases; CPU: {result['cpu']}",
             f"| pixels | predict | Dice vs 1 mm prediction | median volume difference (lesions >= {result['min_ml']:g} "
             f"ml, n) | mean Dice vs truth | seconds |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['pixel_mm']:g} mm | {'resampled to 1 mm' if r['resample'] else '--no-resample'} | "
                     f"{r['dice_vs_1mm']:.3f} | {100 * r['median_rel_volume_diff']:.1f} % ({r['lesions']}) | "
                     f"{r['dice_vs_truth']:.3f} | {r['seconds']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
