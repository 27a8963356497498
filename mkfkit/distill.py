"""The knowledge-distillation loss shared by every mkfkit method.

One KD loss for the package: ``KL(teacher || student)`` between temperature-softened
distributions, averaged over the batch rows (``batchmean``), multiplied by ``T^2`` and computed
in float32 whatever the input precision. MKF distils a bank target (probabilities plus a row
mask) into each sub-network; KD-ATFF distils the fused teacher's logits into each branch.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
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
# T^2 * KL is a difference of log-probabilities that agree to about 1/T, scaled by T^2: in
# float32 it carries an absolute error of about eps * T^2 (1e-3 at T = 100, more than the loss
# itself above a few thousand). Practical temperatures are 1 to 20. There is no lower limit:
# the value and the gradient stay finite for any T > 0.
MAX_TEMPERATURE = 100.0


def check_temperature(temperature: object) -> float:
    """A distillation temperature in (0, MAX_TEMPERATURE], as a float."""
    check_in_range(temperature, "temperature", 0.0, MAX_TEMPERATURE, low_open=True)
    return float(temperature)


def batch_mean(per_sample: Tensor, count: Optional[Union[int, Tensor]] = None) -> Tensor:
    """The mean over the last dimension (the batch): its sum over ``count``, which defaults to
    its length; 0 for an empty batch.

    The package's one rule for empty batches (``B = 0``): every loss is 0, still attached to the
    graph, so ``backward`` runs and gives zero gradients (docs/METHOD.md, "Conventions"). A plain
    ``mean`` would be 0 / 0 = NaN and poison the parameters at the next optimiser step.
    """
    # A 1-d sum in full: its backward is one expand (a sum over a dimension adds an unsqueeze).
    total = per_sample.sum() if per_sample.dim() == 1 else per_sample.sum(dim=-1)
    if count is None:
        count = per_sample.shape[-1]
    if isinstance(count, Tensor):
        return total / count.clamp_min(1)  # an integer count: the quotient has the sum's dtype
    return total / max(count, 1)


def check_classes(logits: Tensor, name: str) -> None:
    """Logits Tensor[B, C] need ``C >= 1``: a softmax over no classes has no meaning."""
    if logits.shape[-1] == 0:
        raise ValueError(
            f"`{name}` must have at least one class (Tensor[B, C] with C >= 1), "
            f"but got shape {tuple(logits.shape)}"
        )


def _scaled_log_softmax(scores: Tensor, temperature: float) -> Tensor:
    """``log_softmax(scores / T)`` without overflow for small ``T``; entries may be ``-inf``.

    ``log_softmax`` subtracts the row maximum itself; only the division before it can overflow,
    and only for ``T < 1``: a large ``scores / T`` becomes ``inf`` (and then ``inf - inf =
    NaN``). Below 1 the row maximum (finite: a row of finite scores, or of log-probabilities,
    some ``-inf``) is subtracted first, taken without autograd (a shift of the whole row leaves
    the log-softmax unchanged, so no gradient flows through it). From 1 on the division cannot
    overflow and the shift would be two operations more on every call; at ``T = 1`` the division
    is skipped too, being exact.
    """
    if temperature < 1.0:
        with torch.no_grad():
            top = scores.amax(dim=-1, keepdim=True)
        scores = (scores - top) / temperature
    elif temperature > 1.0:
        scores = scores / temperature
    return scores.log_softmax(dim=-1)


def _softened_teacher(teacher: Tensor, temperature: float, teacher_kind: str) -> tuple[Tensor, Tensor]:
    """The softened teacher distribution and its log (``-inf`` where the probability is 0)."""
    if teacher_kind == "probs":
        # p^(1/T) renormalised == softmax(log(p) / T), in log space: p^(1/T) itself underflows
        # to 0 for a confident teacher at T < 1 and the renormalisation would be 0 / 0. log(0)
        # is -inf (entries a rounding below 0 count as 0); for a teacher that takes a gradient
        # the double `where` keeps it at zero entries 0 instead of inf * 0.
        if teacher.requires_grad:
            positive = teacher > 0
            safe = torch.where(positive, teacher, torch.ones_like(teacher))
            teacher = torch.where(positive, safe.log(), torch.full_like(teacher, -math.inf))
        else:
            teacher = teacher.clamp_min(0).log()
    log_probs = _scaled_log_softmax(teacher, temperature)
    return log_probs.exp(), log_probs


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
      what the logits branch gives for any logits of ``p``, and it is computed that way, in
      log space: :math:`p^{1/T}` itself underflows for a confident teacher at ``T < 1``. Rows
      must sum to 1 within the tolerance of their dtype (``max(1e-3, 2 eps)``: 0.0156 for
      bf16, the rows the bank stores) and are renormalised, also at ``T = 1``.

    The loss and its gradient are finite for every valid teacher and every ``T`` whose scaled
    logit gaps ``(max(s) - s_c) / T`` (and the teacher's) stay within the dtype's range
    (``finfo.max``: 3.4e38 in float32, so any ``T`` above 1e-30 with gaps below 1e8), including
    rows whose weight is 0. Beyond it the scaled gap overflows and the loss is not finite (e.g.
    a gap of 40 at ``T = 1e-37`` in float32; float64 inputs reach ``T`` around 1e-300).

    ``teacher_kind`` has no default on purpose: probabilities read as logits (or the reverse)
    give a plausible-looking, wrong loss.

    Reduction. With per-row weights :math:`w_b` (``weight``; all ones when ``None``),

    * ``"batchmean"`` (default): :math:`\sum_b w_b \ell_b / \#\{b : w_b \neq 0\}`: the mean over
      the rows that carry a teacher, so masked rows (no knowledge yet) do not dilute the loss.
      Without ``weight`` this is ``F.kl_div(..., reduction="batchmean") * T**2``. If every
      weight is 0, or the batch is empty (``B = 0``), the loss is 0, still attached to the
      graph with a zero gradient (the package's rule for empty batches, docs/METHOD.md,
      "Conventions").
    * ``"sum"``: :math:`\sum_b w_b \ell_b`; ``"none"``: the Tensor[B] of :math:`w_b \ell_b`.

    There is deliberately no ``"mean"``: ``F.kl_div``'s element mean divides by ``B * C`` and is
    the silent factor-``C`` bug users keep reporting.

    The math runs in float32 (float64 if an input is float64) with autocast switched off, so
    fp16/bf16 logits give the float32 value.

    Args:
        student_logits: Tensor[B, C] student logits, ``C >= 1``.
        teacher: Tensor[B, C] teacher logits or probability rows (see ``teacher_kind``).
        temperature: softening temperature ``T`` in ``(0, 100]`` (``MAX_TEMPERATURE``).
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
    check_classes(student_logits, "student_logits")
    check_floating(teacher, "teacher")
    check_same_shape(teacher, "teacher", student_logits, "student_logits")
    check_same_device(teacher, "teacher", student_logits, "student_logits")
    temperature = check_temperature(temperature)
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
    if detach_teacher and teacher.requires_grad:
        teacher = teacher.detach()

    dtype = compute_dtype(student_logits, teacher)
    with torch.autocast(student_logits.device.type, enabled=False):
        log_student = _scaled_log_softmax(student_logits.to(dtype), temperature)
        probs, log_probs = _softened_teacher(teacher.to(dtype), temperature, teacher_kind)
        # 0 log 0 = 0: a class the teacher rules out adds nothing, even where the student's
        # log-probability is -inf too; the mask sits inside the product so that the gradient
        # into `probs` there is 0 rather than 0 * inf. Fills of masks here and below, not
        # `where`: a fill's backward is one operation, a `where`'s two.
        ruled_out = ~(probs > 0)  # NaN included: nothing reaches the student through it
        log_ratio = (log_probs - log_student).masked_fill(ruled_out, 0.0)
        # A KL divergence is never negative; rounding can make a row's sum a hair below 0 when
        # the student matches the teacher, so the row is clamped there (its gradient is ~0
        # anyway): a threshold at 0, whose backward is one operation (clamp_min's takes three).
        # T * T is at most MAX_TEMPERATURE**2: one multiplication, no overflow.
        per_row = F.threshold((probs * log_ratio).sum(dim=-1), 0.0, 0.0) * (temperature * temperature)
        if weight is not None:
            # Masked, not multiplied: a masked row never brings a NaN or inf in (0 * inf = NaN).
            if weight.dtype == torch.bool:
                per_row = per_row.masked_fill(~weight, 0.0)
            else:
                weight = weight.to(dtype)
                per_row = (per_row * weight).masked_fill(weight == 0, 0.0)
        if reduction == "none":
            return per_row
        if reduction == "sum":
            return per_row.sum()
        return batch_mean(per_row, None if weight is None else torch.count_nonzero(weight))


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
        self.temperature = check_temperature(temperature)
        check_choice(teacher_kind, "teacher_kind", TEACHER_KINDS)
        check_choice(reduction, "reduction", REDUCTIONS)
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
