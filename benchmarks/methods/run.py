"""What every method's step works on: :class:`Run`, the state of one training run, and the
small helpers the steps share."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from mkfkit.attention import AttentionTransferLoss
from mkfkit.bank import KnowledgeBank
from mkfkit.depth import DepthSampler
from mkfkit.mixing import CompoundMix


@dataclasses.dataclass
class Run:
    """One method with one seed: every stateful object of the training loop."""

    method: str
    seed: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data_generator: torch.Generator  # epoch permutations and augmentation
    steps: int = 0  # optimiser steps of the whole run (the schedules' length)
    mix: Optional[CompoundMix] = None
    sampler: Optional[DepthSampler] = None
    bank: Optional[KnowledgeBank] = None
    fraction: Any = None
    attention: Optional[AttentionTransferLoss] = None
    teacher: Optional[nn.Module] = None  # multi-branch methods: the ensemble teacher (fusion, gate)
    stages: Optional[List[List[nn.Module]]] = None  # ST: the model's stages of blocks
    # The model and teacher as a training step calls them: under torchrun wrapped in
    # DistributedDataParallel, which averages the gradients over the processes; else themselves.
    train_model: Optional[nn.Module] = None
    train_teacher: Optional[nn.Module] = None
    # loop state
    step: int = 0  # optimiser steps taken
    last_write: Optional[Tensor] = None  # MKF: step of the last write of each knowledge row
    stats: Dict[str, Tensor] = dataclasses.field(default_factory=dict)  # this epoch's sums
    epoch: int = 0
    batch_in_epoch: int = 0
    order: Optional[Tensor] = None  # the current epoch's permutation
    train_seconds: float = 0.0
    loss_sum: Tensor = dataclasses.field(default_factory=lambda: torch.zeros(()))
    history: List[Dict[str, float]] = dataclasses.field(default_factory=list)

    def stateful(self) -> Dict[str, Any]:
        """Every object with a state_dict, by name (None for those this method does not use)."""
        names = ["model", "optimizer", "scheduler", "mix", "sampler", "bank", "attention", "teacher"]
        return {name: getattr(self, name) for name in names}


def add_stat(run: Run, name: str, value: Tensor) -> None:
    """Accumulate a diagnostic of this epoch on the device of ``value``: no host
    synchronisation per step (the sums are read once an epoch, and copied to the host only for
    a checkpoint)."""
    run.stats[name] = run.stats.get(name, 0) + value.detach().float()


def network_shape(args: argparse.Namespace, data) -> Dict[str, Any]:
    """The keyword arguments of one network of the study: the baseline's size."""
    return dict(num_classes=data.num_classes, in_channels=data.in_channels, blocks=args.blocks,
                widths=args.widths)


def warmup_steps(run: Run, fraction: float) -> int:
    """``fraction`` of the run's optimiser steps, rounded."""
    return round(fraction * run.steps)
