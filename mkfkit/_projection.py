"""Exact Euclidean projection of rows onto a box-constrained simplex, in plain torch.

For a row ``v`` and bounds ``lo <= hi`` the projection

.. math::

    x^\\star = \\arg\\min_x \\|x - v\\|^2 \\quad \\text{s.t.} \\quad
    \\textstyle\\sum_i x_i = 1,\\; lo_i \\le x_i \\le hi_i

has the form ``x_i = clip(v_i + tau, lo_i, hi_i)`` for one scalar ``tau`` per row. The row sum
``g(tau) = sum_i clip(v_i + tau, lo_i, hi_i)`` is piecewise linear and non-decreasing, with
breakpoints ``lo_i - v_i`` (coordinate ``i`` leaves its lower bound) and ``hi_i - v_i`` (it
reaches its upper bound). On the segment where ``g`` crosses 1 the coordinates at ``lo`` (set
``L``), at ``hi`` (set ``U``) and strictly inside (the free set ``F``) are fixed, ``g`` has
slope ``|F|``, and

.. math::

    \\tau = \\frac{1 - \\sum_{L} lo_i - \\sum_{U} hi_i - \\sum_{F} v_i}{|F|}

exactly: one Newton step ``t - (g(t) - 1) / |F|`` from any point ``t`` of the segment. A search
(below) finds such a point and takes that step; the output is ``clip(v + tau, lo, hi)``. No
autograd runs through the search. The Jacobian is written out, and it is exact: ``x_F = v_F +
tau``, ``x_L = lo_L``, ``x_U = hi_U``, so each of ``v``, ``lo`` and ``hi`` receives, on the
coordinates where it is the active value, the output gradient minus its mean over ``F``
(``I - 11^T / |F|`` on the free set for ``v``). The Jacobian is piecewise constant, so second
derivatives are zero, and double backward works. Where ``tau`` falls on a breakpoint (a
coordinate exactly at its bound) the gradient is one of two valid one-sided derivatives; the
searches may pick different ones (such kinks are structural with two classes, rare otherwise).
Here a coordinate exactly at ``lo`` counts as free and one with ``lo == hi`` as at ``hi`` once
``tau`` reaches its breakpoint (at ``lo`` before it: where bounds alone fix a row, e.g.
``sum(lo) = 1``, the searches may leave ``tau`` on either side, and the gradient goes to ``hi``
or ``lo``, both valid); the fused kernel (:mod:`mkfkit.kernels.qp`) breaks ties the other way,
so at a row with every coordinate at a bound the two agree on the gradient's part tangent to the
simplex, not on its row mean (docs/METHOD.md, "Gradients on the simplex").

**Finding the segment.** Every search works on the breakpoints as one ``Tensor[2, R, C]`` (the
``lo - v``, then the ``hi - v``), as the bounds arrive (``Tensor[2, ..., C]``, see
:func:`project_onto_bounds`).

- ``"sort"``: one sort of ``Tensor[R, 2C]`` gives ``g`` at every breakpoint by one cumulative
  sum; the root lies after the last breakpoint with ``g <= 1``. ``O(C log C)`` per row, no
  Python loop over rows and no host-device synchronisation, so it runs on any device, under CUDA
  graphs and under ``torch.compile``.
- ``"table"``: ``g`` evaluated directly at all ``2C`` breakpoints of a row, a
  ``Tensor[R, 2C, C]``. ``O(C^2)`` per row, but fewer operations than the sort and no sort at
  all, which on a CPU costs about 50 ns per element (benchmarks/RESULTS.md). Sync-free like the
  sort.
- ``"newton"``: ``_NEWTON_PASSES`` safeguarded Newton passes on ``g(tau) = 1``, the fused
  Triton kernel's step (:mod:`mkfkit.kernels.qp`) with a fixed pass count instead of its
  stopping test, so the host is never asked whether every row has converged. A pass evaluates
  ``g`` and its slope ``|F|`` (the coordinates whose clip leaves ``tau`` unchanged) at ``tau``
  and moves to the root of that linear piece, ``tau - (g(tau) - 1) / |F|``, which is exact
  once ``tau`` lies on the root's segment. A bracket ``[t_lo, t_hi]`` with ``g(t_lo) <= 1 <=
  g(t_hi)``, initially ``[min(lo - v), max(hi - v)]``, guards the step: a step that would not
  land strictly inside it (it leaves the bracket, repeats an end point, or comes from a flat
  piece) bisects instead, unless it leaves ``tau`` unchanged (the root to working precision).
  Where ``|g(tau) - 1| <= 4 eps`` the bracket closes on ``tau``, so a converged row stays put
  for the remaining passes. A row whose ``sum(lo)`` or ``sum(hi)`` is within that tolerance of
  1 starts at that end of its bracket (and stays): its root lies within rounding of the end,
  where Newton steps land on the end or just past it and bisection would approach it one bit a
  pass. Rows whose box cannot reach a sum of 1 are set to their corner at the end. ``O(C)`` per
  pass and row: six operations over ``Tensor[R, C]`` and a dozen over the ``Tensor[R, 1]`` of
  per-row values.

  The pass count is empirical, not a bound: a Newton step on a piecewise linear function may
  cross one breakpoint at a time. The search starts at the root with no bound active (``tau =
  0`` for the exact QP's rows, whose ``v`` sums to 1). In 89,000 rows of each kind with C from
  2 to 1,000 (float64, matching the sort to 1e-12), the exact QP's rows needed at most 3
  passes but for 23 (at most 8), OPT2's rows as :func:`~mkfkit.fraction.linear_fraction`
  projects them at most 7, and random boxes (tests/test_projection.py's) at most 11, each pass
  beyond 4 leaving 3-5 times fewer rows unconverged than the one before (benchmarks/RESULTS.md,
  "Exact fraction on one CPU thread"). A row that needs more passes than it gets is off by up
  to its bracket's width.

An earlier CPU Newton search stopped on a host check after every pass; it was removed (it could
not run under ``torch.compile`` or CUDA graphs and needed three thresholds tuned on one machine,
benchmarks/RESULTS.md, "Issue 16: the projection's searches"). The fixed-pass search replaces
it: the same operations on every device, eager or compiled.

:func:`_pick_search` owns the choice for ``"auto"`` (the default): the table while it holds at
most ``_TABLE_MAX_ENTRIES`` entries (any device); beyond it, on a CPU, the Newton passes from
``_NEWTON_MIN_ELEMENTS`` elements on; the sort otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["project_box_simplex", "project_onto_bounds"]

_SEARCHES = ("auto", "sort", "table", "newton")
# Chosen on a CPU with one thread (benchmarks/bench_projection.py, benchmarks/RESULTS.md), for the
# exact QP's rows. The table beats the sort at every size up to about 2**20 entries (0.6-0.9x of
# its time), e.g. B = 64 pairs of C = 64 or B = 512 of C = 16, and the Newton passes, whose
# operations cost about 0.5 ms however small the rows; beyond it the table's C^2 work shows
# (1.2-1.3x the sort's time at 2-3 million entries, about equal to the Newton passes). There the
# Newton passes win from about 4,096 elements on (0.3-0.9x the sort's time at 16 rows, 0.05-0.1x
# at 512 rows of C >= 100); below, rows too wide for the table are so few that the sort's
# O(C log C) is cheaper (2 rows of C = 1000: 0.3 ms against 0.5 ms). Not measured on a GPU,
# where the fused kernel serves the exact QP: there the sort stays.
_TABLE_MAX_ENTRIES = 2**20
_NEWTON_MIN_ELEMENTS = 4096
# Passes of the "newton" search: two more than the hardest of 20,000 random boxes of C = 30 needs
# (10; tests/test_projection.py checks the margin), one more than the hardest of 89,000 (module
# docstring).
_NEWTON_PASSES = 12


def project_box_simplex(v: Tensor, lo: Tensor, hi: Tensor, *, search: str = "auto") -> Tensor:
    """Project every row of ``v`` onto ``{x : sum(x) = 1, lo <= x <= hi}``.

    Args:
        v: Tensor[..., C], the points to project (floating point).
        lo: Tensor[..., C], lower bounds, with ``lo <= hi`` (the shape of ``v``).
        hi: Tensor[..., C], upper bounds (the shape of ``v``).
        search: how ``tau`` is found: ``"sort"``, ``"table"``, ``"newton"`` or ``"auto"``
            (see the module docstring). The result does not depend on it beyond rounding.

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
    return project_onto_bounds(v, torch.stack((lo, hi)), search=search)


def project_onto_bounds(v: Tensor, bounds: Tensor, *, search: str = "auto") -> Tensor:
    """:func:`project_box_simplex` with both bounds in one Tensor[2, ..., C] (``lo``, then ``hi``).

    That is the layout the searches work in; a caller that computes its bounds can fill it
    directly and save the stacking.
    """
    find = _FINDERS[_pick_search(v, search)]
    if torch.is_grad_enabled() and (v.requires_grad or bounds.requires_grad):
        return _BoxSimplexProjection.apply(v, bounds, find)
    return _shifted(v, bounds, find)[0].clamp_(*bounds)  # no autograd.Function to pay for


def _shifted(v: Tensor, bounds: Tensor, find) -> tuple[Tensor, Tensor]:
    """``v + tau``, with ``tau`` from the search ``find`` (its clip to the bounds is the
    projection), and the search's breakpoint crossings (shaped as ``bounds``)."""
    tau, crossing = find(v, bounds)
    return v + tau, crossing


class _BoxSimplexProjection(torch.autograd.Function):
    """``clip(v + tau, lo, hi)`` with the search's ``tau``, and its exact Jacobian (module docstring)."""

    @staticmethod
    def forward(ctx, v: Tensor, bounds: Tensor, find) -> Tensor:
        shifted, crossing = _shifted(v, bounds, find)
        ctx.save_for_backward(crossing)
        return shifted.clamp_(*bounds)

    @staticmethod
    def backward(ctx, grad: Tensor):
        entered, upper = ctx.saved_tensors[0]
        # The sets of tau's segment (a coordinate exactly at lo counts as free, one with lo == hi
        # as at hi).
        free = entered & ~upper
        # x = v + tau on F, lo on L, hi on U, with tau = (1 - sum_F v - sum_L lo - sum_U hi) / |F|:
        # each input receives, on the coordinates where it is the active value, the output
        # gradient minus its mean over F (no mean when F is empty: tau is then unused).
        count = free.sum(-1, keepdim=True, dtype=grad.dtype).clamp_min(1)
        centred = grad - torch.where(free, grad, 0).sum(-1, keepdim=True) / count
        grad_v = torch.where(free, centred, 0)
        if not ctx.needs_input_grad[1]:
            return grad_v, None, None
        return grad_v, torch.where(torch.stack((~entered, upper)), centred.unsqueeze(0), 0), None


def _pick_search(v: Tensor, search: str) -> str:
    """The search ``search`` names, or for ``"auto"`` the one expected to be fastest for ``v``."""
    if search == "auto":
        if 2 * v.numel() * v.shape[-1] <= _TABLE_MAX_ENTRIES:
            return "table"
        return "newton" if v.device.type == "cpu" and v.numel() >= _NEWTON_MIN_ELEMENTS else "sort"
    if search not in _SEARCHES:
        raise ValueError(f"`search` must be one of {_SEARCHES}, but got {search!r}")
    return search


# The searches take rows Tensor[R, C] and bounds Tensor[2, R, C], where R stands for any leading
# shape (they work on it as it comes, which saves reshaping). They share the breakpoints
# Tensor[2, R, C]: `enter` (index 0), the tau beyond which coordinate i leaves lo, and `leave`
# (index 1), the tau beyond which it sits at hi; with the offset sum(v) - 1,
# g(tau) - 1 = sum_i clip(tau, enter_i, leave_i) + offset. Each returns tau, Tensor[R, 1] (a
# column, as every per-row quantity below), and the crossing of its segment: which breakpoints
# lie at or below it, bool Tensor[2, R, C] (the coordinates at or above lo, and those at hi),
# from which the backward reads the sets.


def _breakpoints(v: Tensor, bounds: Tensor) -> tuple[Tensor, Tensor]:
    """Breakpoints Tensor[2, R, C] and offset Tensor[R, 1]."""
    return bounds - v, v.sum(-1, keepdim=True) - 1


def _excess(tau: Tensor, enter: Tensor, leave: Tensor, offset: Tensor) -> Tensor:
    """g(tau) - 1 at ``tau``."""
    return torch.clamp(tau, enter, leave).sum(-1, keepdim=True) + offset


def _counts(crossing: Tensor) -> tuple[Tensor, Tensor]:
    """How many enter and how many leave breakpoints a crossing holds.

    Their difference is ``|F|`` just right of the crossing's ``tau``, the slope of g there.
    int32: summing booleans into the default int64 costs more on a CPU.
    """
    return crossing.sum(-1, keepdim=True, dtype=torch.int32).unbind()


def _root_after(reference: Tensor, excess: Tensor, breakpoints: Tensor) -> tuple[Tensor, Tensor]:
    """tau for a root on the segment right of ``reference``, with g - 1 = ``excess`` there: the
    Newton step, exact on a linear segment.

    A slope of 0 occurs only beyond the last breakpoint (every coordinate at hi, ``excess <= 0``)
    or with ``reference = -inf`` (every coordinate at lo); a step with slope 1 keeps ``tau``
    beyond every breakpoint there, so the output is the nearest corner.
    """
    crossing = reference >= breakpoints
    entered, upper = _counts(crossing)
    return reference - excess / (entered - upper).clamp_min(1), crossing


def _root_by_sort(v: Tensor, bounds: Tensor) -> tuple[Tensor, Tensor]:
    """tau by sorting the breakpoints of every row."""
    breakpoints, offset = _breakpoints(v, bounds)
    ordered, order = torch.cat(tuple(breakpoints), -1).sort(dim=-1)
    # Slope of g changes by +1 at an `enter` breakpoint and by -1 at a `leave` breakpoint.
    slope = (order < v.shape[-1]).to(v.dtype).mul_(2).sub_(1).cumsum_(-1)  # just after each one
    # g rises by `rise` between consecutive breakpoints, from g = sum(lo) at the first one.
    rise = slope[..., :-1] * ordered.diff(dim=-1)
    headroom = 1 - bounds[0].sum(-1, keepdim=True)
    # Number of breakpoints already passed when g reaches 1: those with g <= 1 (g is
    # non-decreasing; ties count, so the segment that follows has a positive slope unless the
    # row is degenerate).
    passed = (rise.cumsum_(-1) <= headroom).sum(-1, keepdim=True) + (headroom >= 0)
    # The root lies on the segment after breakpoint `passed - 1`; with none passed every
    # coordinate is at its lower bound (sum(lo) > 1), which the -inf reference expresses.
    reference = ordered.gather(-1, (passed - 1).clamp_min(0)).masked_fill_(passed == 0, -float("inf"))
    excess = _excess(reference, *breakpoints, offset)
    return _root_after(reference, excess, breakpoints)


def _root_by_table(v: Tensor, bounds: Tensor) -> tuple[Tensor, Tensor]:
    """tau from g at every breakpoint of every row (Tensor[R, 2C, C])."""
    breakpoints, offset = _breakpoints(v, bounds)
    enter, leave = breakpoints
    flat = torch.cat((enter, leave), -1)
    excess = torch.clamp(flat.unsqueeze(-1), enter.unsqueeze(-2), leave.unsqueeze(-2)).sum(-1) + offset
    # The last breakpoint with g <= 1 (g is non-decreasing), as the sort finds it; -inf when g > 1
    # at every breakpoint (sum(lo) > 1).
    reference, index = flat.masked_fill(excess > 0, -float("inf")).max(-1, keepdim=True)
    return _root_after(reference, excess.gather(-1, index), breakpoints)


def _root_by_newton(v: Tensor, bounds: Tensor) -> tuple[Tensor, Tensor]:
    """tau by ``_NEWTON_PASSES`` safeguarded Newton passes (module docstring)."""
    breakpoints, offset = _breakpoints(v, bounds)
    enter, leave = breakpoints
    # The constants as tensors of v's dtype, filled on its device (no copy from the host): a
    # Python number costs a conversion in every operation it enters (about a tenth of the
    # search's time at 512 rows of C = 100).
    classes = v.new_full((), v.shape[-1])
    tolerance = 4 * torch.finfo(v.dtype).eps  # on g - 1, a sum of order 1 (the fused kernel's)
    below, above = v.new_full((), tolerance), v.new_full((), -tolerance)
    t_lo, t_hi = enter.amin(-1, keepdim=True), leave.amax(-1, keepdim=True)
    tau = (offset / -classes).clamp_(t_lo, t_hi)  # the root when no bound is active
    # Bounds that sum to 1 within the tolerance put the root within rounding of an end of the
    # bracket (every coordinate at lo, or at hi, there). A Newton step then lands on that end or
    # by rounding just past it, is refused, and the bisection approaches the end one bit a pass
    # (off by the bracket's width over 2**12 after the passes): start there.
    sum_lo, sum_hi = bounds.sum(-1, keepdim=True)
    at_lo, at_hi = (sum_lo - 1).abs() <= tolerance, (sum_hi - 1).abs() <= tolerance
    tau = torch.where(at_lo, t_lo, torch.where(at_hi, t_hi, tau))  # the first pass closes on it
    # One buffer for every pass: a fresh one per pass costs its page faults again on a CPU
    # (as much as the clip itself at 512 rows of C = 1000).
    clipped = torch.empty_like(enter)
    for _ in range(_NEWTON_PASSES):
        torch.clamp(tau, enter, leave, out=clipped)
        excess = clipped.sum(-1, keepdim=True) + offset
        # clip(tau) - tau is exactly 0 on the free coordinates and nonzero on the others; its
        # sign counts them in float arithmetic, where a boolean comparison with a broadcast tau
        # costs three times as much on a CPU.
        free = classes - clipped.sub_(tau).sign_().abs_().sum(-1, keepdim=True)
        # tau - excess / free; infinite or NaN on a flat piece (free = 0): rejected below.
        newton = torch.addcdiv(tau, excess, free, value=-1)
        # A sum within rounding of 1 closes the bracket on tau, which then stays: on a flat
        # piece (every coordinate at a bound, e.g. a fraction's row at a corner of its box)
        # every such tau gives the same answer, and bisecting on would leave the piece.
        t_lo = torch.where(excess <= below, tau, t_lo)
        t_hi = torch.where(excess >= above, tau, t_hi)
        # An end point repeated would let the steps cycle between the ends; a step that leaves
        # tau unchanged is the root to working precision (bisecting would move away from it).
        accept = ((newton > t_lo) & (newton < t_hi)) | (newton == tau)
        tau = torch.where(accept, newton, torch.lerp(t_lo, t_hi, 0.5))
    # A box that cannot reach a sum of 1 (or reaches it only at a corner): its nearest corner.
    tau = tau.masked_fill_(sum_hi <= 1, float("inf")).masked_fill_(sum_lo >= 1, -float("inf"))
    return tau, tau >= breakpoints


_FINDERS = {"sort": _root_by_sort, "table": _root_by_table, "newton": _root_by_newton}
