"""Exact Euclidean projection of rows onto a box-constrained simplex, in plain torch.

For a row ``v`` and bounds ``lo <= hi`` the projection

.. math::

    x^\\star = \\arg\\min_x \\|x - v\\|^2 \\quad \\text{s.t.} \\quad
    \\textstyle\\sum_i x_i = 1,\\; lo_i \\le x_i \\le hi_i

has the form ``x_i = clip(v_i + tau, lo_i, hi_i)`` for one scalar ``tau`` per row. The row sum
``g(tau) = sum_i clip(v_i + tau, lo_i, hi_i)`` is piecewise linear and non-decreasing, with
breakpoints ``lo_i - v_i`` (coordinate ``i`` leaves its lower bound) and ``hi_i - v_i`` (it
reaches its upper bound). The segment where ``g`` crosses 1 fixes which coordinates sit at ``lo``
(set ``L``), at ``hi`` (set ``U``) or strictly inside (the free set ``F``). On that segment

.. math::

    \\tau = \\frac{1 - \\sum_{L} lo_i - \\sum_{U} hi_i - \\sum_{F} v_i}{|F|}

exactly. A search (below) finds the sets, and ``tau`` by this closed form (the Newton search's
last step solves it on its piece); no autograd runs. The Jacobian is written out, and it is exact: ``x_F = v_F + tau``, ``x_L = lo_L``, ``x_U = hi_U``, so each of
``v``, ``lo`` and ``hi`` receives, on the coordinates where it is the active value, the output
gradient minus its mean over ``F`` (``I - 11^T / |F|`` on the free set for ``v``). The
Jacobian is piecewise constant, so second derivatives are zero, and double backward works.

**Finding the active sets.** The searches give the same sets, up to ties: where ``tau`` falls on
a breakpoint, a coordinate exactly at its bound may be called free by one and clamped by
another. The projection is the same either way; its gradient is then one of two valid one-sided
derivatives (such kinks are structural with two classes, rare otherwise).

- ``"sort"``: one sort of ``Tensor[R, 2C]`` gives ``g`` at every breakpoint by one cumulative
  sum; a few elementwise passes follow. ``O(C log C)`` per row, no Python loop over rows and no
  host-device synchronisation, so it runs on any device, under CUDA graphs and under
  ``torch.compile``.
- ``"table"``: ``g`` evaluated directly at all ``2C`` breakpoints of a row, a
  ``Tensor[R, 2C, C]``. ``O(C^2)`` per row, but about half the operations of the sort and no
  sort at all, which on a CPU costs about 50 ns per element (benchmarks/RESULTS.md). Sync-free
  like the sort.
- ``"newton"``: a safeguarded Newton iteration on ``g(tau) = 1``, the algorithm of the fused
  Triton kernel (see :mod:`mkfkit._triton`): each pass evaluates ``g``, the number of free and of
  upper-bound coordinates at the current ``tau`` and steps to the root of the current linear
  piece, ``tau - (g(tau) - 1) / |F|``, bisecting a bracket instead when that step would leave it
  or the piece is flat. It stops once a Newton step lands in the piece it came from, no longer
  moves ``tau``, or ``|g(tau) - 1|`` is at rounding level (4 eps; the kernel asks this only of
  flat pieces). The exact QP's rows need 3 to 5 passes of a few elementwise operations (raw OPT2
  estimates up to about 10), but the loop asks the host after every pass whether all rows have
  stopped. On the CPU that question is free, rows that have stopped are set aside once they are
  the majority, and the search wins on large problems; on an accelerator each pass would cost a
  synchronisation, so it is never chosen there.

``"auto"`` (the default) takes the table while it holds at most ``_TABLE_MAX_ENTRIES`` entries
(any device), then the Newton search for CPU tensors of at least ``_NEWTON_MIN_CLASSES`` columns
and ``_NEWTON_MIN_ELEMENTS`` entries outside ``torch.compile``, and the sort otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["project_box_simplex"]

_SEARCHES = ("auto", "sort", "newton", "table")
# Chosen on a CPU with one thread (benchmarks/bench_projection.py, benchmarks/RESULTS.md), for the
# exact QP's rows. The table beats the sort at every size up to about 2**20 entries (0.6-0.9x of
# its time), e.g. B = 64 pairs of C = 64 or B = 512 of C = 16, and the Newton search too, which
# pays a fixed cost per pass; beyond it the table's C^2 work shows (1.2-1.3x the sort's time at
# 2-3 million entries). Newton then wins from C = 32 and 8,192 entries on (4-8x at 128 or more
# rows of C >= 1000). Rows far outside their box (raw OPT2 estimates) take about twice the
# passes, so there the sort can stay faster near the threshold; it serves the exact QP.
_TABLE_MAX_ENTRIES = 2**20
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
        search: how the active sets are found: ``"sort"``, ``"table"``, ``"newton"`` or
            ``"auto"`` (see the module docstring). The result does not depend on it beyond rounding.

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
    return _BoxSimplexProjection.apply(v, lo, hi, _FINDERS[_pick_search(v, search)])


class _BoxSimplexProjection(torch.autograd.Function):
    """The projection, with the search's sets and its exact Jacobian (module docstring)."""

    @staticmethod
    def forward(ctx, v: Tensor, lo: Tensor, hi: Tensor, find) -> Tensor:
        free, upper, tau = find(*(t.reshape(-1, v.shape[-1]) for t in (v, lo, hi)))  # any leading shape
        free, upper = free.view(v.shape), upper.view(v.shape)
        bounds = torch.where(upper, hi, lo)
        if tau is None:
            # The closed form on the sets' segment: the free coordinates take up what the bounds
            # leave of 1. An empty free set leaves tau undefined but unused: divide by 1 there.
            count = free.sum(-1, keepdim=True, dtype=torch.int32).clamp_min(1)
            tau = (1 - torch.where(free, v, bounds).sum(-1, keepdim=True)) / count
        x = torch.where(free, v + tau.view(*v.shape[:-1], 1), bounds)
        ctx.save_for_backward(free, upper)
        # Rounding can push a free coordinate past its bound by an ulp: clamp the value, so outputs
        # are never negative probabilities (the Jacobian stays that of the free set).
        return x.clamp_(lo, hi)

    @staticmethod
    def backward(ctx, grad: Tensor):
        free, upper = ctx.saved_tensors
        # x = v + tau on F, lo on L, hi on U, with tau = (1 - sum_F v - sum_L lo - sum_U hi) / |F|:
        # each input receives, on the coordinates where it is the active value, the output
        # gradient minus its mean over F (no mean when F is empty: tau is then unused).
        count = free.sum(-1, keepdim=True, dtype=grad.dtype).clamp_min(1)
        centred = grad - torch.where(free, grad, 0).sum(-1, keepdim=True) / count
        needs_v, needs_lo, needs_hi = ctx.needs_input_grad[:3]
        return (
            torch.where(free, centred, 0) if needs_v else None,
            torch.where(free | upper, 0, centred) if needs_lo else None,
            torch.where(upper, centred, 0) if needs_hi else None,
            None,
        )


def _pick_search(v: Tensor, search: str) -> str:
    """The search ``search`` names, or for ``"auto"`` the one expected to be fastest for ``v``."""
    if search == "auto":
        if 2 * v.numel() * v.shape[-1] <= _TABLE_MAX_ENTRIES:
            return "table"
        newton = (
            v.device.type == "cpu"
            and v.shape[-1] >= _NEWTON_MIN_CLASSES
            and v.numel() >= _NEWTON_MIN_ELEMENTS
            and not torch.compiler.is_compiling()
        )
        return "newton" if newton else "sort"
    if search not in _SEARCHES:
        raise ValueError(f"`search` must be one of {_SEARCHES}, but got {search!r}")
    return search


def _active_sets_by_sort(v: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, None]:
    """Masks (free, at upper bound) of the projection, found by sorting breakpoints (tau: None,
    the closed form)."""
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
    return _sets_after(reference, enter, leave)


def _active_sets_by_table(v: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, None]:
    """Masks (free, at upper bound) of the projection, from g at every breakpoint (tau: None)."""
    enter, leave = lo - v, hi - v
    breakpoints = torch.cat([enter, leave], dim=-1)
    # g(b) - 1 = sum_i clip(b, enter_i, leave_i) + sum(v) - 1 at each breakpoint b: Tensor[R, 2C].
    excess = torch.clamp(breakpoints[:, :, None], enter[:, None, :], leave[:, None, :]).sum(-1)
    excess += v.sum(-1, keepdim=True) - 1
    # The last breakpoint with g <= 1 (g is non-decreasing), as the sort finds it; -inf when g > 1
    # at every breakpoint (sum(lo) > 1).
    reference = breakpoints.masked_fill(excess > 0, -float("inf")).amax(-1, keepdim=True)
    return _sets_after(reference, enter, leave)


def _sets_after(reference: Tensor, enter: Tensor, leave: Tensor) -> tuple[Tensor, Tensor, None]:
    """Masks for a root on the segment after breakpoint ``reference`` (Tensor[R, 1]); no tau."""
    upper = leave <= reference
    free = (enter <= reference) & ~upper
    return free, upper, None


def _active_sets_by_newton(v: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Masks (free, at upper bound) and tau of the projection, by safeguarded Newton steps."""
    num_classes = v.shape[-1]
    eps = torch.finfo(v.dtype).eps
    free_out = torch.zeros_like(v, dtype=torch.bool)
    upper_out = torch.zeros_like(free_out)
    tau_out = v.new_empty(v.shape[0])
    # Coordinate i is free for enter_i < tau < leave_i, and g(tau) - 1 is
    # sum_i clip(tau, enter_i, leave_i) + offset: the loop never needs v, lo, hi themselves.
    enter, leave = lo - v, hi - v
    offset = v.sum(-1) - 1
    # g(t_lo) = sum(lo) <= 1 <= sum(hi) = g(t_hi) on a feasible row.
    t_lo, t_hi = enter.amin(-1), leave.amax(-1)
    sum_lo, sum_hi = lo.sum(-1), hi.sum(-1)
    # A row whose box cannot reach a sum of 1 is done at its nearest corner (all at hi or lo).
    done = (sum_hi <= 1) | (sum_lo >= 1)
    unbounded = -offset / num_classes  # the root when no bound is active
    tau = torch.where(sum_hi <= 1, t_hi, torch.where(sum_lo >= 1, t_lo, unbounded.clamp(t_lo, t_hi)))
    narrow = 2 * eps * torch.maximum(torch.maximum(t_lo.abs(), t_hi.abs()), torch.ones_like(t_lo))
    was_newton = torch.zeros_like(done)
    previous_free = previous_upper = torch.full_like(tau, -1, dtype=torch.int32)
    rows = torch.arange(v.shape[0], device=v.device)  # the working rows' places in the batch
    for _ in range(_MAX_PASSES.get(v.dtype, _MAX_PASSES[torch.float32])):
        at = tau[:, None]
        excess = torch.clamp(at, enter, leave).sum(-1) + offset
        upper = at >= leave
        free = (at > enter) & ~upper
        # int32 counts: summing booleans into the default int64 costs 5x more on a CPU.
        n_free, n_upper = free.sum(-1, dtype=torch.int32), upper.sum(-1, dtype=torch.int32)
        # The root of the current linear piece. With no free coordinate it is infinite or NaN,
        # which the bracket tests below reject, so the count needs no clamp.
        newton = tau - excess / n_free
        done = (
            done
            # Counts unchanged after a Newton step: no coordinate crossed a bound (a step moves
            # all coordinates the same way), so tau is the root of its own piece.
            | (was_newton & (n_free == previous_free) & (n_upper == previous_upper))
            # The root to working precision: a step too small to change tau, a sum that is 1 up
            # to rounding (on a flat piece any such tau gives the same answer), or a bracket
            # that bisecting on would only shrink around it.
            | (newton == tau)
            | (excess.abs() <= 4 * eps)
            | (t_hi - t_lo <= narrow)
        )
        working = (~done).nonzero().squeeze(1)
        if len(working) == 0:
            break
        if 2 * len(working) <= len(rows):
            # Most rows are done: record every row (the working ones are overwritten later) and
            # iterate on the working rows only.
            _record(rows, (free_out, upper_out, tau_out), (free, upper, _root(tau, newton, t_lo, t_hi)))
            (rows, enter, leave, free, upper, offset, tau, newton, t_lo, t_hi, narrow, excess,
             n_free, n_upper, done) = (
                t.index_select(0, working)
                for t in (rows, enter, leave, free, upper, offset, tau, newton, t_lo, t_hi, narrow,
                          excess, n_free, n_upper, done)
            )
        # tau always lies in [t_lo, t_hi], so it becomes the new end on its side of the root.
        t_lo = torch.where(excess < 0, tau, t_lo)
        t_hi = torch.where(excess > 0, tau, t_hi)
        was_newton = (newton > t_lo) & (newton < t_hi)
        tau = torch.where(done, tau, torch.where(was_newton, newton, torch.lerp(t_lo, t_hi, 0.5)))
        previous_free, previous_upper = n_free, n_upper
    _record(rows, (free_out, upper_out, tau_out), (free, upper, _root(tau, newton, t_lo, t_hi)))
    return free_out, upper_out, tau_out


def _root(tau: Tensor, newton: Tensor, t_lo: Tensor, t_hi: Tensor) -> Tensor:
    """tau of finished rows: the Newton step from tau, which solves the closed form on tau's
    piece, where it stays in the bracket; tau itself otherwise (a step without free coordinates
    is infinite or NaN, and tau is then unused)."""
    return torch.where((newton >= t_lo) & (newton <= t_hi), newton, tau)


def _record(rows: Tensor, outputs: tuple[Tensor, ...], values: tuple[Tensor, ...]) -> None:
    for output, value in zip(outputs, values):
        output.index_copy_(0, rows, value)


_FINDERS = {"sort": _active_sets_by_sort, "newton": _active_sets_by_newton, "table": _active_sets_by_table}
