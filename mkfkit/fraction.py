"""Knowledge fraction: split a mixed output back into estimates of the two clean responses.

A network fed the mixed image ``lam * x_a + (1 - lam) * x_b`` outputs ``mixed`` ~
``lam * p_a + (1 - lam) * p_b``. Given stored knowledge ``base_a`` ~ ``p_a`` and ``base_b`` ~
``p_b`` (e.g. the :class:`~mkfkit.bank.KnowledgeBank` rows of both images), a *fraction
strategy* estimates ``p_a`` and ``p_b``. All strategies share one call and one result::

    strategy(mixed, base_a, base_b, lam) -> Fraction(a, b, mask_a, mask_b)

    mixed, base_a, base_b: Tensor[B, C], rows are probability vectors
    lam: float or Tensor[B] in [0, 1] (per-sample weights, e.g. CutMix areas)

* :class:`LinearFraction` (the paper's OPT2): ``a = (mixed - (1 - lam) * base_b) / lam``.
* :class:`QPFraction` (the paper's OPT1): the exact solution of the QP, in closed form (in torch
  or one fused Triton kernel). The paper's route, a ``cvxpylayers`` layer, is a reference
  solver for tests and benchmarks: :class:`mkfkit.reference.CvxpyQPFraction`.
* :class:`DominantFraction` (the paper's "No OPT" ablation): the image with the larger weight
  takes the whole mixed output.

Any callable of that signature is a strategy (:class:`FractionStrategy`). A side of weight 0
carries no information about its image: it keeps its base and its mask is ``False``, which
tells a knowledge bank to skip that update. A subnormal weight (below ``finfo.tiny``: 1.2e-38
in float32, 2.2e-308 in float64) counts as 0, since the mixed row cannot hold that side's
share to the dtype's precision (:func:`positive_weights`). This module is the one home of that
rule and of its mirror, a side whose partner has weight 0 is the mixed output itself
(:func:`settle_sides`, :func:`pair_known`). The derivations are in docs/METHOD.md, "Knowledge fraction".
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, Union

import torch
from torch import Tensor, nn

from mkfkit import kernels
from mkfkit._checks import (
    as_lam,
    check_choice,
    check_distribution_rows,
    check_floating,
    check_same_device,
    check_same_dtype,
    check_same_shape,
    check_shape,
    check_tensor,
    describe,
    value_checks_enabled,
)
from mkfkit._dtypes import compute_dtype
from mkfkit._projection import project_onto_bounds

__all__ = [
    "Fraction",
    "FractionStrategy",
    "LinearFraction",
    "QPFraction",
    "DominantFraction",
    "linear_fraction",
    "qp_fraction",
    "dominant_fraction",
]



class Fraction(NamedTuple):
    """Estimates of the clean responses to the two images of a mixed pair.

    Attributes:
        a: Tensor[B, C], estimate of the clean response to image a.
        b: Tensor[B, C], estimate of the clean response to image b.
        mask_a: bool Tensor[B], rows where ``a`` carries information about image a (update it).
        mask_b: bool Tensor[B], rows where ``b`` carries information about image b.
    """

    a: Tensor
    b: Tensor
    mask_a: Tensor
    mask_b: Tensor


class FractionStrategy(Protocol):
    """What a knowledge bank needs of a fraction: one call, one result.

    ``mixed``, ``base_a``, ``base_b``: Tensor[B, C] probability rows; ``lam``: Tensor[B] (the
    built-in strategies also take a float). The result's ``a`` and ``b`` must be probability
    rows for a bank to store them.
    """

    def __call__(self, mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Tensor) -> Fraction: ...


# ---------------------------------------------------------------------------------------------
# The rule for lam in {0, 1}, written once


def side_weights(lam: Tensor) -> Tensor:
    """The weights of both sides, a then b, Tensor[2, B] (``lam``, ``1 - lam``), stacked as the
    bases are (Tensor[2, B, C]). Every strategy computes both sides at once: one operation over
    the stack costs about half as much as two over the sides. A split computes the stack once;
    the strategy, the masks and the bank's rules all read it."""
    return torch.stack((lam, 1 - lam))


def positive_weights(weights: Tensor) -> Tensor:
    """bool Tensor[2, B]: the sides (a, then b) whose weight counts as positive, from their
    weights (:func:`side_weights`). Only those carry information about their image.

    A weight counts when it is at least ``finfo(weights.dtype).tiny``, the smallest normal number
    (float32, and bfloat16/float16 inputs, which the fractions compute in float32: 1.2e-38;
    float64: 2.2e-308); a subnormal weight counts as 0. Its share of the mixed row, the products
    ``lam * p_a``, is then subnormal too and keeps fewer significant bits than the dtype has
    (none at the smallest subnormal), so the side's bounds ``mixed / lam`` and its estimate are
    noise. For ``lam`` in [0, 1] only side a can have such a weight (``1 - lam >= eps / 2``):
    the sides are ``lam >= tiny`` and ``lam < 1``.
    """
    return weights >= torch.finfo(weights.dtype).tiny


def pair_known(known: Tensor, weights: Tensor) -> Tensor:
    """bool Tensor[B]: every side of positive weight is known (a side of weight 0 needs
    nothing), from ``known``, bool Tensor[2, B] (side a, then side b), and the side weights."""
    # For booleans, known >= needed is "known or not needed".
    return (known >= positive_weights(weights)).all(0)


def settle_sides(pair: Tensor, masks: Tensor, mixed: Tensor, weights: Tensor, known: Tensor) -> tuple[Tensor, Tensor]:
    """What a split teaches each side: ``(estimates Tensor[2B, C], valid bool Tensor[2B])``,
    the a sides, then the b sides.

    ``pair``, ``masks``: the split as :func:`split_unchecked` returns it (Tensor[2, B, C], bool
    Tensor[2, B]); ``weights``: :func:`side_weights`; ``known``: bool Tensor[2, B], whether each
    side's base is known. A side whose
    partner carries no weight (:func:`positive_weights`) is the mixed output itself (``a =
    mixed`` where ``lam == 1``, whatever the strategy). A side counts where it carries weight,
    the strategy's mask says so and its partner carries no weight or both bases are known: an
    estimate made from an unknown base is no estimate, and a side of weight 0 is never updated.
    """
    own_positive = positive_weights(weights)
    partner_positive = own_positive.flip(0)
    estimates = torch.where(partner_positive.unsqueeze(-1), pair.float(), mixed)
    # For booleans, both_known >= partner_positive is "both known or the partner weightless".
    # A side without weight learns nothing from the pair, whatever the strategy's mask says
    # (the built-in strategies say so themselves; a user's strategy need not).
    valid = masks & own_positive & (known.all(0) >= partner_positive)
    return estimates.flatten(0, 1), valid.flatten()


# ---------------------------------------------------------------------------------------------
# Shared input handling


def _prepare(
    mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Union[float, Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor, torch.dtype]:
    """Validate the common arguments.

    Returns ``mixed, base_a, base_b`` in the compute dtype (float32 for half precision),
    ``lam`` as a Tensor[B] of that dtype, and the input dtype to cast the results back to.
    """
    check_floating(mixed, "mixed")
    check_shape(mixed, "mixed", (None, None), "Tensor[B, C]")
    if mixed.shape[1] == 0:
        raise ValueError(f"`mixed` must have at least one class (C >= 1; B may be 0), but got shape {tuple(mixed.shape)}")
    for name, value in (("base_a", base_a), ("base_b", base_b)):
        check_floating(value, name)
        check_same_shape(value, name, mixed, "mixed")
        check_same_device(value, name, mixed, "mixed")
        check_same_dtype(value, name, mixed, "mixed")
    for name, value in (("mixed", mixed), ("base_a", base_a), ("base_b", base_b)):
        check_distribution_rows(value, name)  # within distribution_tolerance of their dtype
    compute = compute_dtype(mixed)
    dtype = mixed.dtype
    if compute != dtype:
        mixed, base_a, base_b = mixed.to(compute), base_a.to(compute), base_b.to(compute)
    return mixed, base_a, base_b, as_lam(lam, mixed.shape[0], mixed.device, mixed.dtype), dtype


def _linear_divisor(weight: Tensor) -> Tensor:
    """``weight`` as OPT2's divisor, keeping every quotient and its gradient finite.

    Weights below sqrt(finfo.tiny) (about 1e-19 in float32, 1e-154 in float64, including 0)
    are raised to it: ``1 / weight`` and ``1 / weight**2`` then stay finite. Rows of weight 0
    are replaced by their base afterwards, and for a positive weight that small the OPT2
    estimate is swamped by its ``1 / weight`` error anyway.
    """
    return weight.clamp_min(torch.finfo(weight.dtype).tiny ** 0.5)


def _finish(pair: Tensor, bases: Tensor, weights: Tensor) -> Fraction:
    """Keep the base on a side of weight 0 and attach the masks (:func:`positive_weights`).

    ``pair``, ``bases``: Tensor[2, B, C]; ``weights``: Tensor[2, B] (:func:`side_weights`).
    """
    masks = positive_weights(weights)
    a, b = torch.where(masks.unsqueeze(-1), pair, bases)
    return Fraction(a, b, *masks)


def _cast(fraction: Fraction, dtype: torch.dtype) -> Fraction:
    """``fraction`` with its rows in ``dtype`` (the input dtype of a checked call)."""
    return fraction._replace(a=fraction.a.to(dtype), b=fraction.b.to(dtype))


def split_unchecked(strategy: FractionStrategy, mixed: Tensor, bases: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """``strategy(mixed, *bases, lam)`` with both sides stacked, ``(pair Tensor[2, B, C], masks
    bool Tensor[2, B])`` (a, then b), for callers that checked the inputs already (float32
    probability rows, ``bases`` Tensor[2, B, C], ``weights`` the :func:`side_weights` of a
    float32 ``lam`` Tensor[B] in [0, 1]).

    The built-in strategies skip their checks: their rows are clipped to [0, 1] and sum to 1 up
    to the rounding of a sum of order 1 for every weight, by construction (tested in every
    dtype); a side whose mask is False is left as it comes (its base is not put back: a caller
    that reads the masks never looks at it). Any other strategy, a subclass overriding
    ``forward`` included, is called as it is and what it returns is checked
    (:func:`check_split`; its value checks are skipped while ``torch.compile`` traces).
    """
    if type(strategy) in _BUILT_IN:
        return strategy._split(mixed, bases, weights)
    fraction = check_split(strategy(mixed, *bases, weights[0]), strategy, mixed)
    return torch.stack((fraction.a, fraction.b)), torch.stack((fraction.mask_a, fraction.mask_b))


def _label(strategy: object) -> str:
    """How an error message names a strategy: a function by its name, an object by its repr."""
    return getattr(strategy, "__qualname__", None) or repr(strategy)


def check_split(split: object, strategy: FractionStrategy, mixed: Tensor) -> Fraction:
    """What a strategy returned, checked before a bank stores it, as a :class:`Fraction`.

    It must be a ``Fraction(a, b, mask_a, mask_b)`` (or a 4-tuple in that order) with ``a``, ``b``
    floating-point Tensor[B, C] on the device of ``mixed`` and bool masks Tensor[B]; with value
    checks on (:func:`mkfkit.value_checks`, one host synchronisation per side), every row of
    ``a`` and ``b`` whose mask is set must be a probability row within
    :func:`~mkfkit._checks.distribution_tolerance` of its dtype. The error names the strategy.
    """
    if not isinstance(split, tuple) or len(split) != 4:
        raise TypeError(
            f"`fraction` {_label(strategy)} must return a Fraction(a, b, mask_a, mask_b), but got "
            f"{describe(split)}"
        )
    split = Fraction(*split)
    batch, classes = mixed.shape
    try:
        for side, mask_name in (("a", "mask_a"), ("b", "mask_b")):
            rows, mask = getattr(split, side), getattr(split, mask_name)
            check_floating(rows, side)
            check_shape(rows, side, (batch, classes), f"Tensor[B, C] with B = {batch}, C = {classes}")
            check_same_device(rows, side, mixed, "mixed")
            check_tensor(mask, mask_name)
            if mask.dtype != torch.bool:
                raise TypeError(f"`{mask_name}` must have dtype torch.bool, but got {mask.dtype}")
            check_shape(mask, mask_name, (batch,), f"Tensor[B] with B = {batch}")
            check_same_device(mask, mask_name, mixed, "mixed")
            if value_checks_enabled(rows):
                # Rows the bank skips (mask False) may hold anything.
                check_distribution_rows(torch.where(mask.unsqueeze(1), rows, 1 / classes), side)
    except (TypeError, ValueError) as error:
        raise type(error)(f"`fraction` {_label(strategy)} returned rows a bank cannot store: {error}") from None
    return split


def check_storable(strategy: object) -> None:
    """Refuse what cannot serve a bank as a strategy: no callable, a class instead of an
    instance, or a strategy known to return rows off the simplex."""
    if isinstance(strategy, type):
        raise TypeError(
            f"`fraction` must be a fraction strategy object, but got the class {strategy.__name__}; "
            f"use {strategy.__name__}()"
        )
    if not callable(strategy):
        raise TypeError(
            "`fraction` must be a fraction strategy, an object called as fraction(mixed, base_a, "
            f"base_b, lam) -> Fraction such as LinearFraction() or QPFraction(), but got {describe(strategy)}"
        )
    if isinstance(strategy, LinearFraction) and not strategy.project:
        # Its rows leave the simplex (negative entries): stored, they would poison every
        # later KL target and fail the next fraction's input check far from the cause.
        raise ValueError(
            "`fraction` must return probability rows for the bank to store, but got "
            "LinearFraction(project=False), the paper's raw OPT2; use LinearFraction()"
        )


# ---------------------------------------------------------------------------------------------
# OPT2: linear fraction


def linear_fraction(
    mixed: Tensor,
    base_a: Tensor,
    base_b: Tensor,
    lam: Union[float, Tensor],
    *,
    project: bool = True,
) -> Fraction:
    r"""Linear knowledge fraction (the paper's OPT2), optionally projected onto the simplex.

    Each side uses the other image's base as a proxy for its true response:

    .. math::

        a = \frac{\tilde p - (1 - \lambda) K_b}{\lambda}, \qquad
        b = \frac{\tilde p - \lambda K_a}{1 - \lambda}.

    The error of ``a`` is ``-(1 - lam) / lam * (K_b - p_b)``: it grows without bound as
    ``lam -> 0`` and routinely leaves ``[0, 1]`` (negative entries are the rule for C >= 10), and a
    knowledge row with negative entries poisons a KL target. Hence the default ``project=True``
    returns the Euclidean projection of each raw row onto the probability simplex: the
    distribution nearest to the raw estimate in the same squared-error geometry as the paper's
    QP, which leaves rows that are already valid untouched (so it *is* OPT2 wherever OPT2 is a
    distribution), keeps the row sum at 1 and is differentiable. ``project=False`` gives the raw
    formula, faithful to the paper.

    A side of weight 0 keeps its base (``a = base_a`` where ``lam == 0``, ``b = base_b`` where
    ``lam == 1``) and its mask is ``False``; so does side a for a subnormal ``lam``
    (:func:`positive_weights`). The projection is exact for every ``lam``: each raw row is
    first shifted by its largest entry (the projection onto the simplex does not change when a
    constant is added to a row) and entries below -1, which project to 0, are raised to -1, so
    the search sees numbers of order 1 however large ``1 / lam`` makes the raw row, and every
    projected row is on the simplex up to the rounding of a sum of order 1. Values and gradients are finite for every
    ``lam`` in [0, 1]: a weight below sqrt(finfo.tiny) (about 1e-19 in float32) divides as
    sqrt(finfo.tiny), where ``1 / lam`` would overflow.

    Args:
        mixed: Tensor[B, C], the output on the mixed input (probability rows).
        base_a: Tensor[B, C], stored knowledge of image a (probability rows).
        base_b: Tensor[B, C], stored knowledge of image b (probability rows).
        lam: float or Tensor[B] in [0, 1], the weight of image a.
        project: project each estimate onto the simplex (default) or return the raw formula.

    Returns:
        :class:`Fraction` with ``a, b``: Tensor[B, C] in the dtype of ``mixed``;
        ``mask_a = lam >= finfo.tiny``, ``mask_b = lam < 1`` (:func:`positive_weights`).

    Example:
        >>> mixed = torch.tensor([[0.5, 0.3, 0.2]])
        >>> base_a = torch.tensor([[0.8, 0.1, 0.1]])
        >>> base_b = torch.tensor([[0.1, 0.1, 0.8]])
        >>> linear_fraction(mixed, base_a, base_b, 0.5, project=False).a
        tensor([[ 0.9000,  0.5000, -0.4000]])
        >>> linear_fraction(mixed, base_a, base_b, 0.5).a
        tensor([[0.7000, 0.3000, 0.0000]])
    """
    mixed, base_a, base_b, lam, dtype = _prepare(mixed, base_a, base_b, lam)
    bases, weights = torch.stack((base_a, base_b)), side_weights(lam)
    return _cast(_finish(_linear(mixed, bases, weights, project), bases, weights), dtype)


def _linear(mixed: Tensor, bases: Tensor, weights: Tensor, project: bool) -> Tensor:
    """Both sides of :func:`linear_fraction`, Tensor[2, B, C], from prepared inputs and their
    :func:`side_weights` (no checks, no cast, sides of weight 0 not reset to their base)."""
    weights = weights.unsqueeze(-1)
    # Each side uses the other side's base and weight.
    numerator = mixed - weights.flip(0) * bases.flip(0)
    if project:
        # The projection ignores a constant added to a row: shifted by its largest entry, a row
        # has its maximum at 0, the shift tau of the projection lies in [0, 1], and an entry at
        # or below -1 projects to 0 however far below it lies, so it is raised to -1. The
        # search then sees entries and breakpoints of order 1 only. Unshifted, a weight of 1e-8
        # puts the row near 1e8, where float32 cannot tell 0 from 1 (the row sums to C - 1).
        shifted = ((numerator - numerator.amax(-1, keepdim=True)) / _linear_divisor(weights)).clamp(min=-1)
        simplex = torch.stack((torch.zeros_like(shifted), torch.ones_like(shifted)))  # lo = 0, hi = 1
        pair = project_onto_bounds(shifted, simplex)
    else:
        pair = numerator / _linear_divisor(weights)
    return pair


class LinearFraction(nn.Module):
    """Module twin of :func:`linear_fraction` (the paper's OPT2).

    Args:
        project: project each estimate onto the probability simplex (default, so every row is
            a valid distribution) or return the paper's raw formula (``False``).

    Example:
        >>> fraction = LinearFraction()
        >>> mixed = torch.tensor([[0.5, 0.3, 0.2]])
        >>> fraction(mixed, mixed, mixed, 0.3).a
        tensor([[0.5000, 0.3000, 0.2000]])
    """

    def __init__(self, project: bool = True) -> None:
        super().__init__()
        self.project = bool(project)

    def forward(self, mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Union[float, Tensor]) -> Fraction:
        return linear_fraction(mixed, base_a, base_b, lam, project=self.project)

    def _split(self, mixed: Tensor, bases: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        return _linear(mixed, bases, weights, self.project), positive_weights(weights)

    def extra_repr(self) -> str:
        return f"project={self.project}"


DEFAULT_FRACTION = LinearFraction()
"""The strategy a :class:`~mkfkit.bank.KnowledgeBank` update uses unless told otherwise."""


# ---------------------------------------------------------------------------------------------
# OPT1: the QP in closed form


def qp_fraction(
    mixed: Tensor,
    base_a: Tensor,
    base_b: Tensor,
    lam: Union[float, Tensor],
    *,
    backend: str = "auto",
) -> Fraction:
    r"""Knowledge fraction by the paper's QP (OPT1), solved exactly.

    .. math::

        \min_{a, b}\; \lambda \|a - K_a\|^2 + (1 - \lambda) \|b - K_b\|^2
        \quad\text{s.t.}\quad \lambda a + (1 - \lambda) b = \tilde p,\;
        0 \le a, b \le 1,\; \textstyle\sum a = \sum b = 1.

    Eliminating ``b`` through the mixing identity leaves ``||a - (K_a + r)||^2`` (times a
    positive constant) with the residual ``r = mixed - lam * K_a - (1 - lam) * K_b``, so

    .. math::

        a = \Pi\big(K_a + r;\; lo_a, hi_a\big), \quad
        lo_a = \max\Big(0, \frac{\tilde p - (1 - \lambda)}{\lambda}\Big), \quad
        hi_a = \min\Big(1, \frac{\tilde p}{\lambda}\Big),

    where ``Pi`` is the Euclidean projection onto ``{sum = 1, lo <= x <= hi}``
    (:func:`~mkfkit._projection.project_box_simplex`: exact, ``clip(v + tau, lo, hi)`` with the
    segment of the row sum where it reaches 1 found by evaluating the row sum at every breakpoint
    for small problems, on a CPU by a fixed number of safeguarded Newton passes beyond that, by
    sorting the breakpoints otherwise, and ``tau`` by the closed form on that segment). ``b`` is
    the mirror projection of ``K_b + r`` with the roles of ``lam`` and ``1 - lam`` swapped, and
    equals ``(mixed - lam * a) / (1 - lam)``. The torch backend projects only the side of smaller
    weight and takes the other from that identity (half the search; dividing by the larger
    weight, at least 1/2, keeps the precision that dividing by a small one would lose); the
    fused kernel projects both. The constraints can hold together only for a row of ``mixed``
    on the simplex, and rows are accepted within a tolerance of it
    (:func:`~mkfkit._checks.distribution_tolerance`); both backends solve the QP for ``mixed``
    clamped to [0, 1] and scaled to sum 1, which is ``mixed`` up to rounding for a row on the
    simplex. Both rows satisfy the mixing identity with that row up to rounding, and lie on the
    simplex. When the bases are the true clean responses, ``r = 0`` and
    the bases are returned. Values are finite for every ``lam`` in [0, 1]; gradients too, except
    for ``0 < lam < sqrt(finfo.tiny)`` (about 1e-19 in float32), where the true derivative of the
    bound ``mixed / lam`` overflows.

    The gradients of ``mixed``, ``base_a`` and ``base_b`` are exact; where a side has every
    coordinate at a bound (common with two or three classes) their component along
    ``(1, ..., 1)`` is not unique, and the ``"torch"`` and ``"triton"`` backends may return
    different ones. They agree on the part tangent to the simplex (row mean removed), the only
    part a change of a probability row (or a softmax before it) sees; docs/METHOD.md,
    "Gradients on the simplex", says why they are not forced to one vector.

    Args:
        mixed: Tensor[B, C], the output on the mixed input (probability rows).
        base_a: Tensor[B, C], stored knowledge of image a (probability rows).
        base_b: Tensor[B, C], stored knowledge of image b (probability rows).
        lam: float or Tensor[B] in [0, 1], the weight of image a.
        backend: ``"torch"``, ``"triton"`` (one fused kernel launch; an error where it cannot
            run) or ``"auto"`` (Triton for CUDA tensors of dtype float32/bfloat16/float16 when
            it is available, torch otherwise); see :func:`mkfkit.kernels.use_triton`.

    Returns:
        :class:`Fraction` with ``a, b``: Tensor[B, C] in the dtype of ``mixed``;
        ``mask_a = lam >= finfo.tiny``, ``mask_b = lam < 1`` (:func:`positive_weights`; a side
        of weight 0 keeps its base).

    Example:
        >>> mixed = torch.tensor([[0.5, 0.3, 0.2]])
        >>> base_a = torch.tensor([[0.8, 0.1, 0.1]])
        >>> base_b = torch.tensor([[0.1, 0.1, 0.8]])
        >>> a, b, mask_a, mask_b = qp_fraction(mixed, base_a, base_b, 0.5)
        >>> a, b
        (tensor([[0.7750, 0.2250, 0.0000]]), tensor([[0.2250, 0.3750, 0.4000]]))
        >>> 0.5 * a + 0.5 * b
        tensor([[0.5000, 0.3000, 0.2000]])
    """
    check_choice(backend, "backend", kernels.BACKENDS)
    mixed, base_a, base_b, lam, dtype = _prepare(mixed, base_a, base_b, lam)
    bases, weights = torch.stack((base_a, base_b)), side_weights(lam)
    return _cast(_finish(_qp(mixed, bases, weights, backend), bases, weights), dtype)


def _qp(mixed: Tensor, bases: Tensor, weights: Tensor, backend: str) -> Tensor:
    """Both sides of :func:`qp_fraction`, Tensor[2, B, C], from prepared inputs and their
    :func:`side_weights` (no checks, no cast, sides of weight 0 not reset to their base): here,
    and only here, the exact QP chooses between torch and its fused kernel."""
    if kernels.use_triton(backend, mixed.device, preferred=mixed.dtype != torch.float64):
        from mkfkit.kernels.qp import qp_pair  # imports Triton

        return torch.stack(qp_pair(mixed, *bases, weights[0]))
    target = _feasible_target(mixed)
    weights = weights.unsqueeze(-1)  # Tensor[2, B, 1]
    # Project the side of smaller weight and take the other from the mixing identity: half the
    # search of projecting both. Dividing by the larger weight (at least 1/2) amplifies the
    # lighter side's rounding at most twofold; the clamp only removes rounding (the lighter
    # side's box keeps the other in [0, 1]).
    lighter = weights[0] <= weights[1]  # Tensor[B, 1]: side a is the lighter one
    v, bounds, weight, other_weight = _qp_side(target, bases, weights, lighter)
    light = project_onto_bounds(v, bounds)
    heavy = torch.addcmul(target, weight, light, value=-1).div_(other_weight).clamp_(0, 1)
    return torch.stack((torch.where(lighter, light, heavy), torch.where(lighter, heavy, light)))


class QPFraction(nn.Module):
    """Module twin of :func:`qp_fraction` (the paper's OPT1); arguments as there.

    Example:
        >>> fraction = QPFraction()
        >>> mixed = torch.tensor([[0.5, 0.3, 0.2]])
        >>> fraction(mixed, mixed, mixed, 0.3).b
        tensor([[0.5000, 0.3000, 0.2000]])
    """

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        self.backend = kernels.check_backend(backend)

    def forward(self, mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Union[float, Tensor]) -> Fraction:
        return qp_fraction(mixed, base_a, base_b, lam, backend=self.backend)

    def _split(self, mixed: Tensor, bases: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        return _qp(mixed, bases, weights, self.backend), positive_weights(weights)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


def _feasible_target(mixed: Tensor) -> Tensor:
    """``mixed`` clamped to [0, 1] and scaled to sum to 1 in every row (Tensor[B, C]).

    The QP's constraints (the mixing identity and two rows on the simplex) can hold together
    only for a row of ``mixed`` on the simplex, and rows are accepted within a tolerance of it
    (:func:`~mkfkit._checks.distribution_tolerance`, up to 0.016 for bfloat16). The QP is
    solved for this row instead; on the simplex it is ``mixed`` up to rounding. The fused
    kernel (:mod:`mkfkit.kernels.qp`) makes the same row.
    """
    target = mixed.clamp(0, 1)
    return target / target.sum(-1, keepdim=True)


def _qp_side(
    target: Tensor, bases: Tensor, weights: Tensor, side_a: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What the exact QP projects for one side of each pair: side a where ``side_a`` (bool
    Tensor[B, 1]) holds, side b elsewhere.

    ``target``: :func:`_feasible_target`; ``bases``, ``weights``: both sides stacked (Tensor[2,
    B, C] and Tensor[2, B, 1], the :func:`side_weights` as a column). Returns the point,
    Tensor[B, C], its box, Tensor[2, B, C] (``lo``, then ``hi``), and the weights of the side and
    of its partner, Tensor[B, 1] each.
    """
    weight, other_weight = torch.where(side_a, weights, weights.flip(0))
    # base + residual, with residual = target - lam * base_a - (1 - lam) * base_b.
    v = torch.where(side_a, *bases) + (target - torch.lerp(bases[1], bases[0], weights[0]))
    # 0 <= other side <= 1 under the mixing identity, written as bounds on this side. The ratios
    # stay O(1) even for tiny weights (target is then tiny too), so divide exactly; a side of
    # weight 0 or subnormal (which counts as 0, see positive_weights) divides by finfo.tiny
    # (finite quotients) and is replaced by its base afterwards. Rounding can overshoot [0, 1].
    divisor = weight.clamp_min(torch.finfo(weight.dtype).tiny)
    bounds = torch.stack((target - other_weight, target)).div_(divisor).clamp_(0, 1)
    return v, bounds, weight, other_weight


# ---------------------------------------------------------------------------------------------
# "No OPT": dominant assignment


def dominant_fraction(
    mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Union[float, Tensor]
) -> Fraction:
    """Assign the whole mixed output to the image of larger weight (the paper's "No OPT").

    ``a = mixed`` and ``mask_a = True`` where ``lam >= 0.5``; ``b = mixed`` and
    ``mask_b = True`` where ``lam < 0.5``. The other side keeps its base and its mask is
    ``False``: a knowledge bank skips its update, so that image's knowledge is left as it was.

    Args:
        mixed: Tensor[B, C], the output on the mixed input (probability rows).
        base_a: Tensor[B, C], stored knowledge of image a (probability rows).
        base_b: Tensor[B, C], stored knowledge of image b (probability rows).
        lam: float or Tensor[B] in [0, 1], the weight of image a.

    Returns:
        :class:`Fraction` with ``a, b``: Tensor[B, C] in the dtype of ``mixed``.

    Example:
        >>> mixed = torch.tensor([[0.5, 0.5]])
        >>> base = torch.tensor([[1.0, 0.0]])
        >>> dominant_fraction(mixed, base, base, 0.7)
        Fraction(a=tensor([[0.5000, 0.5000]]), b=tensor([[1., 0.]]), mask_a=tensor([True]), mask_b=tensor([False]))
    """
    mixed, base_a, base_b, lam, dtype = _prepare(mixed, base_a, base_b, lam)
    masks = _dominant_masks(lam)
    a, b = torch.where(masks.unsqueeze(-1), mixed, torch.stack((base_a, base_b)))
    return _cast(Fraction(a, b, *masks), dtype)


def _dominant_masks(lam: Tensor) -> Tensor:
    """bool Tensor[2, B]: the side that takes the mixed output, a where ``lam >= 0.5``, else b."""
    mask_a = lam >= 0.5
    return torch.stack((mask_a, ~mask_a))


class DominantFraction(nn.Module):
    """Module twin of :func:`dominant_fraction` (the paper's "No OPT" ablation).

    Example:
        >>> mixed = torch.tensor([[0.5, 0.5]])
        >>> DominantFraction()(mixed, mixed, mixed, 0.2).mask_b
        tensor([True])
    """

    def forward(self, mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Union[float, Tensor]) -> Fraction:
        return dominant_fraction(mixed, base_a, base_b, lam)

    def _split(self, mixed: Tensor, bases: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        return mixed.expand_as(bases), _dominant_masks(weights[0])


_BUILT_IN = (LinearFraction, QPFraction, DominantFraction)
"""The strategies whose rows :func:`split_unchecked` trusts without looking at them."""
