"""``baseline``: cross-entropy on the network. ``mix-only``: the same on compound-mixed batches
(Mixup or CutMix, :class:`~mkfkit.mixing.CompoundMix`) with the mixed cross-entropy, the part
of MKF that needs no knowledge bank."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor

from mkfkit.mixing import CompoundMix, mixed_cross_entropy
from mkfkit.models import ResNet

from .run import Run, network_shape, warmup_steps


def compound_mix(run: Run, args: argparse.Namespace, mix_prob: float = 0.5) -> CompoundMix:
    """The mixer of every mixing method: after ``--warmup`` of the steps unmixed, Mixup or
    CutMix with probability ``mix_prob``. One seed on every process: all mix their batches
    alike and the mixer's state stays the same everywhere, which the first process's checkpoint
    relies on."""
    return CompoundMix(mix_prob=mix_prob, warmup_steps=warmup_steps(run, args.warmup),
                       generator=torch.Generator().manual_seed(run.seed + 1))


def build(run: Run, args: argparse.Namespace, data) -> None:
    run.model = ResNet(**network_shape(args, data)).to(args.device)
    if run.method == "mix-only":
        run.mix = compound_mix(run, args)


def step(run: Run, images: Tensor, labels: Tensor, indices: Tensor, args: argparse.Namespace,
         per_epoch: int) -> Tensor:
    if run.mix is None:
        loss = F.cross_entropy(run.train_model(images), labels)
    else:
        batch = run.mix(images, labels, indices)
        loss = mixed_cross_entropy(run.train_model(batch.images), batch)
    loss.backward()
    return loss
