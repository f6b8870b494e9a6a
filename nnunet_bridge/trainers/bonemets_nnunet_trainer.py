"""``nnUNetTrainerBonemets``: nnU-Net's default trainer with its schedule as options.

Hyperparameters are options, not a family of subclasses: the number of epochs, training
iterations per epoch and validation iterations per epoch come from the JSON object in the
environment variable ``BONEMETS_NNUNET_SCHEDULE``, which
:func:`nnunet_bridge.env.nnunet_environment` sets for the duration of a training run (and
which spawned DDP workers inherit). Keys that are absent keep nnU-Net's defaults
(1000 epochs of 250 iterations, 50 validation iterations). Everything else (network,
loss, augmentation, learning rate) is nnU-Net's unchanged ``nnUNetTrainer``.

This module is imported by nnU-Net as a top-level module from ``nnUNet_extTrainer``: it
imports nothing from the project.
"""
from __future__ import annotations

import json
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

SCHEDULE_ENV = "BONEMETS_NNUNET_SCHEDULE"
SCHEDULE_KEYS = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch")


class nnUNetTrainerBonemets(nnUNetTrainer):
    """nnUNetTrainer whose epochs and iterations per epoch are read from ``BONEMETS_NNUNET_SCHEDULE``."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        schedule = json.loads(os.environ.get(SCHEDULE_ENV) or "{}")
        unknown = sorted(set(schedule) - set(SCHEDULE_KEYS))
        if unknown:
            raise ValueError(f"{SCHEDULE_ENV}: unknown key(s) {unknown}; expected {list(SCHEDULE_KEYS)}")
        for key, value in schedule.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{SCHEDULE_ENV}: {key} must be a positive integer, found {value!r}")
            setattr(self, key, value)
        # A checkpoint every 50 epochs (nnU-Net's default) never happens in short runs;
        # keep a resumable checkpoint_latest.pth at least every tenth of the run.
        self.save_every = max(1, min(self.save_every, self.num_epochs // 10 or 1))
