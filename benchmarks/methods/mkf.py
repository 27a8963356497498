"""MKF (``mkf-opt2``, ``mkf-qp``) and its ablations (``mkf-nofraction``: the mixed output
updates the dominant image's knowledge as is; ``mkf-nomix``: no compound mixing).

Every step: a compound-mixed batch; the sampled network (the full one, or a depth sub-network
of group t) trains with the mixed cross-entropy plus beta times the distillation from the
stored knowledge of the teaching group (the composite of the two mixed images' rows); its
output, split back per image by the fraction, updates that group's knowledge. The loop and the
teacher are the options of ``train.py`` (``--mkf-loop``, ``--full-teacher``, ...; its module
docstring and docs/METHOD.md).
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch
from torch import Tensor

from mkfkit.bank import KnowledgeBank
from mkfkit.depth import DepthSampler
from mkfkit.distill import kd_loss
from mkfkit.distributed import all_gather_uneven
from mkfkit.fraction import DominantFraction, LinearFraction, QPFraction
from mkfkit.mixing import mixed_cross_entropy
from mkfkit.models import ResNet

from .baseline import compound_mix
from .run import Run, add_stat, network_shape

FRACTIONS = {
    "mkf-opt2": LinearFraction,
    "mkf-qp": QPFraction,
    "mkf-nofraction": DominantFraction,
    "mkf-nomix": LinearFraction,
}


def build(run: Run, args: argparse.Namespace, data) -> None:
    run.model = ResNet(**network_shape(args, data)).to(args.device)
    run.mix = compound_mix(run, args, mix_prob=0.0 if run.method == "mkf-nomix" else 0.5)
    # One seed on every process: every process trains the same sub-network at each step.
    run.sampler = DepthSampler.from_model(run.model, num_groups=args.groups, seed=run.seed + 2)
    # Under torchrun every process folds the rows of all processes into its bank (one
    # all-gather per update), so the banks stay identical; alone the sync does nothing.
    samples = len(data.train_labels)
    run.bank = KnowledgeBank(samples, data.num_classes, args.groups, momentum=args.bank_momentum,
                             device=args.device, sync="all_gather")
    run.fraction = FRACTIONS[run.method]()
    run.last_write = torch.full((args.groups, samples), -1, device=args.device)


def current_beta(run: Run, args: argparse.Namespace, per_epoch: int) -> float:
    if args.beta_ramp == 0:
        return args.beta
    return args.beta * min(1.0, run.step / (args.beta_ramp * per_epoch))


def teacher_group_of(group: int, args: argparse.Namespace) -> Optional[int]:
    """Which group's knowledge teaches ``group`` (None: cross-entropy only)."""
    if group == 0:
        return 0 if args.full_teacher == "self" else None
    return group - 1 if args.knowledge_from == "previous" else 0


def mkf_loss(run: Run, logits: Tensor, batch, group: int, args: argparse.Namespace,
             per_epoch: int) -> Tensor:
    """Mixed CE + beta * KL(composite knowledge of the teaching group || output); then the
    output is split by the fraction and folded into this group's knowledge."""
    loss = mixed_cross_entropy(logits, batch)
    add_stat(run, "ce", loss)
    teacher_group = teacher_group_of(group, args)
    if teacher_group is not None:
        # Read the teacher before this group's update, so it never contains the current output.
        teacher = run.bank.target(teacher_group, batch.index_a, batch.index_b, batch.lam)
        written = run.last_write[teacher_group]
        # Age of the composite knowledge: steps since each side was written, weighted by lam.
        age = run.step - (batch.lam * written[batch.index_a]
                          + (1 - batch.lam) * written[batch.index_b])
        weight = teacher.mask  # rows whose knowledge is not known yet carry no teacher
        if args.max_age:
            weight = weight & (age <= args.max_age)
        kd = kd_loss(logits, teacher.probs, args.temperature, teacher_kind="probs",
                     weight=weight)
        loss = loss + current_beta(run, args, per_epoch) * kd
        add_stat(run, "kd", kd)
        add_stat(run, "kd_steps", torch.ones(()))
        add_stat(run, "age_sum", (age * weight).sum())
        add_stat(run, "age_rows", weight.sum())
    probs = logits.detach().float().softmax(dim=1)
    if batch.op != "none":
        # How far the fraction moves the clean estimates from the stored bases (L1 per row).
        bases = [run.bank.target(group, index) for index in (batch.index_a, batch.index_b)]
        split = run.fraction(probs, bases[0].probs, bases[1].probs, batch.lam)
        known = bases[0].mask & bases[1].mask
        moved = ((split.a - bases[0].probs).abs().sum(1) + (split.b - bases[1].probs).abs().sum(1))
        add_stat(run, "fraction_sum", (moved / 2 * known).sum())
        add_stat(run, "fraction_rows", known.sum())
    run.bank.update(group, probs, batch.index_a, batch.index_b, batch.lam, fraction=run.fraction)
    # The bank took the rows of every process: so does the record of when they were written.
    index_a, index_b, lam = all_gather_uneven([batch.index_a, batch.index_b, batch.lam])
    run.last_write[group, index_a[lam > 0]] = run.step
    run.last_write[group, index_b[lam < 1]] = run.step
    return loss


def step(run: Run, images: Tensor, labels: Tensor, indices: Tensor,
             args: argparse.Namespace, per_epoch: int) -> Tensor:
    batch = run.mix(images, labels, indices)  # unmixed batches come back with lam = 1
    if args.mkf_loop == "cycle":
        with run.sampler.sample() as subnet:  # groups 0, 1, 2, 0, 1, 2, ...
            loss = mkf_loss(run, run.train_model(batch.images), batch, subnet.group, args,
                            per_epoch)
            loss.backward()
        return loss
    # joint: the full network on every step, then a sampled sub-network (group 1 or 2).
    full_loss = mkf_loss(run, run.train_model(batch.images), batch, 0, args, per_epoch)
    full_loss.backward()
    with run.sampler.sample(include_full=False) as subnet:
        sub_loss = mkf_loss(run, run.train_model(batch.images), batch, subnet.group, args,
                            per_epoch)
        sub_loss.backward()
    return full_loss + sub_loss
