r"""KD-ATFF's feature-fusion teacher and its online distillation loss.

``n`` branches share low layers. The fusion block turns the branches' last-block features into
one importance weight per branch and sample; the teacher logits are the weighted sum of the
branch logits (KD-ATFF eq. 4):

.. math::
    w = \mathrm{softmax}\big(f([F_1, \dots, F_n])\big), \qquad z_e = \sum_{a=1}^{n} w_a z_a .
"""

from __future__ import annotations

import itertools
import numbers
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mkfkit._checks import (
    check_floating,
    check_distribution_rows,
    check_in_range,
    check_index,
    check_positive_int,
    check_same_device,
    check_shape,
    check_tensor_list,
    describe,
)
from mkfkit._dtypes import compute_dtype
from mkfkit.distill import batch_mean, check_classes, check_temperature, kd_loss

__all__ = [
    "FeatureFusionTeacher",
    "BranchGate",
    "BranchDisagreement",
    "branch_disagreement",
    "OnlineDistillationLoss",
    "online_distillation_loss",
]


def _check_logits_list(logits: Sequence[Tensor], name: str, count: Optional[int] = None) -> Tensor:
    """Validate a list of Tensor[B, K] (``K >= 1``) and return them stacked as Tensor[n, B, K]."""
    checked = check_tensor_list(logits, name, "Tensor[B, K]", 2, count=count, same="shape")
    check_classes(checked[0], f"{name}[0]")
    return torch.stack(checked)


def _weighted_branches(scores: Tensor, stacked: Tensor) -> tuple[Tensor, Tensor]:
    """The ensemble teacher of both teachers: ``w = softmax(scores)`` over the branches and
    ``z_e = sum_a w_a z_a`` from Tensor[B, n] scores and Tensor[n, B, K] branch logits, in
    float32 (float64 for float64 inputs) with autocast off: the weights must sum to 1 to the
    precision of the logits they mix."""
    dtype = compute_dtype(scores, stacked)
    with torch.autocast(scores.device.type, enabled=False):
        weights = scores.to(dtype).softmax(dim=1)
        teacher = torch.einsum("bn,nbk->bk", weights, stacked.to(dtype))
    return teacher, weights


class FeatureFusionTeacher(nn.Module):
    r"""Central fusion block that weights the branches into an ensemble teacher (KD-ATFF 1.2).

    ``forward(features, logits)``: the branches' last-block maps are concatenated along channels
    and passed through ``num_layers`` x (``kernel_size`` conv, BatchNorm, ReLU), global average
    pooling and a linear layer to one score per branch; a softmax over branches gives the weights
    ``w`` and the teacher logits are :math:`z_e = \sum_a w_a z_a`. Works for any spatial size
    (the pooling is adaptive).

    Gradient routing (explicit, both default ``False`` = the paper's end-to-end training): with
    ``detach_features=True`` the teacher's loss trains the fusion block only and does not reach
    the branches through their features; with ``detach_logits=True`` it does not reach them
    through their logits either. The weights themselves always get gradients (through
    ``z_a``), so the fusion block learns from the teacher's cross-entropy.

    The softmax and the weighted sum run in float32 (float64 for a float64 module) with autocast
    off; the convolutions follow autocast like any layer.

    Args:
        in_channels: channels of each branch's map: one int (all branches alike) or one per branch.
        num_branches: number of branches ``n >= 2``.
        num_layers: conv-BN-ReLU layers of the central block (``>= 0``).
        hidden_channels: width of those layers (default: ``sum(in_channels) // n``, one
            branch's width).
        kernel_size: odd kernel size of the convolutions (padding keeps the spatial size).
        detach_features: stop the teacher's gradients into the branch features.
        detach_logits: stop the teacher's gradients into the branch logits.

    Shapes:
        features: list of ``n`` Tensor[B, C_a, H, W] (same B, H, W); logits: list of ``n``
        Tensor[B, K]. Returns ``(teacher_logits, weights)``: Tensor[B, K] and Tensor[B, n]
        (rows sum to 1).

    Example:
        >>> fusion = FeatureFusionTeacher(in_channels=64, num_branches=2)
        >>> features = [torch.randn(8, 64, 8, 8), torch.randn(8, 64, 8, 8)]
        >>> logits = [torch.randn(8, 100), torch.randn(8, 100)]
        >>> teacher, weights = fusion(features, logits)
        >>> teacher.shape, weights.shape, bool(torch.allclose(weights.sum(1), torch.ones(8)))
        (torch.Size([8, 100]), torch.Size([8, 2]), True)
    """

    def __init__(
        self,
        in_channels: Union[int, Sequence[int]],
        num_branches: int,
        *,
        num_layers: int = 2,
        hidden_channels: Optional[int] = None,
        kernel_size: int = 3,
        detach_features: bool = False,
        detach_logits: bool = False,
    ) -> None:
        super().__init__()
        self.num_branches = check_positive_int(num_branches, "num_branches", minimum=2)
        if isinstance(in_channels, numbers.Integral) and not isinstance(in_channels, bool):
            channels = [check_positive_int(in_channels, "in_channels")] * num_branches
        else:
            if not isinstance(in_channels, (list, tuple)) or len(in_channels) != num_branches:
                raise ValueError(
                    f"`in_channels` must be an int or a sequence of {num_branches} ints "
                    f"(one per branch), but got {describe(in_channels)}"
                )
            channels = [check_positive_int(c, f"in_channels[{i}]") for i, c in enumerate(in_channels)]
        self.in_channels = tuple(channels)
        check_positive_int(num_layers, "num_layers", minimum=0)
        total = sum(channels)
        hidden = max(total // num_branches, 1) if hidden_channels is None else hidden_channels
        check_positive_int(hidden, "hidden_channels")
        check_positive_int(kernel_size, "kernel_size")
        if kernel_size % 2 == 0:
            raise ValueError(f"`kernel_size` must be odd (the padding keeps H and W), but got {kernel_size}")
        layers: list[nn.Module] = []
        width = total
        for _ in range(num_layers):
            layers += [
                nn.Conv2d(width, hidden, kernel_size, padding=kernel_size // 2, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
            ]
            width = hidden
        self.central = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.scores = nn.Linear(width, num_branches)
        self.detach_features = detach_features
        self.detach_logits = detach_logits

    def forward(self, features: Sequence[Tensor], logits: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        features = check_tensor_list(features, "features", count=self.num_branches)
        for index, (feature, channels) in enumerate(zip(features, self.in_channels)):
            name = f"features[{index}]"
            check_floating(feature, name)
            check_shape(feature, name, (None, channels, None, None), f"Tensor[B, {channels}, H, W]")
            if feature.shape[0] != features[0].shape[0] or feature.shape[-2:] != features[0].shape[-2:]:
                raise ValueError(
                    f"`{name}` must have the batch size and spatial size of `features[0]` "
                    f"(B={features[0].shape[0]}, {features[0].shape[2]}x{features[0].shape[3]}), "
                    f"but got B={feature.shape[0]}, {feature.shape[2]}x{feature.shape[3]}"
                )
            check_same_device(feature, name, features[0], "features[0]")
        stacked = _check_logits_list(logits, "logits", self.num_branches)
        if stacked.shape[1] != features[0].shape[0]:
            raise ValueError(
                f"`logits` must have the batch size of `features` ({features[0].shape[0]}), "
                f"but got {stacked.shape[1]}"
            )
        fused = torch.cat(features, dim=1)
        if self.detach_features:
            fused = fused.detach()
        if self.detach_logits:
            stacked = stacked.detach()
        scores = self.scores(self.pool(self.central(fused)).flatten(1))
        return _weighted_branches(scores, stacked)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_branches={self.num_branches}, "
            f"detach_features={self.detach_features}, detach_logits={self.detach_logits}"
        )


class BranchGate(nn.Module):
    r"""ONE's gate: the ensemble teacher of On-the-Fly Native Ensemble (Lan et al., 2018), the
    control KD-ATFF's fusion teacher replaces.

    ``forward(shared, logits)``: the shared layers' output (the input of every branch) is
    average-pooled, a linear layer gives one score per branch, then BatchNorm and ReLU; a
    softmax over the branches gives the weights ``w`` and the teacher logits are
    :math:`z_e = \sum_a w_a z_a`, as in :class:`FeatureFusionTeacher`. Where the fusion teacher
    looks at what each branch computed (their last-block maps), the gate sees only what they all
    start from.

    Args:
        in_channels: channels of the shared feature map.
        num_branches: number of branches ``n >= 2``.

    Shapes:
        shared: Tensor[B, C, H, W]; logits: list of ``n`` Tensor[B, K]. Returns
        ``(teacher_logits, weights)``: Tensor[B, K] and Tensor[B, n] (rows sum to 1).

    Example:
        >>> gate = BranchGate(in_channels=32, num_branches=2)
        >>> logits = [torch.randn(8, 10), torch.randn(8, 10)]
        >>> teacher, weights = gate(torch.randn(8, 32, 16, 16), logits)
        >>> teacher.shape, weights.shape, bool(torch.allclose(weights.sum(1), torch.ones(8)))
        (torch.Size([8, 10]), torch.Size([8, 2]), True)
    """

    def __init__(self, in_channels: int, num_branches: int) -> None:
        super().__init__()
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.num_branches = check_positive_int(num_branches, "num_branches", minimum=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.scores = nn.Linear(in_channels, num_branches)
        self.norm = nn.BatchNorm1d(num_branches)

    def forward(self, shared: Tensor, logits: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        check_floating(shared, "shared")
        check_shape(shared, "shared", (None, self.in_channels, None, None),
                    f"Tensor[B, {self.in_channels}, H, W]")
        stacked = _check_logits_list(logits, "logits", self.num_branches)
        if stacked.shape[1] != shared.shape[0]:
            raise ValueError(
                f"`logits` must have the batch size of `shared` ({shared.shape[0]}), "
                f"but got {stacked.shape[1]}"
            )
        check_same_device(stacked, "logits", shared, "shared")
        scores = F.relu(self.norm(self.scores(self.pool(shared).flatten(1))))
        return _weighted_branches(scores, stacked)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_branches={self.num_branches}"


class BranchDisagreement(NamedTuple):
    """How different the branches' predictions are (for monitoring branch collapse)."""

    kl: Tensor  #: 0-d: mean over ordered pairs a != b and samples of KL(p_a || p_b) at T = 1
    top1: Tensor  #: 0-d: share of (pair, sample) whose arg-max classes differ, in [0, 1]


@torch.no_grad()
def branch_disagreement(logits: Sequence[Tensor]) -> BranchDisagreement:
    r"""Disagreement between branches, to watch peers drift toward each other (OKDDip#7).

    ``kl`` is :math:`\frac{1}{n(n-1)} \sum_{a \neq b} \frac1B \sum_i \mathrm{KL}(p_{a,i} \Vert p_{b,i})`
    (computed by :func:`~mkfkit.distill.kd_loss` at ``T = 1``); ``top1`` is the share of
    branch pairs and samples whose predicted classes differ. Both tend to 0 when the
    branches collapse onto one function and the fused teacher loses its diversity. No
    gradients; no host synchronisation (call ``.item()`` when logging).

    Args:
        logits: list of ``n >= 2`` Tensor[B, K] branch logits.

    Returns:
        :class:`BranchDisagreement` of two 0-d float32 tensors.

    Example:
        >>> same = torch.tensor([[2.0, 0.0]])
        >>> branch_disagreement([same, same])
        BranchDisagreement(kl=tensor(0.), top1=tensor(0.))
    """
    stacked = _check_logits_list(logits, "logits")
    count = stacked.shape[0]
    if count < 2:
        raise ValueError(f"`logits` must hold at least 2 branches, but got {count}")
    pairs = torch.tensor(list(itertools.permutations(range(count), 2)), device=stacked.device)
    teacher_index, student_index = pairs.unbind(dim=1)
    kl = kd_loss(
        stacked[student_index].flatten(0, 1),
        stacked[teacher_index].flatten(0, 1),
        teacher_kind="logits",
    )
    predicted = stacked.argmax(dim=-1)
    top1 = batch_mean((predicted[teacher_index] != predicted[student_index]).to(kl.dtype).flatten())
    return BranchDisagreement(kl=kl, top1=top1)


class OnlineDistillationLoss(NamedTuple):
    """The parts of :func:`online_distillation_loss` and their weighted sum."""

    total: Tensor  #: 0-d: sum(branch_ce) + teacher_ce + theta * sum(kd) + beta * attention
    branch_ce: Tensor  #: Tensor[n]: cross-entropy of each branch with the labels
    teacher_ce: Tensor  #: 0-d: cross-entropy of the fused teacher (trains the fusion block)
    kd: Tensor  #: Tensor[n]: T^2 * KL(softened detached teacher || softened branch), batchmean
    attention: Tensor  #: 0-d: the attention-transfer term as given (0 when not given)


def online_distillation_loss(
    branch_logits: Sequence[Tensor],
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: float = 3.0,
    theta: float = 1.0,
    beta: float = 1.0,
    attention_loss: Optional[Tensor] = None,
) -> OnlineDistillationLoss:
    r"""KD-ATFF's training loss (eqs. 5-9) for ``n`` branches and the fused teacher.

    .. math::
        L = \sum_{a=1}^{n} \mathrm{CE}(z_a, y) + \mathrm{CE}(z_e, y)
            + \theta \sum_{a=1}^{n} T^2\, \mathrm{KL}\big(\mathrm{softmax}(\mathrm{sg}(z_e)/T)
              \,\Vert\, \mathrm{softmax}(z_a/T)\big) + \beta\, L_{AT}

    * Branch terms are *summed* over branches (each branch gets the gradient it would get
      alone), every term is a batch mean.
    * The teacher is detached in the KL terms (branches learn from it, it does not learn to
      imitate them); its own cross-entropy is what trains the fusion block (and, unless the
      fusion block detaches them, flows into the branches).
    * The KL is :func:`~mkfkit.distill.kd_loss` (``batchmean``, ``T^2``, float32).
    * An empty batch (``B = 0``) gives zeros with zero gradients (docs/METHOD.md,
      "Conventions").
    * The paper's eq. 9 is not legible in our copy; it names theta and beta as the weights that
      balance soft and hard targets. Here ``theta`` weighs the KL terms and ``beta`` the
      attention term (pass ``attention_loss`` from :class:`~mkfkit.attention.AttentionTransferLoss`,
      summed over branches if each branch has its own); both 1 as in the paper.

    Args:
        branch_logits: list of ``n`` Tensor[B, K].
        teacher_logits: Tensor[B, K] fused teacher (from :class:`FeatureFusionTeacher`).
        targets: LongTensor[B] class indices, or Tensor[B, K] probability rows (e.g. the mixed
            targets of a compound-mixed batch, :meth:`~mkfkit.mixing.MixedBatch.soft_targets`:
            the cross-entropy is linear in the target, so this is the mixed cross-entropy).
        temperature: KD temperature ``T`` in ``(0, 100]`` (paper: 3).
        theta: weight of the KL terms ``>= 0``.
        beta: weight of the attention term ``>= 0``.
        attention_loss: optional 0-d tensor.

    Returns:
        :class:`OnlineDistillationLoss` (float32; float64 for float64 logits).

    Example:
        >>> branches = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
        >>> parts = online_distillation_loss(branches, torch.tensor([[1.0, 0.5]]), torch.tensor([0]))
        >>> parts.branch_ce
        tensor([0.1269, 1.3133])
    """
    stacked = _check_logits_list(branch_logits, "branch_logits")
    count, batch, classes = stacked.shape
    check_floating(teacher_logits, "teacher_logits")
    check_shape(teacher_logits, "teacher_logits", (batch, classes), f"Tensor[B, K] = ({batch}, {classes})")
    check_same_device(teacher_logits, "teacher_logits", stacked, "branch_logits")
    if targets.is_floating_point():
        check_shape(targets, "targets", (batch, classes),
                    f"Tensor[B] of class indices or Tensor[B, K] = ({batch}, {classes}) of probabilities")
        check_distribution_rows(targets, "targets")
    else:
        check_index(targets, "targets", classes, length=batch)
    check_same_device(targets, "targets", stacked, "branch_logits")
    check_temperature(temperature)
    check_in_range(theta, "theta", 0.0, float("inf"), high_open=True)
    check_in_range(beta, "beta", 0.0, float("inf"), high_open=True)
    dtype = compute_dtype(stacked, teacher_logits)
    if attention_loss is None:
        attention_loss = torch.zeros((), dtype=dtype, device=stacked.device)
    else:
        check_floating(attention_loss, "attention_loss")
        check_shape(attention_loss, "attention_loss", (), "0-d tensor")
        check_same_device(attention_loss, "attention_loss", stacked, "branch_logits")

    with torch.autocast(stacked.device.type, enabled=False):
        flat = stacked.to(dtype).flatten(0, 1)
        if targets.is_floating_point():
            targets = targets.to(dtype)
        repeated = targets.repeat(count, *[1] * (targets.dim() - 1))
        branch_ce = F.cross_entropy(flat, repeated, reduction="none").view(count, batch)
        teacher_ce = batch_mean(F.cross_entropy(teacher_logits.to(dtype), targets, reduction="none"))
        kd = kd_loss(
            flat,
            teacher_logits.detach().repeat(count, 1),
            temperature,
            teacher_kind="logits",
            reduction="none",
        ).view(count, batch)
        branch_ce, kd = batch_mean(branch_ce), batch_mean(kd)
        attention = attention_loss.to(dtype)
        total = branch_ce.sum() + teacher_ce + theta * kd.sum() + beta * attention
    return OnlineDistillationLoss(total, branch_ce, teacher_ce, kd, attention)
