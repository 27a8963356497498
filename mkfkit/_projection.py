"""Exact Euclidean projection of rows onto a box-constrained simplex, in plain torch.

For a row ``v`` and bounds ``lo <= hi`` the projection

.. math::

    x^\\star = \\arg\\min_x \\|x - v\\|^2 \\quad \\text{s.t.} \\quad
    \\textstyle\\sum_i x_i = 1,\\; lo_i \\le x_i \\le hi_i

has the form ``x_i = clip(v_i + tau, lo_i, hi_i)`` for one scalar ``tau`` per row. The row sum
``g(tau) = sum_i clip(v_i + tau, lo_i, hi_i)`` is piecewise linear and non-decreasing, with
breakpoints ``lo_i - v_i`` (coordinate ``i`` leaves its lower bound) and ``hi_i - v_i`` (it
reaches its upper bound). Sorting the ``2C`` breakpoints of every row gives ``g`` at all of them
by one cumulative sum; the segment where ``g`` crosses 1 fixes which coordinates sit at ``lo``
(set ``L``), at ``hi`` (set ``U``) or strictly inside (the free set ``F``). On that segment

.. math::

    \\tau = \\frac{1 - \\sum_{L} lo_i - \\sum_{U} hi_i - \\sum_{F} v_i}{|F|}

exactly. The sort runs without autograd; ``tau`` is then evaluated by this closed form, so
autograd differentiates the projection exactly: on the free set the Jacobian with respect to
``v`` is ``I - 11^T / |F|``, zero elsewhere, and the bounds of the clamped coordinates enter
through ``tau`` (with ``lo_i``/``hi_i`` passed straight through on their own coordinate).

Cost: one sort of ``Tensor[B, 2C]`` and a few elementwise passes; no Python loop over rows and
no host-device synchronisation, so it runs on any device and under CUDA graphs.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["project_box_simplex"]


def project_box_simplex(v: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Project every row of ``v`` onto ``{x : sum(x) = 1, lo <= x <= hi}``.

    Args:
        v: Tensor[B, C], the points to project (floating point).
        lo: Tensor[B, C], lower bounds, with ``lo <= hi``.
        hi: Tensor[B, C], upper bounds.

    Returns:
        Tensor[B, C], the Euclidean projection of each row (dtype and device of ``v``).

    A row whose box cannot reach a sum of 1 is mapped to its nearest corner: ``hi`` when
    ``sum(hi) < 1``, ``lo`` when ``sum(lo) > 1``. A row whose every coordinate sits at a bound
    (an empty free set) is fully determined by the bounds; its value and gradient stay finite.
    This is an internal helper: arguments are trusted, the caller validates them.

    Example:
        >>> v = torch.tensor([[0.8, 0.5, -0.1]])
        >>> zeros, ones = torch.zeros_like(v), torch.ones_like(v)
        >>> project_box_simplex(v, zeros, ones)
        tensor([[0.6500, 0.3500, 0.0000]])
    """
    with torch.no_grad():
        free, upper = _active_sets(v.detach(), lo.detach(), hi.detach())
    bound_value = torch.where(upper, hi, lo)
    # Sum over the clamped coordinates and over the free ones, in one expression so that
    # autograd sees tau as a function of v, lo and hi on exactly the right coordinates.
    clamped_sum = torch.where(free, torch.zeros_like(bound_value), bound_value).sum(-1, keepdim=True)
    free_sum = torch.where(free, v, torch.zeros_like(v)).sum(-1, keepdim=True)
    free_count = free.sum(-1, keepdim=True).to(v.dtype)
    has_free = free_count > 0
    # An empty free set leaves tau undefined but unused; divide by 1 there to keep gradients finite.
    tau = torch.where(has_free, (1 - clamped_sum - free_sum) / torch.where(has_free, free_count, 1), 0)
    moved = v + tau
    # Rounding can push a free coordinate past its bound by an ulp: clamp the value (so outputs
    # are never negative probabilities) while keeping the exact free-set derivative.
    moved = moved + (torch.minimum(torch.maximum(moved, lo), hi) - moved).detach()
    return torch.where(free, moved, bound_value)


def _active_sets(v: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Boolean masks (free, at upper bound) of the projection, found by sorting breakpoints."""
    enter = lo - v  # tau beyond which coordinate i leaves lo
    leave = hi - v  # tau beyond which coordinate i sits at hi
    breakpoints, order = torch.cat([enter, leave], dim=-1).sort(dim=-1)
    # Slope of g changes by +1 at an `enter` breakpoint and by -1 at a `leave` breakpoint.
    num_classes = v.shape[-1]
    step = torch.where(order < num_classes, 1.0, -1.0).to(v.dtype)
    slope = step.cumsum(-1)  # slope of g just after each sorted breakpoint
    rise = slope[..., :-1] * breakpoints.diff(dim=-1)
    g_at_breakpoints = lo.sum(-1, keepdim=True) + torch.cat(
        [torch.zeros_like(rise[..., :1]), rise.cumsum(-1)], dim=-1
    )
    # Number of breakpoints already passed when g reaches 1: the last one with g <= 1 (ties
    # included, so the segment that follows has a positive slope unless the row is degenerate).
    target = torch.ones_like(g_at_breakpoints[..., :1])
    passed = torch.searchsorted(g_at_breakpoints.contiguous(), target, right=True)
    # tau lies on the segment after breakpoint `passed - 1`; with none passed every coordinate is
    # at its lower bound (sum(lo) > 1), which the -inf reference expresses.
    reference = breakpoints.gather(-1, (passed - 1).clamp_min(0))
    reference = torch.where(passed > 0, reference, torch.full_like(reference, -float("inf")))
    upper = leave <= reference
    free = (enter <= reference) & ~upper
    return free, upper
