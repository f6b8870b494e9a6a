"""Does the body crop give the whole-slice result? Masks and probabilities of Keras segmenters
run three ways on the same CT, side by side in one process:

* ``whole``: whole slices (the reference, the default of ``predict``);
* ``legacy``: the crop before issue #23: the body box per slab, centred and padded to the
  network's stride, no context beyond it (its first row and column fall anywhere on the
  stride grid, and the network's zero padding sits at the box's edge);
* ``exact``: the crop of :func:`analysis.prediction.runner.context_window`: the box plus the
  network's receptive radius (:func:`bonemets_tf.inference.receptive_radius`) of real
  context, on the whole slice's stride grid.

For each: Dice of the masks at the threshold against ``whole`` (over the volume), the largest
probability difference over the volume and inside the part the crop keeps, the share of slice
pixels the network computed, and seconds. Inputs: the test cases of a cohort (``--dataset``),
optionally each also placed off-centre in a wider field of view of air (``--wide``).

    python benchmarks/crop_agreement.py --runs RUN [RUN ...] --dataset DS [--cases test] [--wide]
        [--slices N] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.cohort.layout import Cohort  # noqa: E402
from analysis.lesions.overlap import dice  # noqa: E402
from analysis.imaging.io import read_array  # noqa: E402
from analysis.imaging.orientation import Reorientation  # noqa: E402
from analysis.prediction.runner import SLAB, BODY_MARGIN_MM, Network, segment_canonical  # noqa: E402


def legacy_segment(net: Network, ct: np.ndarray, spacing_zyx) -> tuple[np.ndarray, np.ndarray]:
    """The crop as it was before issue #23 (analysis.runner at b602401): per-slab body boxes
    centred and padded to the stride, the network run on the box alone."""
    from analysis.imaging.body import slab_boxes

    prob = np.zeros(ct.shape, np.float32)
    seen = np.zeros(ct.shape, bool)
    todo = np.arange(ct.shape[0])
    for zs, rows, cols in slab_boxes(ct, SLAB, margin_mm=BODY_MARGIN_MM,
                                     spacing_xy=(spacing_zyx[2], spacing_zyx[1]), stride=net.stride):
        z = todo[(todo >= zs.start) & (todo < zs.stop)]
        if z.size:
            prob[z, rows, cols] = net.segment(ct[:, rows, cols], z, spacing_zyx)
            seen[z, rows, cols] = True
    return prob, seen


def widen(ct: np.ndarray, rows: int = 77, cols: int = 133) -> np.ndarray:
    """The CT off-centre in a wider field of view of air: ``rows`` above and ``cols`` to the left
    (odd, so the body box starts at an odd row and column), a third of that below and right."""
    out = np.full((ct.shape[0], ct.shape[1] + rows + rows // 3, ct.shape[2] + cols + cols // 3), -1000, ct.dtype)
    out[:, rows:rows + ct.shape[1], cols:cols + ct.shape[2]] = ct
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--cases", default="test")
    parser.add_argument("--wide", action="store_true", help="also each case off-centre in a wider field of view")
    parser.add_argument("--slices", type=int, default=0, help="only the middle N slices of each case (0: all)")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from bonemets_tf.inference import Predictor, crop_context, receptive_radius, slice_probabilities
    from bonemets_tf.run import read_run

    cohort = Cohort(args.dataset)
    cases = []
    for case in cohort.select(args.cases):
        ct, geometry = read_array(cohort.image_path(case))
        reo = Reorientation.of(geometry)
        canon = np.ascontiguousarray(reo.forward(ct)).astype(np.float32)
        if args.slices:
            mid = canon.shape[0] // 2
            canon = canon[max(0, mid - args.slices // 2): mid - args.slices // 2 + args.slices]
        cases.append((case, canon, reo.canonical_spacing_zyx))
        if args.wide:
            cases.append((f"{case}_wide", widen(canon), reo.canonical_spacing_zyx))
    rows = []
    for path in args.runs:
        run = read_run(path)
        predictor = Predictor(run)
        predictor.warm_up()
        context = crop_context(predictor)
        segment = (lambda p: lambda v, z, _: slice_probabilities(p, v, z, args.batch))(predictor)
        for name, ct, spacing in cases:
            result = {"model": run.arch, "case": name, "shape": list(ct.shape), "stride": run.stride,
                      "receptive_radius_px": receptive_radius(predictor.model), "context_px": context}
            t = time.perf_counter()
            whole, _, _ = segment_canonical(Network(run.arch, "", segment=segment, crop=False), ct, spacing)
            result["whole_s"] = round(time.perf_counter() - t, 3)
            ref = whole >= args.threshold
            variants = {"legacy": None, "exact": Network(run.arch, "", segment=segment, stride=run.stride, crop=True,
                                                         context=context)}
            for variant, net in variants.items():
                t = time.perf_counter()
                if net is None:
                    prob, seen = legacy_segment(Network(run.arch, "", segment=segment, stride=run.stride), ct, spacing)
                    fraction = float(seen.mean())
                else:
                    prob, seen, info = segment_canonical(net, ct, spacing, threshold=args.threshold)
                    fraction = info["pixel_fraction"]
                result[f"{variant}_s"] = round(time.perf_counter() - t, 3)
                result[f"{variant}_dice"] = round(dice((prob >= args.threshold) & seen, ref), 6)
                result[f"{variant}_max_diff"] = round(float(np.abs(prob - whole).max()), 6)
                result[f"{variant}_max_diff_kept"] = round(float(np.abs(prob - whole)[seen].max()), 6) if seen.any() else 0.0
                result[f"{variant}_pixel_fraction"] = round(fraction, 4)
            rows.append(result)
            print(json.dumps(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return {"rows": rows}


if __name__ == "__main__":
    main()
