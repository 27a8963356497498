"""``dml``: Deep Mutual Learning (Zhang et al., 2018), the peer-learning control of KD-ATFF.

``--branches`` independent networks of the baseline's size, nothing shared. On every step each
trains on the same batch with its cross-entropy plus the mean over the other networks of
``KL(softmax(other's detached logits) || softmax(own logits))``, weight 1 and temperature 1 as
in the DML paper (``--online-temperature`` and ``--theta`` are KD-ATFF's and do not apply).
All networks step together from the same batch. The network deployed is network 0; the ensemble
is the mean of their logits.
"""

from __future__ import annotations

import argparse
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mkfkit.distill import kd_loss
from mkfkit.fusion import branch_disagreement
from mkfkit.models import ResNet

from .run import Run, add_stat, network_shape


class Peers(nn.ModuleList):
    """Independent networks called on the same input: their logits, in order."""

    def forward(self, images: Tensor) -> List[Tensor]:
        return [network(images) for network in self]


def build(run: Run, args: argparse.Namespace, data) -> None:
    run.model = Peers(ResNet(**network_shape(args, data)) for _ in range(args.branches))
    run.model.to(args.device)


def step(run: Run, images: Tensor, labels: Tensor, indices: Tensor, args: argparse.Namespace,
         per_epoch: int) -> Tensor:
    logits = run.train_model(images)
    count = len(logits)
    ce = torch.stack([F.cross_entropy(own, labels) for own in logits])
    kd = torch.stack([
        sum(kd_loss(own, other.detach(), teacher_kind="logits")
            for j, other in enumerate(logits) if j != i) / (count - 1)
        for i, own in enumerate(logits)
    ])
    loss = (ce + kd).sum()
    loss.backward()
    add_stat(run, "ce", ce.mean())
    add_stat(run, "kd", kd.mean())
    add_stat(run, "kd_steps", torch.ones(()))
    disagreement = branch_disagreement(logits)
    add_stat(run, "disagreement_kl", disagreement.kl)
    add_stat(run, "disagreement_top1", disagreement.top1)
    return loss


def outputs(run: Run, images: Tensor) -> Dict[str, Tensor]:
    """Network 0 (``top1``: what is deployed), the mean of the logits and every network."""
    logits = run.model(images)
    result = {"top1": logits[0], "ensemble_top1": torch.stack(logits).mean(0)}
    result.update({f"branch{index}_top1": own for index, own in enumerate(logits)})
    return result


def deployed(run: Run) -> nn.Module:
    return run.model[0]
