"""``st``: Stimulative Training, the MKF authors' earlier method and the control a reviewer
asks for."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor

from mkfkit.depth import DepthSampler
from mkfkit.distill import kd_loss
from mkfkit.models import ResNet

from .run import Run, add_stat, network_shape


def build(run: Run, args: argparse.Namespace, data) -> None:
    run.model = ResNet(**network_shape(args, data)).to(args.device)
    run.sampler = DepthSampler.from_model(run.model, num_groups=1, seed=run.seed + 2)
    run.stages = [list(stage) for stage in run.model.layers()]


def step(run: Run, images: Tensor, labels: Tensor, indices: Tensor, args: argparse.Namespace,
         per_epoch: int) -> Tensor:
    """Stimulative Training: CE on the full network, then KL(full, detached || sub-network) on a
    sub-network that drops a uniform number of trailing blocks per stage; no CE on the
    sub-network, weight 1, temperature 1, no stored knowledge."""
    full_logits = run.train_model(images)
    loss = F.cross_entropy(full_logits, labels)
    loss.backward()
    with run.sampler.apply(run.sampler.draw_trailing(run.stages)):
        kd = kd_loss(run.train_model(images), full_logits.detach(), teacher_kind="logits")
        kd.backward()
    add_stat(run, "ce", loss)
    add_stat(run, "kd", kd)
    add_stat(run, "kd_steps", torch.ones(()))
    return loss + kd
