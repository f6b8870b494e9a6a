"""Benchmark: everything but radiomics on one paper-sized case pair, and radiomics per lesion.

Builds a synthetic 385 x 512 x 512 (slices, rows, cols) case in numpy (CT, bone map, a
ground truth with ~30 lesions, a prediction that shifts, grows and misses some lesions and
adds false positives), then times:

1. the in-memory per-case analysis (lesions, attributes, matching, overlap, clinical counts);
2. ``run_analysis(..., radiomics=False)`` on that one case written as NIfTI (adds I/O and the
   up-front validation decode);
3. pyradiomics seconds per lesion region (all six classes).

Run: ``python benchmarks/bench_analyze.py [--lesions 30] [--radiomics-lesions 10]``.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from analysis.cohort.layout import write_dataset_json
from analysis.evaluation.analyze import AnalysisConfig, _clinical_counts, _lesion_set, run_analysis
from analysis.evaluation.metrics.overlap import case_overlap, slice_overlap
from analysis.imaging.io import Geometry
from analysis.lesions import match_lesions

SHAPE = (385, 512, 512)
SPACING = (0.8, 0.8, 2.5)  # x, y, z mm


def build(n_lesions: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z, y, x = SHAPE
    bones = np.zeros(SHAPE, np.uint8)
    bones[:, 300:380, 220:290] = 2                    # spine column
    bones[:, 150:170, 60:450] = 3                     # a rib band
    bones[250:, 320:420, 100:410] = 4                 # pelvis
    ct = rng.normal(40, 15, SHAPE).astype(np.int16)
    ct[bones > 0] = 300
    gt = np.zeros(SHAPE, bool)
    pred = np.zeros(SHAPE, bool)
    bone_idx = np.argwhere(bones[::8, ::8, ::8] > 0) * 8
    for i in range(n_lesions):
        cz, cy, cx = bone_idx[rng.integers(len(bone_idx))]
        r = rng.integers(3, 12)
        zs, ys, xs = (slice(max(c - r, 0), min(c + r + 1, d)) for c, d in zip((cz, cy, cx), SHAPE))
        zz, yy, xx = np.ogrid[zs, ys, xs]
        ball = (zz - cz) ** 2 * (2.5 / 0.8) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        gt[zs, ys, xs] |= ball
        if i % 5:                                     # the prediction misses every 5th lesion
            sh = rng.integers(-2, 3, 3)
            pred[zs, ys, xs] |= np.roll(ndimage.binary_dilation(ball), tuple(sh), axis=(0, 1, 2))
    for _ in range(15):                               # small false positives
        c = rng.integers((0, 0, 0), SHAPE)
        pred[c[0]:c[0] + 2, c[1]:c[1] + 3, c[2]:c[2] + 3] = True
    ct[gt] = rng.normal(700, 80, gt.sum())
    return ct, gt, pred, bones


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lesions", type=int, default=30)
    ap.add_argument("--radiomics-lesions", type=int, default=10)
    args = ap.parse_args()
    ct, gt, pred, bones = build(args.lesions)
    geo = Geometry(size=SHAPE[::-1], spacing=SPACING, origin=(0.0, 0.0, 0.0),
                   direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    cfg = AnalysisConfig()
    t0 = time.perf_counter()
    bone_px = bones > 0
    g = _lesion_set(gt, bone_px, bones, geo, cfg)
    t1 = time.perf_counter()
    p = _lesion_set(pred, bone_px, bones, geo, cfg)
    gm, _, pm = match_lesions(g.labels, g.n, p.labels, p.n)
    case_overlap(pred, gt)
    slice_overlap(pred, gt)
    _clinical_counts(g, p, gm, pm, gt.any(axis=(1, 2)), pred.any(axis=(1, 2)))
    t2 = time.perf_counter()
    print(f"case {SHAPE}: {g.n} GT lesions, {p.n} predicted lesions")
    print(f"in-memory analysis (GT lesion set + one model): {t2 - t0:.2f} s (GT lesion set {t1 - t0:.2f} s)")

    with tempfile.TemporaryDirectory() as tmp:
        import SimpleITK as sitk

        root = Path(tmp)
        ds, pr = root / "DATASET", root / "PRED" / "model"
        for sub in ("imagesTr", "labelsTr", "bonesTr"):
            (ds / sub).mkdir(parents=True)
        pr.mkdir(parents=True)

        def write(a: np.ndarray, path: Path) -> None:
            sitk.WriteImage(geo.apply_to(sitk.GetImageFromArray(a)), str(path), useCompression=True)

        write(ct, ds / "imagesTr" / "case_0000.nii.gz")
        write(gt.astype(np.uint8), ds / "labelsTr" / "case.nii.gz")
        write(bones, ds / "bonesTr" / "case.nii.gz")
        write(pred.astype(np.uint8), pr / "case.nii.gz")
        write_dataset_json(ds, 1)
        t3 = time.perf_counter()
        run_analysis(ds, root / "PRED", root / "OUT", cases="all", radiomics=False)
        t4 = time.perf_counter()
        print(f"run_analysis --no-radiomics, 1 case x 1 model, with NIfTI I/O and validation: {t4 - t3:.2f} s")

    from analysis.evaluation.radiomics import RoiTask, crop_roi, extract_roi

    spacing = tuple(float(s) for s in SPACING)
    ids = [i + 1 for i in range(min(args.radiomics_lesions, g.n))]
    tasks = [RoiTask(i, *crop_roi(ct, g.labels, g.table.boxes[i - 1], i), spacing) for i in ids]
    extract_roi(tasks[0])  # warm-up (extractor construction)
    t5 = time.perf_counter()
    for t in tasks:
        extract_roi(t)
    t6 = time.perf_counter()
    vox = [int(g.table.voxels[i - 1]) for i in ids]
    print(f"radiomics: {(t6 - t5) / len(tasks):.2f} s per lesion region (6 classes; {len(tasks)} regions, "
          f"{min(vox)}-{max(vox)} voxels)")


if __name__ == "__main__":
    main()
