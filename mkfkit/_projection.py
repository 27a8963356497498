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
Here a coordinate exactly at ``lo`` counts as free and one with ``lo == hi`` as at ``hi``; the
fused kernel (:mod:`mkfkit.kernels.qp`) breaks ties the other way, so at a row with every
coordinate at a bound the two agree on the gradient's part tangent to the simplex, not on its
row mean (docs/METHOD.md, "Gradients on the simplex").

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

A third search, safeguarded Newton steps with a host check per pass (the fused Triton kernel's
algorithm, :mod:`mkfkit.kernels.qp`), was removed: it was faster than the sort only on the CPU
for wide rows (3-8x for 512 rows of C >= 100), where a training step is dominated by the
network anyway, it could not run under ``torch.compile`` or CUDA graphs, and it needed three
thresholds tuned on one machine (benchmarks/RESULTS.md, "Issue 16: the projection's searches").

``"auto"`` (the default) takes the table while it holds at most ``_TABLE_MAX_ENTRIES`` entries
(any device), the sort otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["project_box_simplex", "project_onto_bounds"]

_SEARCHES = ("auto", "sort", "table")
# Chosen on a CPU with one thread (benchmarks/bench_projection.py, benchmarks/RESULTS.md), for the
# exact QP's rows. The table beats the sort at every size up to about 2**20 entries (0.6-0.9x of
# its time), e.g. B = 64 pairs of C = 64 or B = 512 of C = 16; beyond it the table's C^2 work
# shows (1.2-1.3x the sort's time at 2-3 million entries).
_TABLE_MAX_ENTRIES = 2**20


def project_box_simplex(v: Tensor, lo: Tensor, hi: Tensor, *, search: str = "auto") -> Tensor:
    """Project every row of ``v`` onto ``{x : sum(x) = 1, lo <= x <= hi}``.

    Args:
        v: Tensor[..., C], the points to project (floating point).
        lo: Tensor[..., C], lower bounds, with ``lo <= hi`` (the shape of ``v``).
        hi: Tensor[..., C], upper bounds (the shape of ``v``).
        search: how ``tau`` is found: ``"sort"``, ``"table"`` or ``"auto"``
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
        return "table" if 2 * v.numel() * v.shape[-1] <= _TABLE_MAX_ENTRIES else "sort"
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


_FINDERS = {"sort": _root_by_sort, "table": _root_by_table}
