"""Analysis side of the benchmarks (numpy/scipy only): one JSON line on stdout.

* ``metrics``: the project's per-case clinical analysis (lesion instances with cc3d, sparse
  lesion tables, diffuse fractions, bone identity, lesion matching, overlap, clinical counts:
  the in-memory part of ``analyze``) on a paper-sized case pair from
  :func:`bench_analyze.build`, alternated in rounds with a straightforward scipy baseline
  computing the same quantities: ``scipy.ndimage.label`` and, for every lesion, boolean
  full-volume masks (``labels == i``) for voxels, volume, slice range, bone identity,
  per-slice diffuse fraction and overlap with the other set's lesions.
* ``radiomics``: seconds per lesion region of ``analysis.evaluation.radiomics.extract_all`` with
  ``jobs=1`` and ``jobs=2`` on the same regions, alternated.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_analyze  # noqa: E402  (the case builder of the analysis benchmark)
from bench_analyze import SPACING, build  # noqa: E402

STRUCTURE_26 = np.ones((3, 3, 3), bool)


def _geometry(shape):
    from analysis.imaging.io import Geometry

    return Geometry(size=shape[::-1], spacing=SPACING, origin=(0.0, 0.0, 0.0),
                    direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def project(gt, pred, bones, geo) -> tuple[int, int, int]:
    """The in-memory per-case work of ``analyze`` (as in ``bench_analyze``)."""
    from analysis.evaluation.analyze import AnalysisConfig, _clinical_counts, _lesion_set
    from analysis.evaluation.metrics.overlap import case_overlap, slice_overlap
    from analysis.lesions import match_lesions

    cfg = AnalysisConfig()
    bone_px = bones > 0
    g = _lesion_set(gt, bone_px, bones, geo, cfg)
    p = _lesion_set(pred, bone_px, bones, geo, cfg)
    gm, _, pm = match_lesions(g.labels, g.n, p.labels, p.n)
    case_overlap(pred, gt)
    slice_overlap(pred, gt)
    counts = _clinical_counts(g, p, gm, pm, gt.any(axis=(1, 2)), pred.any(axis=(1, 2)))
    return g.n, p.n, counts[("detection", "lesion")].tp


def baseline(gt, pred, bones, geo) -> tuple[int, int, int]:
    """The same quantities the straightforward way: one full-volume mask per lesion."""
    from analysis.lesions.overlap import dice

    bone_px = bones > 0
    voxel_ml = float(np.prod(geo.spacing)) / 1000.0
    out = []
    for mask, other in ((gt, pred), (pred, gt)):
        labels, n = ndimage.label(mask, structure=STRUCTURE_26)
        other_labels, _ = ndimage.label(other, structure=STRUCTURE_26)
        rows = []
        for i in range(1, n + 1):
            m = labels == i
            zs = np.flatnonzero(m.any(axis=(1, 2)))
            fractions = [(m[z] & bone_px[z]).sum() / max(bone_px[z].sum(), 1) for z in zs]
            bone_votes = np.bincount(bones[m], minlength=8)
            partners = np.unique(other_labels[m])
            rows.append((int(m.sum()) * voxel_ml, zs[0], zs[-1], max(fractions), int(bone_votes[1:].argmax()) + 1,
                         int((partners > 0).sum())))
        out.append((n, rows))
    (ng, grows), (np_, _) = out
    tp = sum(1 for r in grows if r[-1] > 0)
    dice(pred, gt)
    [dice(pred[z], gt[z]) for z in range(gt.shape[0])]  # per slice, one call each
    return ng, np_, tp


def metrics(args) -> None:
    ct, gt, pred, bones = build(args.lesions)
    del ct
    geo = _geometry(gt.shape)
    times: dict[str, list[float]] = {"project_s": [], "scipy_baseline_s": []}
    result = {}
    for _ in range(args.rounds):
        for name, fn in (("project_s", project), ("scipy_baseline_s", baseline)):
            t = time.perf_counter()
            result[name] = fn(gt, pred, bones, geo)
            times[name].append(time.perf_counter() - t)
    print(json.dumps({"metrics": {k: statistics.median(v) for k, v in times.items()},
                      "info": {"shape": list(gt.shape), "lesions_gt_pred_tp": result}}), flush=True)


def radiomics(args) -> None:
    from analysis.evaluation.analyze import AnalysisConfig, _lesion_set
    from analysis.evaluation.radiomics import RoiTask, crop_roi, extract_all, extract_roi

    ct, gt, _, bones = build(args.lesions)
    geo = _geometry(gt.shape)
    g = _lesion_set(gt, bones > 0, bones, geo, AnalysisConfig())
    spacing = tuple(float(s) for s in SPACING)
    ids = list(range(1, min(args.radiomics_lesions, g.n) + 1))
    tasks = [RoiTask(i, *crop_roi(ct, g.labels, g.table.boxes[i - 1], i), spacing) for i in ids]
    del ct, gt, bones
    extract_roi(tasks[0])  # warm-up: extractor construction
    times: dict[str, list[float]] = {"radiomics_jobs1_s_per_lesion": [], "radiomics_jobs2_s_per_lesion": []}
    for _ in range(args.rounds):
        for jobs in (1, 2):
            t = time.perf_counter()
            extract_all(tasks, jobs=jobs)
            times[f"radiomics_jobs{jobs}_s_per_lesion"].append((time.perf_counter() - t) / len(tasks))
    vox = [int(g.table.voxels[i - 1]) for i in ids]
    print(json.dumps({"metrics": {k: statistics.median(v) for k, v in times.items()},
                      "info": {"regions": len(tasks), "voxels_min_max": [min(vox), max(vox)]}}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", required=True, choices=("metrics", "radiomics"))
    p.add_argument("--lesions", type=int, default=30)
    p.add_argument("--radiomics-lesions", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--slices", type=int, default=385, help="slices of the 512 x 512 case (385: paper-sized)")
    args = p.parse_args()
    bench_analyze.SHAPE = (args.slices, 512, 512)  # build() reads it
    {"metrics": metrics, "radiomics": radiomics}[args.case](args)


if __name__ == "__main__":
    main()
