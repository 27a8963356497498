"""KD-ATFF and the methods it is measured against, on one multi-branch network.

Every method here trains :class:`~mkfkit.models.MultiBranchResNet`: ``--branches`` copies of the
upper stages on shared lower ones (``--shared-stages``), each branch on its own the size of the
baseline network. They differ in the ensemble teacher the branches distil from, in the attention
transfer and in the mixing:

=================== =============================== =========== ========
method              ensemble teacher                attention   mixing
=================== =============================== =========== ========
``kdatff``          feature fusion (KD-ATFF)        yes         no
``kdatff-noat``     feature fusion                  no          no
``kdatff-nofusion`` ONE's gate                      yes         no
``one``             ONE's gate (ONE, Lan 2018)      no          no
``multibranch``     none: CE on each branch only    no          no
``kdatff-mix``      feature fusion                  yes         yes
=================== =============================== =========== ========

With a teacher, the loss is :func:`~mkfkit.fusion.online_distillation_loss`: the cross-entropy
of every branch and of the teacher, plus ``--theta`` times each branch's KL to the detached,
softened teacher (``--online-temperature``) plus ``--attention-weight`` times the attention
transfer between consecutive blocks of each branch (summed over the branches, ramped in over
``--attention-warmup`` of the steps). ``kdatff-noat`` and ``kdatff-nofusion`` are the paper's
Table 2 ablations; ``multibranch`` separates the branches' capacity from the distillation;
``kdatff-mix`` adds compound mixing (the mixed targets in every cross-entropy), not in the paper.

The network deployed is branch 0 alone (:meth:`~mkfkit.models.MultiBranchResNet.branch`, the
baseline's size); the ensemble is every branch with the teacher (the mean of the branch logits
for ``multibranch``).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mkfkit.attention import AttentionTransferLoss
from mkfkit.fusion import (
    BranchGate, FeatureFusionTeacher, branch_disagreement, online_distillation_loss,
)
from mkfkit.models import BranchOutput, MultiBranchResNet

from .baseline import compound_mix
from .run import Run, add_stat, network_shape, warmup_steps


@dataclasses.dataclass(frozen=True)
class Variant:
    teacher: Optional[str]  # "fusion", "gate", or None: no teacher, no distillation
    attention: bool
    mix: bool


VARIANTS = {
    "kdatff": Variant("fusion", attention=True, mix=False),
    "kdatff-noat": Variant("fusion", attention=False, mix=False),
    "kdatff-nofusion": Variant("gate", attention=True, mix=False),
    "one": Variant("gate", attention=False, mix=False),
    "multibranch": Variant(None, attention=False, mix=False),
    "kdatff-mix": Variant("fusion", attention=True, mix=True),
}


def build(run: Run, args: argparse.Namespace, data) -> None:
    variant = VARIANTS[run.method]
    model = MultiBranchResNet(num_branches=args.branches, shared_stages=args.shared_stages,
                              **network_shape(args, data)).to(args.device)
    run.model = model
    if variant.teacher == "fusion":
        run.teacher = FeatureFusionTeacher(model.feature_channels, args.branches).to(args.device)
    elif variant.teacher == "gate":
        run.teacher = BranchGate(model.shared_channels, args.branches).to(args.device)
    if variant.attention:
        run.attention = AttentionTransferLoss(
            warmup_steps=warmup_steps(run, args.attention_warmup))
    if variant.mix:
        run.mix = compound_mix(run, args)


def ensemble(run: Run, teacher: Optional[nn.Module], out: BranchOutput) -> Tensor:
    """The ensemble's logits: the ``teacher``'s weighted sum of the branch logits (the fusion
    block reads the branches' last-block maps, ONE's gate the shared maps), or their mean."""
    kind = VARIANTS[run.method].teacher
    if kind == "fusion":
        return teacher([features[-1] for features in out.features], out.logits)[0]
    if kind == "gate":
        return teacher(out.shared, out.logits)[0]
    return torch.stack(out.logits).mean(0)


def step(run: Run, images: Tensor, labels: Tensor, indices: Tensor, args: argparse.Namespace,
         per_epoch: int) -> Tensor:
    targets = labels
    if run.mix is not None:
        batch = run.mix(images, labels, indices)
        images, targets = batch.images, batch.soft_targets(run.model.num_classes)
    out = run.train_model(images)
    if run.teacher is None:  # multibranch: every branch with its cross-entropy, nothing else
        branch_ce = torch.stack([F.cross_entropy(logits, targets) for logits in out.logits])
        loss = branch_ce.sum()
    else:
        attention = None
        if run.attention is not None:
            attention = sum(run.attention(features) for features in out.features)
        parts = online_distillation_loss(
            out.logits, ensemble(run, run.train_teacher, out), targets,
            temperature=args.online_temperature, theta=args.theta, beta=args.attention_weight,
            attention_loss=attention)
        loss, branch_ce = parts.total, parts.branch_ce
        add_stat(run, "kd", parts.kd.mean())
        add_stat(run, "kd_steps", torch.ones(()))
        add_stat(run, "teacher_ce", parts.teacher_ce)
        if attention is not None:
            add_stat(run, "attention", parts.attention)
    loss.backward()  # also advances the attention loss's warm-up ramp
    add_stat(run, "ce", branch_ce.mean())
    disagreement = branch_disagreement(out.logits)
    add_stat(run, "disagreement_kl", disagreement.kl)
    add_stat(run, "disagreement_top1", disagreement.top1)
    return loss


def outputs(run: Run, images: Tensor) -> Dict[str, Tensor]:
    """Branch 0 (``top1``: what is deployed), the ensemble and every branch, for evaluation."""
    out = run.model(images)
    logits = {"top1": out.logits[0], "ensemble_top1": ensemble(run, run.teacher, out)}
    logits.update({f"branch{index}_top1": branch for index, branch in enumerate(out.logits)})
    return logits


def deployed(run: Run) -> nn.Module:
    return run.model.branch(0)
