"""A scaled nnU-Net plan, derived from nnU-Net's own plan for the same data and stated as such.

nnU-Net plans the 2d configuration from the dataset's fingerprint (``nnUNetPlans.json``: a
``PlainConvUNet`` whose features per stage are ``min(512, 32 * 2**i)``, a patch of the median
slice size and the batch that fits 8 GB of GPU memory). On a CPU that network takes ~12 s per
iteration of its 36 slices of 128^2 here; the Keras segmenters of the demo run at width 0.25 on
batches of 16 crops of 64^2. :func:`scaled_plans` derives the plan that matches them from
nnU-Net's, changing only what :class:`PlanScale` names:

* ``width``: every stage's features times the multiplier, rounded, at least
  :data:`MIN_FEATURES` (as the Keras ``--width``, :func:`bonemets_tf.models.common.scaled`);
* ``patch_size``: the 2D patch; the network's topology (stages, strides, kernel sizes) for it
  comes from nnU-Net's own planner function
  (``nnunetv2.experiment_planning.experiment_planners.network_topology.get_pool_and_conv_props``
  with the planner's minimum feature-map edge of 4), the features per stage from the planner's rule
  ``min(512, base * 2**i)`` with nnU-Net's ``base`` (then times ``width``); the sliding window
  at prediction uses this patch;
* ``batch_size``: the batch.

Everything else (spacing, normalisation, resampling, so the preprocessed data: the scaled plan
keeps nnU-Net's ``data_identifier`` and reads the same ``nnUNetPlans_2d`` folder; the trainer,
augmentation, deep-supervision loss, poly learning rate, mirroring) stays nnU-Net's. The scaled
plan is written beside ``nnUNetPlans.json`` under its own identifier (e.g.
``nnUNetPlans_w0.25_b16_p64x64``), never replacing nnU-Net's.
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.errors import InputError
from analysis.imaging.io import atomic_write_text, read_json
from nnunet_bridge.env import PLANS as NNUNET_PLANS

log = logging.getLogger(__name__)

#: Fewest features a scaled stage keeps (an InstanceNorm over 1-3 channels normalises little).
MIN_FEATURES = 4
#: nnU-Net's cap on 2D features per stage (``ExperimentPlanner.UNet_max_features_2d``).
MAX_FEATURES_2D = 512
#: nnU-Net's smallest bottleneck edge (``ExperimentPlanner.UNet_featuremap_min_edge_length``).
MIN_FEATURE_MAP_EDGE = 4


@dataclass(frozen=True)
class PlanScale:
    """How a plan departs from nnU-Net's; None keeps nnU-Net's value.

    Attributes:
        width: feature-width multiplier (> 0).
        batch_size: patches per training iteration (>= 1).
        patch_size: 2D patch ``(rows, cols)`` in voxels.
    """

    width: float | None = None
    batch_size: int | None = None
    patch_size: tuple[int, int] | None = None

    @property
    def is_default(self) -> bool:
        """True when nothing departs from nnU-Net's plan."""
        return self.width is None and self.batch_size is None and self.patch_size is None

    def identifier(self) -> str:
        """The plans identifier: ``nnUNetPlans`` for nnU-Net's own, else e.g. ``nnUNetPlans_w0.25_b16_p64x64``.

        >>> PlanScale(width=0.25, batch_size=16, patch_size=(64, 64)).identifier()
        'nnUNetPlans_w0.25_b16_p64x64'
        >>> PlanScale(width=1.0).identifier(), PlanScale().identifier()
        ('nnUNetPlans_w1', 'nnUNetPlans')
        """
        parts = []
        if self.width is not None:
            parts.append(f"w{self.width:g}")
        if self.batch_size is not None:
            parts.append(f"b{self.batch_size}")
        if self.patch_size is not None:
            parts.append("p" + "x".join(str(int(s)) for s in self.patch_size))
        return "_".join([NNUNET_PLANS, *parts])

    def check(self) -> None:
        """Raise InputError naming the option when a value is out of range."""
        if self.width is not None and not self.width > 0:
            raise InputError(f"--width {self.width:g}: expected a multiplier > 0")
        if self.batch_size is not None and self.batch_size < 1:
            raise InputError(f"--batch-size {self.batch_size}: expected a positive integer")
        if self.patch_size is not None and (len(self.patch_size) != 2 or min(self.patch_size) < 1):
            raise InputError(f"--patch-size {','.join(map(str, self.patch_size))}: expected two positive "
                             f"integers ROWS,COLS (the 2d configuration's patch)")


def scaled_features(features: list[int], width: float) -> list[int]:
    """Features per stage times ``width``, rounded, at least :data:`MIN_FEATURES`.

    >>> scaled_features([32, 64, 128, 256, 512, 512], 0.25)
    [8, 16, 32, 64, 128, 128]
    >>> scaled_features([32, 64], 0.05)
    [4, 4]
    """
    return [max(MIN_FEATURES, int(round(f * width))) for f in features]


def scaled_plans(plans: dict[str, Any], scale: PlanScale, configuration: str = "2d") -> dict[str, Any]:
    """The plans of ``scale`` derived from nnU-Net's ``plans`` (which are not modified).

    Only ``configuration`` is kept (the scaled plan defines only what it scales); its
    ``data_identifier`` stays nnU-Net's, so training reads nnU-Net's preprocessed data.

    Args:
        plans: nnU-Net's plans (``nnUNetPlans.json``), a ``PlainConvUNet`` 2D configuration.
        scale: what to change; :attr:`PlanScale.is_default` returns a copy of ``plans``.
        configuration: the configuration to scale.

    Returns:
        New plans with ``plans_name`` set to :meth:`PlanScale.identifier`.

    Raises:
        InputError: a scale out of range, or a patch size nnU-Net's topology would pad (the
            message names the nearest sizes it accepts).
    """
    scale.check()
    out = copy.deepcopy(plans)
    if scale.is_default:
        return out
    config = out["configurations"][configuration]
    arch = config["architecture"]["arch_kwargs"]
    if len(config["patch_size"]) != 2:
        raise InputError(f"--patch-size: the {configuration} configuration's patch has {len(config['patch_size'])} "
                         f"axes; scaling supports 2D plans only")
    features = list(arch["features_per_stage"])
    if scale.patch_size is not None:
        topology = _topology(config["spacing"], scale.patch_size)
        n = len(topology["strides"])
        features = [min(MAX_FEATURES_2D, features[0] * 2 ** i) for i in range(n)]
        enc, dec = list(arch["n_conv_per_stage"]), list(arch["n_conv_per_stage_decoder"])
        arch.update(n_stages=n, kernel_sizes=topology["kernel_sizes"], strides=topology["strides"],
                    n_conv_per_stage=(enc + enc[-1:] * n)[:n], n_conv_per_stage_decoder=(dec + dec[-1:] * n)[:n - 1])
        config["patch_size"] = list(topology["patch_size"])
    if scale.width is not None:
        features = scaled_features(features, scale.width)
    arch["features_per_stage"] = features
    if scale.batch_size is not None:
        config["batch_size"] = int(scale.batch_size)
    out["configurations"] = {configuration: config}
    out["plans_name"] = scale.identifier()
    return out


def _topology(spacing: list[float], patch_size: tuple[int, int]) -> dict[str, Any]:
    """nnU-Net's planner's pooling and kernel sizes for ``patch_size``; refuse a size it would pad."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    _, strides, kernels, padded, divisor = get_pool_and_conv_props(list(spacing), list(patch_size),
                                                                   MIN_FEATURE_MAP_EDGE, 999999)
    if tuple(int(s) for s in padded) != tuple(int(s) for s in patch_size):
        d = [int(v) for v in divisor]
        lower = [max(dd, (s // dd) * dd) for s, dd in zip(patch_size, d)]
        raise InputError(f"--patch-size {','.join(map(str, patch_size))}: nnU-Net's topology for it pools "
                         f"{'x'.join(map(str, d))} times, so each side must be a multiple of that "
                         f"(e.g. {','.join(map(str, lower))} or {','.join(map(str, (int(p) for p in padded)))})")
    return {"strides": [list(s) for s in strides], "kernel_sizes": [list(k) for k in kernels],
            "patch_size": [int(p) for p in padded]}


def write_scaled_plans(preprocessed_dataset: Path, scale: PlanScale, configuration: str = "2d") -> str:
    """Write the scaled plans ``<identifier>.json`` beside nnU-Net's ``nnUNetPlans.json`` (unchanged).

    The file is rewritten (atomically) only when its content changes, so processes training
    folds in parallel may all call this.

    Args:
        preprocessed_dataset: ``WORK/nnUNet_preprocessed/DatasetXXX_Name`` holding nnU-Net's plans.
        scale: the scale; nnU-Net's own plan writes nothing.
        configuration: the configuration to scale.

    Returns:
        The plans identifier to train with.
    """
    identifier = scale.identifier()
    if scale.is_default:
        return identifier
    source = preprocessed_dataset / f"{NNUNET_PLANS}.json"
    plans = scaled_plans(read_json(source, what="nnU-Net plans"), scale, configuration)
    target = preprocessed_dataset / f"{identifier}.json"
    text = json.dumps(plans, indent=4, sort_keys=False) + "\n"
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        atomic_write_text(target, text)
        arch = plans["configurations"][configuration]["architecture"]["arch_kwargs"]
        log.info("wrote the scaled plan %s: features per stage %s, patch %s, batch %d (from %s)", identifier,
                 arch["features_per_stage"], plans["configurations"][configuration]["patch_size"],
                 plans["configurations"][configuration]["batch_size"], source.name)
    return identifier


def plan_summary(plans: dict[str, Any], configuration: str = "2d") -> dict[str, Any]:
    """What a plan trains: identifier, features per stage, patch and batch, and the in-plane pixel
    spacing ``(x, y)`` mm its preprocessing resamples every slice to (for the records; nnU-Net
    stores a 2d configuration's ``spacing`` in array order, ``(rows, cols)`` = ``(y, x)``)."""
    config = plans["configurations"][configuration]
    spacing = config.get("spacing")
    return {"plans": plans["plans_name"],
            "features_per_stage": list(config["architecture"]["arch_kwargs"]["features_per_stage"]),
            "patch_size": list(config["patch_size"]), "batch_size": int(config["batch_size"]),
            "spacing_xy_mm": None if not spacing else [float(v) for v in reversed(spacing[-2:])]}
