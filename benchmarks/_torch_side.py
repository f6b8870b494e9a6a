"""PyTorch side of the benchmarks: one case per process, one JSON line on stdout.

Run by ``benchmarks/run.py`` (never imports TensorFlow). Cases:

* ``train``: images/s of a training step (forward, Dice+BCE loss, backward, Adam) of
  :class:`torch_unet.TorchUNet` on one fixed batch, eager and ``torch.compile``, modes
  alternated in rounds; the machine's matmul peak (float32 2048^2 best of several; on a
  GPU also bfloat16 4096^2) measured in the same process; the parameter count.
* ``nnunet``: seconds of nnU-Net's predictor (:func:`nnunet_bridge.predict.predict_volume`,
  the code path of ``nnunet predict``) on every case of a cohort, with and without
  mirroring, alternated in rounds (predictor set-up excluded, one warm-up slice first).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _emit(metrics: dict, **info) -> None:
    print(json.dumps({"metrics": metrics, "info": info}), flush=True)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of an ``n x n`` matmul over ``repeats`` timed runs."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    inner = 10 if device.type == "cuda" else 1
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t) / inner)
    return 2 * n ** 3 / best


def train(args) -> None:
    import torch
    from torch_unet import TorchUNet, dice_bce_loss, keras_style_param_count

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1000, 1500, (args.batch, 1, args.size, args.size)).astype(np.float32)).to(device)
    y = torch.from_numpy((rng.uniform(size=(args.batch, 1, args.size, args.size)) > 0.9).astype(np.float32)).to(device)
    wanted = args.modes.split(",")
    steps, info = {}, {}
    for name in wanted:
        model = TorchUNet().to(device).train()
        if name.endswith("channels_last"):
            model = model.to(memory_format=torch.channels_last)
        info["params"] = keras_style_param_count(model)
        info["trainable_params"] = sum(p.numel() for p in model.parameters())
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        amp = name.endswith("_amp")
        fwd = torch.compile(model) if name.startswith("torch_compile") else model

        def step(fwd=fwd, opt=opt, amp=amp):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = dice_bce_loss(fwd(x), y)
            loss.backward()
            opt.step()
            return loss

        t = time.perf_counter()
        for _ in range(2):
            step()
        _sync(device)
        info[f"{name}_warmup_s"] = round(time.perf_counter() - t, 2)
        steps[name] = step
    rates: dict[str, list[float]] = {n: [] for n in wanted}
    peaks = []
    for _ in range(args.rounds):
        for name in wanted:
            t = time.perf_counter()
            for _ in range(args.steps):
                loss = steps[name]()
            _sync(device)
            rates[name].append(args.steps * args.batch / (time.perf_counter() - t))
            info[f"{name}_loss"] = round(float(loss.detach()), 4)
        peaks.append(matmul_peak(device, torch.float32, 2048))
    metrics = {f"{n}_img_s": statistics.median(r) for n, r in rates.items()}
    metrics["matmul_f32_flops"] = max(peaks)
    if device.type == "cuda":
        metrics["matmul_bf16_flops"] = matmul_peak(device, torch.bfloat16, 4096)
    _emit(metrics, size=args.size, batch=args.batch, device=device.type, torch=torch.__version__,
          threads=torch.get_num_threads(), **info)


def nnunet(args) -> None:
    import torch

    from analysis.cohort.layout import Cohort
    from analysis.imaging.io import read_array
    from analysis.imaging.orientation import Reorientation
    from analysis.prediction.runner import Network, segment_canonical
    from nnunet_bridge.device import resolve_device
    from nnunet_bridge.env import WorkLayout, nnunet_environment
    from nnunet_bridge.predict import lesion_probability

    def predict_volume(p, ct, geo, crop=False):
        reo = Reorientation.of(geo)
        net = Network("nnunet", "", segment=lambda v, z, s: lesion_probability(p, v[z], s), crop=crop)
        return segment_canonical(net, reo.forward(ct.astype("float32")), reo.canonical_spacing_zyx)[0]

    cohort = Cohort(args.dataset)
    volumes = [read_array(cohort.image_path(c)) for c in cohort.cases()]
    layout = WorkLayout(args.work)
    device = resolve_device("auto")
    times: dict[str, list[float]] = {"nnunet_nomirror_s": [], "nnunet_mirror_s": [], "nnunet_crop_nomirror_s": []}
    with nnunet_environment(layout.work):
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        predictors = {}
        for name, mirror in (("nnunet_nomirror_s", False), ("nnunet_mirror_s", True)):
            p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror,
                                perform_everything_on_device=device.type == "cuda", device=device,
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
            p.initialize_from_trained_model_folder(str(layout.model_folder), use_folds=(0,))
            ct, geo = volumes[0]
            lesion_probability(p, ct[:1].astype("float32"), tuple(reversed(geo.spacing)))  # warm-up
            predictors[name] = p
        plans = json.loads((layout.model_folder / "plans.json").read_text(encoding="utf-8"))
        conf = plans["configurations"]["2d"]
        for _ in range(args.rounds):
            for name, p in predictors.items():
                t = time.perf_counter()
                for ct, geo in volumes:
                    predict_volume(p, ct, geo)
                times[name].append(time.perf_counter() - t)
            t = time.perf_counter()  # the body crop of `nnunet predict` (default on)
            for ct, geo in volumes:
                predict_volume(predictors["nnunet_nomirror_s"], ct, geo, crop=True)
            times["nnunet_crop_nomirror_s"].append(time.perf_counter() - t)
        flops = slice_flops(predictors["nnunet_nomirror_s"], volumes[0])
    params = sum(x.numel() for x in predictors["nnunet_mirror_s"].network.parameters())
    metrics = {k: statistics.median(v) for k, v in times.items()}
    metrics.update(nnunet_flops_per_slice=flops, matmul_f32_flops=matmul_peak(device, torch.float32, 2048))
    _emit(metrics, device=device.type, torch=torch.__version__,
          patch_size=conf.get("patch_size"), params=params, slices=int(sum(v[0].shape[0] for v in volumes)))


def slice_flops(predictor, volume) -> int:
    """Convolution FLOPs (2 per multiply-add) of one whole slice through nnU-Net's sliding window
    without mirroring, counted by forward hooks on the network's convolutions while it predicts."""
    import torch

    from nnunet_bridge.predict import lesion_probability

    total = 0

    def hook(module, inputs, output):
        nonlocal total
        k = 1
        for s in module.kernel_size:
            k *= s
        if isinstance(module, torch.nn.ConvTranspose2d):  # each input pixel writes a k x Cout patch
            total += 2 * inputs[0].numel() // inputs[0].shape[0] * module.out_channels * k // module.groups
        else:
            total += 2 * output.numel() // output.shape[0] * (module.in_channels // module.groups) * k
    handles = [m.register_forward_hook(hook) for m in predictor.network.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    try:
        ct, geo = volume
        lesion_probability(predictor, ct[:1].astype("float32"), tuple(reversed(geo.spacing)))
    finally:
        for h in handles:
            h.remove()
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", required=True, choices=("train", "nnunet"))
    p.add_argument("--dataset")
    p.add_argument("--work")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modes", default="torch_eager,torch_compile")
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    {"train": train, "nnunet": nnunet}[args.case](args)


if __name__ == "__main__":
    main()
