"""The knowledge-distillation loss shared by every mkfkit method.

One KD loss for the package: ``KL(teacher || student)`` between temperature-softened
distributions, averaged over the batch rows (``batchmean``), multiplied by ``T^2`` and computed
in float32 whatever the input precision. MKF distils a bank target (probabilities plus a row
mask) into each sub-network; KD-ATFF distils the fused teacher's logits into each branch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mkfkit._checks import (
    check_choice,
    check_distribution_rows,
    check_floating,
    check_in_range,
    check_same_device,
    check_same_shape,
    check_shape,
    check_tensor,
)
from mkfkit._dtypes import compute_dtype

__all__ = ["kd_loss", "KDLoss"]

TEACHER_KINDS = ("logits", "probs")
REDUCTIONS = ("batchmean", "sum", "none")


def _softened_teacher(teacher: Tensor, temperature: float, teacher_kind: str) -> tuple[Tensor, Tensor]:
    """The softened teacher distribution and its log, both finite where the probability is 0."""
    if teacher_kind == "logits":
        scaled = teacher / temperature
        return scaled.softmax(dim=-1), scaled.log_softmax(dim=-1)
    # p^(1/T) renormalised == softmax(log(p) / T). Zero entries stay exactly zero; the double
    # `where` keeps their gradients at 0 instead of 0 * inf = NaN (d p^(1/T) / dp is infinite at 0).
    positive = teacher > 0
    safe = torch.where(positive, teacher, torch.ones_like(teacher))
    powered = torch.where(positive, safe.pow(1.0 / temperature), torch.zeros_like(teacher))
    probs = powered / powered.sum(dim=-1, keepdim=True)
    log_probs = torch.where(positive, probs, torch.ones_like(probs)).log()
    return probs, log_probs


def kd_loss(
    student_logits: Tensor,
    teacher: Tensor,
    temperature: float = 1.0,
    *,
    teacher_kind: str,
    weight: Optional[Tensor] = None,
    reduction: str = "batchmean",
    detach_teacher: bool = True,
) -> Tensor:
    r"""Knowledge-distillation loss ``T^2 * KL(p_T || q_T)`` with ``batchmean`` reduction.

    With temperature :math:`T`, student logits :math:`s` and teacher distribution :math:`p_T`,

    .. math::
        q_T = \mathrm{softmax}(s / T), \qquad
        \ell_b = T^2 \sum_c p_{T,bc} \left(\log p_{T,bc} - \log q_{T,bc}\right),

    with :math:`0 \log 0 = 0` (a zero teacher entry contributes nothing and gets no NaN
    gradient). The teacher is softened the same way the student is:

    * ``teacher_kind="logits"``: :math:`p_T = \mathrm{softmax}(t / T)`.
    * ``teacher_kind="probs"`` (e.g. a :class:`~mkfkit.bank.BankTarget`'s ``probs``):
      :math:`p_T = p^{1/T} / \sum_c p_c^{1/T}`, which is exactly ``softmax(log(p) / T)``, i.e.
      what the logits branch gives for any logits of ``p``. Rows are renormalised, also at
      ``T = 1``.

    ``teacher_kind`` has no default on purpose: probabilities read as logits (or the reverse)
    give a plausible-looking, wrong loss.

    Reduction. With per-row weights :math:`w_b` (``weight``; all ones when ``None``),

    * ``"batchmean"`` (default): :math:`\sum_b w_b \ell_b / \#\{b : w_b \neq 0\}`: the mean over
      the rows that carry a teacher, so masked rows (no knowledge yet) do not dilute the loss.
      Without ``weight`` this is ``F.kl_div(..., reduction="batchmean") * T**2``. If every
      weight is 0 the loss is 0 (still attached to the graph).
    * ``"sum"``: :math:`\sum_b w_b \ell_b`; ``"none"``: the Tensor[B] of :math:`w_b \ell_b`.

    There is deliberately no ``"mean"``: ``F.kl_div``'s element mean divides by ``B * C`` and is
    the silent factor-``C`` bug users keep reporting.

    The math runs in float32 (float64 if an input is float64) with autocast switched off, so
    fp16/bf16 logits give the float32 value.

    Args:
        student_logits: Tensor[B, C] student logits.
        teacher: Tensor[B, C] teacher logits or probability rows (see ``teacher_kind``).
        temperature: softening temperature ``T > 0``.
        teacher_kind: ``"logits"`` or ``"probs"``.
        weight: optional Tensor[B] of per-row weights ``>= 0``, bool (a mask such as
            ``BankTarget.mask``) or floating.
        reduction: ``"batchmean"``, ``"sum"`` or ``"none"``.
        detach_teacher: stop gradients into ``teacher`` (default ``True``).

    Returns:
        A 0-d tensor (``"batchmean"``/``"sum"``) or Tensor[B] (``"none"``), float32 (float64
        for float64 inputs).

    Example:
        >>> student = torch.tensor([[2.0, 0.0, -1.0]])
        >>> teacher = torch.tensor([[0.7, 0.3, 0.0]])
        >>> kd_loss(student, teacher, teacher_kind="probs")
        tensor(0.1590)
        >>> kd_loss(student, torch.tensor([[1.0, 0.0, 0.0]]), 3.0, teacher_kind="logits")
        tensor(0.3358)
    """
    check_floating(student_logits, "student_logits")
    check_shape(student_logits, "student_logits", (None, None), "Tensor[B, C]")
    check_floating(teacher, "teacher")
    check_same_shape(teacher, "teacher", student_logits, "student_logits")
    check_same_device(teacher, "teacher", student_logits, "student_logits")
    check_in_range(temperature, "temperature", 0.0, float("inf"), low_open=True, high_open=True)
    check_choice(teacher_kind, "teacher_kind", TEACHER_KINDS)
    check_choice(reduction, "reduction", REDUCTIONS)
    batch = student_logits.shape[0]
    if weight is not None:
        check_tensor(weight, "weight")
        if weight.dtype != torch.bool:
            check_floating(weight, "weight")
        check_shape(weight, "weight", (batch,), f"Tensor[B] with B = {batch}")
        check_same_device(weight, "weight", student_logits, "student_logits")
        if weight.dtype != torch.bool:
            check_in_range(weight, "weight", 0.0, float("inf"))
    if teacher_kind == "probs":
        check_distribution_rows(teacher, "teacher")
    if detach_teacher:
        teacher = teacher.detach()

    dtype = compute_dtype(student_logits, teacher)
    with torch.autocast(student_logits.device.type, enabled=False):
        log_student = (student_logits.to(dtype) / temperature).log_softmax(dim=-1)
        probs, log_probs = _softened_teacher(teacher.to(dtype), temperature, teacher_kind)
        per_row = (probs * (log_probs - log_student)).sum(dim=-1) * temperature**2
        if weight is not None:
            per_row = per_row * weight.to(dtype)
        if reduction == "none":
            return per_row
        total = per_row.sum()
        if reduction == "sum":
            return total
        if weight is None:
            return total / max(batch, 1)
        return total / torch.count_nonzero(weight).clamp_min(1).to(dtype)


class KDLoss(nn.Module):
    """Module twin of :func:`kd_loss`; the arguments are the same.

    Example:
        >>> loss = KDLoss(temperature=3.0, teacher_kind="logits")
        >>> loss(torch.zeros(2, 5), torch.zeros(2, 5))
        tensor(0.)
    """

    def __init__(
        self,
        temperature: float = 1.0,
        *,
        teacher_kind: str,
        reduction: str = "batchmean",
        detach_teacher: bool = True,
    ) -> None:
        super().__init__()
        check_in_range(temperature, "temperature", 0.0, float("inf"), low_open=True, high_open=True)
        check_choice(teacher_kind, "teacher_kind", TEACHER_KINDS)
        check_choice(reduction, "reduction", REDUCTIONS)
        self.temperature = float(temperature)
        self.teacher_kind = teacher_kind
        self.reduction = reduction
        self.detach_teacher = detach_teacher

    def forward(self, student_logits: Tensor, teacher: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        return kd_loss(
            student_logits,
            teacher,
            self.temperature,
            teacher_kind=self.teacher_kind,
            weight=weight,
            reduction=self.reduction,
            detach_teacher=self.detach_teacher,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, teacher_kind={self.teacher_kind!r}, "
            f"reduction={self.reduction!r}, detach_teacher={self.detach_teacher}"
        )
