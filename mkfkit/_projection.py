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

exactly. The search for the sets runs without autograd; ``tau`` is then evaluated by this closed
form, so autograd differentiates the projection exactly: on the free set the Jacobian with
respect to ``v`` is ``I - 11^T / |F|``, zero elsewhere, and the bounds of the clamped
coordinates enter through ``tau`` (with ``lo_i``/``hi_i`` passed straight through on their own
coordinate).

**Finding the active sets.** Two searches give the same sets, up to ties: where ``tau`` falls on a
breakpoint, a coordinate exactly at its bound may be called free by one and clamped by the other.
The projection is the same either way; its gradient is then one of two valid one-sided
derivatives (such kinks are structural with two classes, rare otherwise).

- ``"sort"``: one sort of ``Tensor[B, 2C]`` and a few elementwise passes; no Python loop over
  rows and no host-device synchronisation, so it runs on any device, under CUDA graphs and under
  ``torch.compile``.
- ``"newton"``: a safeguarded Newton iteration on ``g(tau) = 1``, the algorithm of the fused
  Triton kernel (see :mod:`mkfkit._triton`): each pass evaluates ``g``, the number of free and of
  upper-bound coordinates at the current ``tau`` and steps to the root of the current linear
  piece, ``tau - (g(tau) - 1) / |F|``, bisecting a bracket instead when that step would leave it
  or the piece is flat; it stops once a Newton step lands in the piece it came from or no longer
  moves ``tau``. The exact QP's rows need 3 to 5 passes of a few elementwise operations (raw OPT2
  estimates up to about 10), against the ``O(C log C)`` sort, but the loop asks
  the host after every pass whether all rows have stopped. On the CPU that question is free,
  rows that have stopped are set aside once they are the majority, and the search is 2-8x faster
  than the sort on large problems (benchmarks/RESULTS.md); on an accelerator each pass would
  cost a synchronisation, so the sort stays there.

``"auto"`` (the default) takes the Newton search for CPU tensors of at least
``_NEWTON_MIN_CLASSES`` columns and ``_NEWTON_MIN_ELEMENTS`` entries outside ``torch.compile``,
and the sort otherwise: on short rows the sort is cheap, and on small problems the iteration's
per-operation overhead costs more than the sort.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["project_box_simplex"]

_SEARCHES = ("auto", "sort", "newton")
# On a CPU (one thread, benchmarks/bench_projection.py) the sort wins on short rows (2-4x at
# C = 10 for every batch) and on small batches, where the iteration's fixed cost per pass
# dominates. From these sizes on the iteration wins on the exact QP's rows (1.2-1.4x near the
# threshold, 4-8x at 128 or more rows of C >= 1000). Rows far outside their box (raw OPT2
# estimates) take about twice the passes, so there the sort stays up to 1.6x faster until about
# 32,768 entries; the threshold serves the exact QP.
_NEWTON_MIN_CLASSES = 32
_NEWTON_MIN_ELEMENTS = 8192
# Cap on the passes of the Newton search (here and in the Triton kernel): bisection alone
# shrinks a bracket to rounding level in about 25 (float32) or 54 (float64).
_MAX_PASSES = {torch.float32: 64, torch.float64: 128}


def project_box_simplex(v: Tensor, lo: Tensor, hi: Tensor, *, search: str = "auto") -> Tensor:
    """Project every row of ``v`` onto ``{x : sum(x) = 1, lo <= x <= hi}``.

    Args:
        v: Tensor[..., C], the points to project (floating point).
        lo: Tensor[..., C], lower bounds, with ``lo <= hi`` (the shape of ``v``).
        hi: Tensor[..., C], upper bounds (the shape of ``v``).
        search: how the active sets are found: ``"sort"``, ``"newton"`` or ``"auto"`` (see the
            module docstring). The result does not depend on it beyond rounding.

    Returns:
        Tensor[..., C], the Euclidean projection of each row (dtype and device of ``v``).

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
        find = _active_sets_by_newton if _use_newton(v, search) else _active_sets_by_sort
        rows = [t.detach().reshape(-1, v.shape[-1]) for t in (v, lo, hi)]  # any leading shape
        free, upper = (mask.view(v.shape) for mask in find(*rows))
    # v on the free coordinates and the active bound elsewhere: its row sum is
    # sum_F v + sum_L lo + sum_U hi, so autograd sees tau as a function of v, lo and hi on exactly
    # the right coordinates.
    pinned = torch.where(free, v, torch.where(upper, hi, lo))
    free_count = free.sum(-1, keepdim=True, dtype=v.dtype)
    # An empty free set leaves tau undefined but unused (no coordinate adds it, so no gradient
    # reaches it either): divide by 1 there to keep it finite.
    tau = (1 - pinned.sum(-1, keepdim=True)) / free_count.clamp_min(1)
    x = torch.where(free, pinned + tau, pinned)
    # Rounding can push a free coordinate past its bound by an ulp: clamp the value (so outputs
    # are never negative probabilities) while keeping the exact free-set derivative.
    with torch.no_grad():
        overshoot = torch.clamp(x, lo, hi) - x
    return x + overshoot


def _use_newton(v: Tensor, search: str) -> bool:
    if search == "auto":
        return (
            v.device.type == "cpu"
            and v.shape[-1] >= _NEWTON_MIN_CLASSES
            and v.numel() >= _NEWTON_MIN_ELEMENTS
            and not torch.compiler.is_compiling()
        )
    if search not in _SEARCHES:
        raise ValueError(f"`search` must be one of {_SEARCHES}, but got {search!r}")
    return search == "newton"


def _active_sets_by_sort(v: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Boolean masks (free, at upper bound) of the projection, found by sorting breakpoints."""
    enter = lo - v  # tau beyond which coordinate i leaves lo
    leave = hi - v  # tau beyond which coordinate i sits at hi
    breakpoints, order = torch.cat([enter, leave], dim=-1).sort(dim=-1)
    # Slope of g changes by +1 at an `enter` breakpoint and by -1 at a `leave` breakpoint.
    num_classes = v.shape[-1]
    slope = (order < num_classes).to(v.dtype).mul_(2).sub_(1).cumsum_(-1)  # just after each one
    # g rises by `rise` between consecutive breakpoints, from g = sum(lo) at the first one.
    rise = slope[..., :-1] * breakpoints.diff(dim=-1)
    headroom = 1 - lo.sum(-1, keepdim=True)
    # Number of breakpoints already passed when g reaches 1: those with g <= 1 (g is
    # non-decreasing; ties count, so the segment that follows has a positive slope unless the
    # row is degenerate).
    passed = (rise.cumsum_(-1) <= headroom).sum(-1, keepdim=True) + (headroom >= 0)
    # tau lies on the segment after breakpoint `passed - 1`; with none passed every coordinate is
    # at its lower bound (sum(lo) > 1), which the -inf reference expresses.
    reference = breakpoints.gather(-1, (passed - 1).clamp_min(0))
    reference = reference.masked_fill(passed == 0, -float("inf"))
    upper = leave <= reference
    free = (enter <= reference) & ~upper
    return free, upper


def _active_sets_by_newton(v: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Boolean masks (free, at upper bound) of the projection, by safeguarded Newton steps."""
    num_classes = v.shape[-1]
    eps = torch.finfo(v.dtype).eps
    free_out = torch.zeros_like(v, dtype=torch.bool)
    upper_out = torch.zeros_like(free_out)
    # g(t_lo) = sum(lo) <= 1 <= sum(hi) = g(t_hi) on a feasible row.
    t_lo, t_hi = (lo - v).amin(-1), (hi - v).amax(-1)
    sum_lo, sum_hi = lo.sum(-1), hi.sum(-1)
    # A row whose box cannot reach a sum of 1 is done at its nearest corner (all at hi or lo).
    done = (sum_hi <= 1) | (sum_lo >= 1)
    unbounded = (1 - v.sum(-1)) / num_classes  # the root when no bound is active
    tau = torch.where(sum_hi <= 1, t_hi, torch.where(sum_lo >= 1, t_lo, unbounded.clamp(t_lo, t_hi)))
    scale = torch.maximum(torch.maximum(t_lo.abs(), t_hi.abs()), torch.ones_like(t_lo))
    was_newton = torch.zeros_like(done)
    previous_free = previous_upper = torch.full_like(tau, -1, dtype=torch.int32)
    rows = torch.arange(v.shape[0], device=v.device)  # the working rows' places in the batch
    for _ in range(_MAX_PASSES.get(v.dtype, _MAX_PASSES[torch.float32])):
        shifted = v + tau[:, None]
        excess = torch.clamp(shifted, lo, hi).sum(-1) - 1
        upper = shifted >= hi
        free = (shifted > lo) & ~upper
        # int32 counts: summing booleans into the default int64 costs 5x more on a CPU.
        n_free, n_upper = free.sum(-1, dtype=torch.int32), upper.sum(-1, dtype=torch.int32)
        # Counts unchanged after a Newton step: no coordinate crossed a bound (a step moves all
        # coordinates the same way), so tau is the root of its own piece.
        same_piece = was_newton & (n_free == previous_free) & (n_upper == previous_upper)
        # A flat piece whose sum is 1 up to rounding: any tau on it gives the same answer.
        flat_root = (n_free == 0) & (excess.abs() <= 4 * eps)
        newton = tau - excess / n_free.clamp_min(1).to(tau.dtype)
        # A Newton step too small to change tau: the root to working precision (bisecting on
        # would only shrink the bracket around it).
        stalled = (n_free > 0) & (newton == tau)
        narrow = t_hi - t_lo <= 2 * eps * scale
        done = done | (excess == 0) | same_piece | flat_root | stalled | narrow
        finished = int(done.sum())
        if finished == len(rows):
            break
        if 2 * finished >= len(rows):
            # Most rows are done: record them and iterate on the rest only.
            free_out[rows[done]], upper_out[rows[done]] = free[done], upper[done]
            keep = ~done
            (rows, v, lo, hi, free, upper, tau, newton, t_lo, t_hi, scale, excess, n_free, n_upper,
             done) = (t[keep] for t in (rows, v, lo, hi, free, upper, tau, newton, t_lo, t_hi, scale,
                                        excess, n_free, n_upper, done))
        t_lo = torch.where(excess < 0, torch.maximum(t_lo, tau), t_lo)
        t_hi = torch.where(excess > 0, torch.minimum(t_hi, tau), t_hi)
        was_newton = (n_free > 0) & (newton > t_lo) & (newton < t_hi)
        tau = torch.where(done, tau, torch.where(was_newton, newton, (t_lo + t_hi) / 2))
        previous_free, previous_upper = n_free, n_upper
    free_out[rows], upper_out[rows] = free, upper
    return free_out, upper_out
