"""Fused Triton kernels for the exact QP knowledge fraction (OPT1 in closed form).

For one row with weight ``lam`` in [0, 1], mixed output ``p`` and bases ``K_a``, ``K_b``
(``mu = 1 - lam``), the exact QP fraction is two independent projections sharing one residual:

.. math::

    r = p - \\lambda K_a - \\mu K_b, \\qquad
    a = \\operatorname{clip}(K_a + r + \\tau_a, lo_a, hi_a), \\qquad
    b = \\operatorname{clip}(K_b + r + \\tau_b, lo_b, hi_b),

    lo_a = \\max(0, (p - \\mu) / \\lambda), \\quad hi_a = \\min(1, p / \\lambda), \\qquad
    lo_b = \\max(0, (p - \\lambda) / \\mu), \\quad hi_b = \\min(1, p / \\mu),

with the scalars ``tau_a``, ``tau_b`` chosen so that ``sum(a) = sum(b) = 1`` (the bounds use
``p`` clamped to [0, 1], as the pure-torch solver does). A side whose
weight is exactly 0 carries no information and keeps its base (``a = K_a`` where
``lam == 0``; ``b = K_b`` where ``lam == 1``); the other side then equals ``p`` exactly.

**Finding tau without a sort.** ``f(tau) = sum(clip(v + tau, lo, hi)) - 1`` is nondecreasing and
piecewise linear; its slope at ``tau`` is the size of the free set
``S = {i : lo_i < v_i + tau < hi_i}``. Each pass over the row evaluates ``f``, ``|S|`` and the
number of coordinates at their upper bound, then takes a Newton step ``tau - f(tau) / |S|``,
which is the closed-form root of the linear piece of ``S``. A bracket ``[t_lo, t_hi]`` with
``f(t_lo) <= 0 <= f(t_hi)`` (initially ``[min(lo - v), max(hi - v)]``) guards it: a step that
leaves the bracket, or a flat piece, bisects instead. The iteration stops when a Newton step
lands in the piece it was computed from (the counts of free and upper coordinates are unchanged,
and a Newton step moves coordinates only one way, so the active set is unchanged): ``tau`` is
then exact for its active set. It also stops on a flat piece (no free coordinate) whose row sum
is 1 up to rounding, and when a Newton step no longer changes ``tau`` (the root to working
precision; bisecting on would only shrink the bracket). Starting from ``tau = 0`` (the answer
when no bound is active, since ``sum(K_a + r) = 1``), random rows (Dirichlet-like, peaked,
unrelated bases, one-hot) need 3 to 5 passes on average and at most 6 for C from 10 to 21,843,
counting the pass that confirms the active set; rows with very few classes occasionally bisect
(at most 10 passes seen). Bisection alone reaches float32 resolution in about 25 passes;
``_projection._MAX_PASSES`` caps the loop.
Both sides iterate together, so every pass reads ``p``, ``K_a`` and ``K_b`` once. A program
owns one row, or several short rows (each row keeps its own state and stops on its own). Rows
up to ``_MAX_BLOCK`` classes stay in registers for all passes; longer rows loop over chunks of
``_CHUNK`` classes in every pass.

**Backward.** On the free set the projection's Jacobian is ``I - 1 1^T / |S|``; a coordinate
at a bound equals that bound, and the bound's gradient flows on to ``p`` and ``lam``. With
``g`` the incoming gradient and ``gbar`` its mean over ``S`` (0 when ``S`` is empty), the
gradient reaching ``v`` is ``g - gbar`` on ``S`` and the gradient reaching the active bound
is ``g - gbar`` elsewhere; the chain rule through ``r``, ``lo`` and ``hi`` gives the
gradients of ``mixed``, ``base_a``, ``base_b`` and ``lam``. Two passes: one for ``gbar``,
one that writes the gradients. The gradient with respect to ``lam`` is zero in rows where
``lam`` is exactly 0 or 1 (the fraction is not differentiable there).

Arithmetic is float32 for float32/bfloat16/float16 inputs (float64 stays float64); outputs
have the input dtype. No host-device synchronisation, no atomics; the forward and the
backward are one launch each. Under ``torch.compile`` they are the custom ops
``mkfkit::qp_fraction`` and ``mkfkit::qp_fraction_backward`` (so ``fullgraph=True`` keeps them
in its graph); in eager mode the same launches run from a plain ``torch.autograd.Function``
(or directly, when no input needs a gradient), which costs far less host time per call than
a trip through the dispatcher to a Python custom op.

CPU tensors are accepted only under Triton's interpreter (``TRITON_INTERPRET=1`` set before
Triton is imported; slow, meant for tests without a GPU).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mkfkit._checks import (
    check_floating,
    check_same_device,
    check_same_dtype,
    check_same_shape,
    check_shape,
)
from mkfkit._projection import _MAX_PASSES

try:
    import triton
    import triton.language as tl
    from triton.runtime.jit import JITFunction
except ImportError:  # Triton ships with CUDA builds of PyTorch; CPU-only installs may lack it.
    triton = tl = JITFunction = None

__all__ = ["available", "qp_fraction"]

# Launch shape (tuned to avoid register spills on sm_90): rows of up to _MAX_BLOCK classes stay
# in registers; longer rows loop over chunks of _CHUNK classes; short rows are packed several
# to a program while ROWS * BLOCK <= _TILE.
_MAX_BLOCK = 4096
_CHUNK = 2048
_TILE = 1024
# The same cap on the passes as the plain-torch Newton search.
_SOLVER_CONSTANTS = {
    dtype: dict(EPS=torch.finfo(dtype).eps, MAX_ITERATIONS=cap) for dtype, cap in _MAX_PASSES.items()
}
_TL_DTYPES = {} if triton is None else {torch.float32: tl.float32, torch.float64: tl.float64}


def available(device: torch.device | str) -> bool:
    """Whether the fused kernels can run on ``device``.

    True when Triton is importable and ``device`` is a CUDA device, or ``device`` is the CPU
    and Triton runs its interpreter (``TRITON_INTERPRET=1`` when Triton was imported; for tests).
    """
    device = torch.device(device)
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and _INTERPRETED)


def _jit(fn):
    return fn if triton is None else triton.jit(fn)


# ----------------------------------------------------------------------------------------------
# Device functions. A program owns a tile of ROWS rows; rows longer than one BLOCK of columns
# are walked chunk by chunk. Per-row solver state lives in Tensor[ROWS] vectors.


@_jit
def _load_tile(ptr, rows, cols, mask, stride_row, stride_col, COMPUTE: tl.constexpr):
    offsets = rows[:, None] * stride_row + cols[None, :] * stride_col
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(COMPUTE)


@_jit
def _bounds(target, weight, other_weight):
    # lo = max(0, (target - other_weight) / weight), hi = min(1, target / weight); a zero weight
    # never divides (its side keeps its base and these bounds are unused).
    safe_weight = tl.where(weight > 0, weight, 1.0)
    lo = tl.maximum((target - other_weight) / safe_weight, 0.0)
    hi = tl.minimum(target / safe_weight, 1.0)
    return lo, hi


@_jit
def _side_terms(p, base_a, base_b, lam, mu):
    """Projection inputs v and bounds of both sides; masked lanes get v = lo = hi = 0."""
    residual = p - lam * base_a - mu * base_b
    # Entries of p a hair outside [0, 1] (rounding) would otherwise cross the bounds.
    target = tl.minimum(tl.maximum(p, 0.0), 1.0)
    lo_a, hi_a = _bounds(target, lam, mu)
    lo_b, hi_b = _bounds(target, mu, lam)
    return base_a + residual, lo_a, hi_a, base_b + residual, lo_b, hi_b


@_jit
def _load_terms(mixed_ptr, base_a_ptr, base_b_ptr, rows, cols, mask,
                stride_mixed_row, stride_mixed_col, stride_a_row, stride_a_col,
                stride_b_row, stride_b_col, lam, mu, COMPUTE: tl.constexpr):
    """Load a tile of p, K_a, K_b; derive both sides' projection inputs and bounds."""
    p = _load_tile(mixed_ptr, rows, cols, mask, stride_mixed_row, stride_mixed_col, COMPUTE)
    base_a = _load_tile(base_a_ptr, rows, cols, mask, stride_a_row, stride_a_col, COMPUTE)
    base_b = _load_tile(base_b_ptr, rows, cols, mask, stride_b_row, stride_b_col, COMPUTE)
    v_a, lo_a, hi_a, v_b, lo_b, hi_b = _side_terms(p, base_a, base_b, lam, mu)
    return p, base_a, base_b, v_a, lo_a, hi_a, v_b, lo_b, hi_b


@_jit
def _classify(v, lo, hi, tau, mask):
    """Projected values, free set and upper-bound set of one side at ``tau`` (Tensor[ROWS])."""
    shifted = v + tau[:, None]
    x = tl.minimum(tl.maximum(shifted, lo), hi)
    free = (shifted > lo) & (shifted < hi) & mask
    upper = (shifted >= hi) & mask
    return x, free, upper


@_jit
def _root_step(tau, t_lo, t_hi, total, n_free, n_upper, prev_free, prev_upper, was_newton, done,
               EPS: tl.constexpr):
    """One safeguarded Newton step on f(tau) = total - 1; returns the new solver state."""
    f = total - 1.0
    # Finished rows and padding rows (empty bracket +-inf) must not produce inf - inf.
    t_lo = tl.where(done, 0.0, t_lo)
    t_hi = tl.where(done, 0.0, t_hi)
    scale = tl.maximum(tl.maximum(tl.abs(t_lo), tl.abs(t_hi)), 1.0)
    same_piece = was_newton & (n_free == prev_free) & (n_upper == prev_upper)
    # On a flat piece (every coordinate at a bound) with f zero up to rounding, every tau of the
    # piece gives the same answer: no need to bisect down to its edge.
    flat_root = (n_free == 0) & (tl.abs(f) <= 4.0 * EPS)
    newton = tau - f / tl.maximum(n_free, 1).to(tau.dtype)
    # A Newton step too small to change tau: the root to working precision.
    stalled = (n_free > 0) & (newton == tau)
    stop = done | (f == 0.0) | same_piece | flat_root | stalled | (t_hi - t_lo <= 2.0 * EPS * scale)
    t_lo = tl.where(f < 0.0, tl.maximum(t_lo, tau), t_lo)
    t_hi = tl.where(f > 0.0, tl.minimum(t_hi, tau), t_hi)
    use_newton = (n_free > 0) & (newton > t_lo) & (newton < t_hi)
    next_tau = tl.where(use_newton, newton, 0.5 * (t_lo + t_hi))
    tau = tl.where(stop, tau, next_tau)
    return tau, t_lo, t_hi, n_free, n_upper, use_newton, stop


# ----------------------------------------------------------------------------------------------
# Kernels


@_jit
def _qp_fraction_fwd_kernel(
    mixed_ptr, base_a_ptr, base_b_ptr, lam_ptr, a_ptr, b_ptr, tau_ptr, iterations_ptr,
    n_rows, n_cols,
    stride_mixed_row, stride_mixed_col, stride_a_row, stride_a_col,
    stride_b_row, stride_b_col, stride_lam,
    COMPUTE: tl.constexpr, EPS: tl.constexpr, MAX_ITERATIONS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    COUNT_ITERATIONS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK)
    lam = tl.load(lam_ptr + rows * stride_lam, mask=row_mask, other=0.0).to(COMPUTE)
    mu = 1.0 - lam
    solve = (lam > 0) & (mu > 0)
    lam_col = lam[:, None]
    mu_col = mu[:, None]

    tau_a = tl.full([ROWS], 0.0, COMPUTE)
    tau_b = tl.full([ROWS], 0.0, COMPUTE)
    t_lo_a = tl.full([ROWS], -float("inf"), COMPUTE)
    t_lo_b = tl.full([ROWS], -float("inf"), COMPUTE)
    t_hi_a = tl.full([ROWS], float("inf"), COMPUTE)
    t_hi_b = tl.full([ROWS], float("inf"), COMPUTE)
    prev_free_a = tl.full([ROWS], -1, tl.int32)
    prev_free_b = tl.full([ROWS], -1, tl.int32)
    prev_upper_a = tl.full([ROWS], -1, tl.int32)
    prev_upper_b = tl.full([ROWS], -1, tl.int32)
    newton_a = tl.full([ROWS], 0, tl.int1)
    newton_b = tl.full([ROWS], 0, tl.int1)
    # A zero-weight side keeps its base; the other side's bounds then pin it to p exactly.
    done_a = ~solve
    done_b = ~solve
    row_passes = tl.full([ROWS], 0, tl.int32)

    if SINGLE_BLOCK:
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        p, base_a, base_b, v_a, lo_a, hi_a, v_b, lo_b, hi_b = _load_terms(
            mixed_ptr, base_a_ptr, base_b_ptr, rows, cols, mask, stride_mixed_row,
            stride_mixed_col, stride_a_row, stride_a_col, stride_b_row, stride_b_col,
            lam_col, mu_col, COMPUTE)
        t_lo_a = tl.min(tl.where(mask, lo_a - v_a, float("inf")), 1)
        t_hi_a = tl.max(tl.where(mask, hi_a - v_a, -float("inf")), 1)
        t_lo_b = tl.min(tl.where(mask, lo_b - v_b, float("inf")), 1)
        t_hi_b = tl.max(tl.where(mask, hi_b - v_b, -float("inf")), 1)

    iteration = 0
    pending = tl.sum(solve.to(tl.int32), 0)
    while (iteration < MAX_ITERATIONS) & (pending > 0):
        if SINGLE_BLOCK:
            x_a, free_a, upper_a = _classify(v_a, lo_a, hi_a, tau_a, mask)
            x_b, free_b, upper_b = _classify(v_b, lo_b, hi_b, tau_b, mask)
            total_a = tl.sum(x_a, 1)
            total_b = tl.sum(x_b, 1)
            n_free_a = tl.sum(free_a.to(tl.int32), 1)
            n_free_b = tl.sum(free_b.to(tl.int32), 1)
            n_upper_a = tl.sum(upper_a.to(tl.int32), 1)
            n_upper_b = tl.sum(upper_b.to(tl.int32), 1)
        else:
            # Accumulate per lane over the chunks, reduce once. The bracket's end points are
            # recomputed on the way (free in a memory-bound pass).
            acc_x_a = tl.zeros([ROWS, BLOCK], COMPUTE)
            acc_x_b = tl.zeros([ROWS, BLOCK], COMPUTE)
            acc_free_a = tl.zeros([ROWS, BLOCK], tl.int32)
            acc_free_b = tl.zeros([ROWS, BLOCK], tl.int32)
            acc_upper_a = tl.zeros([ROWS, BLOCK], tl.int32)
            acc_upper_b = tl.zeros([ROWS, BLOCK], tl.int32)
            acc_lo_a = tl.full([ROWS, BLOCK], float("inf"), COMPUTE)
            acc_lo_b = tl.full([ROWS, BLOCK], float("inf"), COMPUTE)
            acc_hi_a = tl.full([ROWS, BLOCK], -float("inf"), COMPUTE)
            acc_hi_b = tl.full([ROWS, BLOCK], -float("inf"), COMPUTE)
            for start in range(0, n_cols, BLOCK):
                chunk = start + cols
                mask = row_mask[:, None] & (chunk < n_cols)[None, :]
                p, base_a, base_b, v_a, lo_a, hi_a, v_b, lo_b, hi_b = _load_terms(
                    mixed_ptr, base_a_ptr, base_b_ptr, rows, chunk, mask, stride_mixed_row,
                    stride_mixed_col, stride_a_row, stride_a_col, stride_b_row, stride_b_col,
                    lam_col, mu_col, COMPUTE)
                x_a, free_a, upper_a = _classify(v_a, lo_a, hi_a, tau_a, mask)
                x_b, free_b, upper_b = _classify(v_b, lo_b, hi_b, tau_b, mask)
                acc_x_a += x_a
                acc_x_b += x_b
                acc_free_a += free_a.to(tl.int32)
                acc_free_b += free_b.to(tl.int32)
                acc_upper_a += upper_a.to(tl.int32)
                acc_upper_b += upper_b.to(tl.int32)
                acc_lo_a = tl.minimum(acc_lo_a, tl.where(mask, lo_a - v_a, float("inf")))
                acc_lo_b = tl.minimum(acc_lo_b, tl.where(mask, lo_b - v_b, float("inf")))
                acc_hi_a = tl.maximum(acc_hi_a, tl.where(mask, hi_a - v_a, -float("inf")))
                acc_hi_b = tl.maximum(acc_hi_b, tl.where(mask, hi_b - v_b, -float("inf")))
            total_a = tl.sum(acc_x_a, 1)
            total_b = tl.sum(acc_x_b, 1)
            n_free_a = tl.sum(acc_free_a, 1)
            n_free_b = tl.sum(acc_free_b, 1)
            n_upper_a = tl.sum(acc_upper_a, 1)
            n_upper_b = tl.sum(acc_upper_b, 1)
            t_lo_a = tl.maximum(t_lo_a, tl.min(acc_lo_a, 1))
            t_lo_b = tl.maximum(t_lo_b, tl.min(acc_lo_b, 1))
            t_hi_a = tl.minimum(t_hi_a, tl.max(acc_hi_a, 1))
            t_hi_b = tl.minimum(t_hi_b, tl.max(acc_hi_b, 1))
        row_passes += (~(done_a & done_b)).to(tl.int32)
        tau_a, t_lo_a, t_hi_a, prev_free_a, prev_upper_a, newton_a, done_a = _root_step(
            tau_a, t_lo_a, t_hi_a, total_a, n_free_a, n_upper_a, prev_free_a, prev_upper_a,
            newton_a, done_a, EPS)
        tau_b, t_lo_b, t_hi_b, prev_free_b, prev_upper_b, newton_b, done_b = _root_step(
            tau_b, t_lo_b, t_hi_b, total_b, n_free_b, n_upper_b, prev_free_b, prev_upper_b,
            newton_b, done_b, EPS)
        pending = tl.sum((~(done_a & done_b)).to(tl.int32), 0)
        iteration += 1

    tl.store(tau_ptr + rows, tau_a, mask=row_mask)
    tl.store(tau_ptr + n_rows + rows, tau_b, mask=row_mask)
    if COUNT_ITERATIONS:
        tl.store(iterations_ptr + rows, row_passes, mask=row_mask)
    for start in range(0, n_cols, BLOCK):
        chunk = start + cols
        if not SINGLE_BLOCK:
            mask = row_mask[:, None] & (chunk < n_cols)[None, :]
            p, base_a, base_b, v_a, lo_a, hi_a, v_b, lo_b, hi_b = _load_terms(
                mixed_ptr, base_a_ptr, base_b_ptr, rows, chunk, mask, stride_mixed_row,
                stride_mixed_col, stride_a_row, stride_a_col, stride_b_row, stride_b_col,
                lam_col, mu_col, COMPUTE)
        a = tl.minimum(tl.maximum(v_a + tau_a[:, None], lo_a), hi_a)
        b = tl.minimum(tl.maximum(v_b + tau_b[:, None], lo_b), hi_b)
        a = tl.where(lam_col > 0, a, base_a)
        b = tl.where(mu_col > 0, b, base_b)
        offsets = rows[:, None] * n_cols + chunk[None, :]
        tl.store(a_ptr + offsets, a.to(a_ptr.dtype.element_ty), mask=mask)
        tl.store(b_ptr + offsets, b.to(b_ptr.dtype.element_ty), mask=mask)


@_jit
def _side_vjp(grad, mean_free_grad, v, lo, hi, tau, mask, target, weight, other_weight):
    """Gradients reaching v, the clamped p (through the bounds) and the weight, for one side."""
    _, free, upper = _classify(v, lo, hi, tau, mask)
    at_bound = mask & ~free
    centred = grad - mean_free_grad[:, None]
    # A bound passes its gradient on where it is not clamped at 0 or 1 (ties pass, as in torch).
    to_lo = tl.where(at_bound & ~upper & (target >= other_weight), centred, 0.0)
    to_hi = tl.where(at_bound & upper & (target <= weight), centred, 0.0)
    safe_weight = tl.where(weight > 0, weight, 1.0)
    to_v = tl.where(free, centred, 0.0)
    to_target = (to_lo + to_hi) / safe_weight
    # lo = 1 + (target - 1) / w and hi = target / w, differentiated in w.
    to_weight = (to_lo * (1.0 - target) - to_hi * target) / safe_weight / safe_weight
    return to_v, to_target, to_weight


@_jit
def _free_grad(grad, v, lo, hi, tau, mask):
    _, free, _ = _classify(v, lo, hi, tau, mask)
    return tl.where(free, grad, 0.0), free.to(tl.int32)


@_jit
def _qp_fraction_bwd_kernel(
    grad_a_ptr, grad_b_ptr, mixed_ptr, base_a_ptr, base_b_ptr, lam_ptr, tau_ptr,
    d_mixed_ptr, d_base_a_ptr, d_base_b_ptr, d_lam_ptr,
    n_rows, n_cols,
    stride_grad_a_row, stride_grad_a_col, stride_grad_b_row, stride_grad_b_col,
    stride_mixed_row, stride_mixed_col, stride_a_row, stride_a_col,
    stride_b_row, stride_b_col, stride_lam,
    COMPUTE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK)
    lam = tl.load(lam_ptr + rows * stride_lam, mask=row_mask, other=0.0).to(COMPUTE)
    mu = 1.0 - lam
    solve = (lam > 0) & (mu > 0)
    lam_col = lam[:, None]
    mu_col = mu[:, None]
    solve_col = solve[:, None]
    tau_a = tl.load(tau_ptr + rows, mask=row_mask, other=0.0).to(COMPUTE)
    tau_b = tl.load(tau_ptr + n_rows + rows, mask=row_mask, other=0.0).to(COMPUTE)

    # Pass 1: the mean incoming gradient over each side's free set.
    if SINGLE_BLOCK:
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        p, base_a, base_b, v_a, lo_a, hi_a, v_b, lo_b, hi_b = _load_terms(
            mixed_ptr, base_a_ptr, base_b_ptr, rows, cols, mask, stride_mixed_row,
            stride_mixed_col, stride_a_row, stride_a_col, stride_b_row, stride_b_col,
            lam_col, mu_col, COMPUTE)
        grad_a = _load_tile(
            grad_a_ptr, rows, cols, mask, stride_grad_a_row, stride_grad_a_col, COMPUTE)
        grad_b = _load_tile(
            grad_b_ptr, rows, cols, mask, stride_grad_b_row, stride_grad_b_col, COMPUTE)
        acc_grad_a, acc_free_a = _free_grad(grad_a, v_a, lo_a, hi_a, tau_a, mask)
        acc_grad_b, acc_free_b = _free_grad(grad_b, v_b, lo_b, hi_b, tau_b, mask)
    else:
        acc_grad_a = tl.zeros([ROWS, BLOCK], COMPUTE)
        acc_grad_b = tl.zeros([ROWS, BLOCK], COMPUTE)
        acc_free_a = tl.zeros([ROWS, BLOCK], tl.int32)
        acc_free_b = tl.zeros([ROWS, BLOCK], tl.int32)
        for start in range(0, n_cols, BLOCK):
            chunk = start + cols
            mask = row_mask[:, None] & (chunk < n_cols)[None, :]
            p, base_a, base_b, v_a, lo_a, hi_a, v_b, lo_b, hi_b = _load_terms(
                mixed_ptr, base_a_ptr, base_b_ptr, rows, chunk, mask, stride_mixed_row,
                stride_mixed_col, stride_a_row, stride_a_col, stride_b_row, stride_b_col,
                lam_col, mu_col, COMPUTE)
            grad_a = _load_tile(
                grad_a_ptr, rows, chunk, mask, stride_grad_a_row, stride_grad_a_col, COMPUTE)
            grad_b = _load_tile(
                grad_b_ptr, rows, chunk, mask, stride_grad_b_row, stride_grad_b_col, COMPUTE)
            chunk_grad_a, chunk_free_a = _free_grad(grad_a, v_a, lo_a, hi_a, tau_a, mask)
            chunk_grad_b, chunk_free_b = _free_grad(grad_b, v_b, lo_b, hi_b, tau_b, mask)
            acc_grad_a += chunk_grad_a
            acc_grad_b += chunk_grad_b
            acc_free_a += chunk_free_a
            acc_free_b += chunk_free_b
    mean_a = tl.sum(acc_grad_a, 1) / tl.maximum(tl.sum(acc_free_a, 1), 1).to(COMPUTE)
    mean_b = tl.sum(acc_grad_b, 1) / tl.maximum(tl.sum(acc_free_b, 1), 1).to(COMPUTE)

    # Pass 2: chain rule through v = K + r, r = p - lam K_a - mu K_b, and the bounds.
    acc_lam = tl.zeros([ROWS, BLOCK], COMPUTE)
    for start in range(0, n_cols, BLOCK):
        chunk = start + cols
        if not SINGLE_BLOCK:
            mask = row_mask[:, None] & (chunk < n_cols)[None, :]
            p, base_a, base_b, v_a, lo_a, hi_a, v_b, lo_b, hi_b = _load_terms(
                mixed_ptr, base_a_ptr, base_b_ptr, rows, chunk, mask, stride_mixed_row,
                stride_mixed_col, stride_a_row, stride_a_col, stride_b_row, stride_b_col,
                lam_col, mu_col, COMPUTE)
            grad_a = _load_tile(
                grad_a_ptr, rows, chunk, mask, stride_grad_a_row, stride_grad_a_col, COMPUTE)
            grad_b = _load_tile(
                grad_b_ptr, rows, chunk, mask, stride_grad_b_row, stride_grad_b_col, COMPUTE)
        target = tl.minimum(tl.maximum(p, 0.0), 1.0)
        to_v_a, to_target_a, to_lam_a = _side_vjp(
            grad_a, mean_a, v_a, lo_a, hi_a, tau_a, mask, target, lam_col, mu_col)
        to_v_b, to_target_b, to_mu_b = _side_vjp(
            grad_b, mean_b, v_b, lo_b, hi_b, tau_b, mask, target, mu_col, lam_col)
        in_range = (p >= 0) & (p <= 1)
        d_mixed = to_v_a + to_v_b + tl.where(in_range, to_target_a + to_target_b, 0.0)
        d_base_a = mu_col * to_v_a - lam_col * to_v_b
        d_base_b = lam_col * to_v_b - mu_col * to_v_a
        d_lam = (to_v_a + to_v_b) * (base_b - base_a) + to_lam_a - to_mu_b
        acc_lam += tl.where(solve_col, d_lam, 0.0)
        # lam == 0: a = K_a, b = clamp(p, 0, 1).  lam == 1: a = clamp(p, 0, 1), b = K_b.
        to_pinned = tl.where(in_range, tl.where(lam_col > 0, grad_a, grad_b), 0.0)
        d_mixed = tl.where(solve_col, d_mixed, to_pinned)
        d_base_a = tl.where(solve_col, d_base_a, tl.where(lam_col > 0, 0.0, grad_a))
        d_base_b = tl.where(solve_col, d_base_b, tl.where(lam_col > 0, grad_b, 0.0))
        offsets = rows[:, None] * n_cols + chunk[None, :]
        tl.store(d_mixed_ptr + offsets, d_mixed.to(d_mixed_ptr.dtype.element_ty), mask=mask)
        tl.store(d_base_a_ptr + offsets, d_base_a.to(d_base_a_ptr.dtype.element_ty), mask=mask)
        tl.store(d_base_b_ptr + offsets, d_base_b.to(d_base_b_ptr.dtype.element_ty), mask=mask)
    tl.store(d_lam_ptr + rows, tl.sum(acc_lam, 1).to(d_lam_ptr.dtype.element_ty), mask=row_mask)


# ----------------------------------------------------------------------------------------------
# Launching. The eager path (an autograd.Function, or a bare launch when no gradient is needed)
# and the custom ops that torch.compile sees call the same two launch helpers. The per-call
# host work is kept to allocating the outputs and one kernel launch: launch settings are cached
# per shape and dtype, and the current-device guard is skipped when it is already right.

# Under TRITON_INTERPRET=1 (read when Triton is imported) triton.jit returns interpreted kernels.
_INTERPRETED = triton is not None and not isinstance(_qp_fraction_fwd_kernel, JITFunction)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch_config(n_rows: int, n_cols: int) -> Tuple[int, int, bool, int]:
    """Rows per program, columns per block, whether a row fits in one block, warps."""
    single_block = n_cols <= _MAX_BLOCK
    block = triton.next_power_of_2(n_cols) if single_block else _CHUNK
    rows = min(triton.next_power_of_2(n_rows), max(_TILE // block, 1))
    return rows, block, single_block, min(max(rows * block // 256, 1), 16)


@functools.lru_cache(maxsize=1024)
def _launch_settings(n_rows: int, n_cols: int, dtype: torch.dtype) -> Tuple[Tuple[int], dict]:
    """Grid and constexpr/launch keywords shared by the forward and backward kernels."""
    rows, block, single_block, num_warps = _launch_config(n_rows, n_cols)
    compute = _compute_dtype(dtype)
    meta = dict(COMPUTE=_TL_DTYPES[compute], ROWS=rows, BLOCK=block, SINGLE_BLOCK=single_block,
                num_warps=num_warps)
    return (triton.cdiv(n_rows, rows),), meta


def _check_runnable(device: torch.device) -> None:
    if triton is None:
        raise ImportError("mkfkit's fused kernels need Triton: pip install 'mkfkit[triton]'")
    if device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError(
            f"mkfkit's Triton kernels run on CUDA tensors, or on CPU tensors under Triton's "
            f"interpreter (TRITON_INTERPRET=1 set before Triton is imported), but got a "
            f"{device.type} tensor"
        )


_NO_GUARD = contextlib.nullcontext()


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device (if it is not)."""
    _check_runnable(device)
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(device)


def _launch_forward(
    mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Tensor, count_iterations: bool = False
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(a, b, tau, iterations)``; ``iterations`` is written only with ``count_iterations``."""
    n_rows, n_cols = mixed.shape
    compute = _compute_dtype(mixed.dtype)
    a = mixed.new_empty((n_rows, n_cols))
    b = mixed.new_empty((n_rows, n_cols))
    tau = mixed.new_empty((2, n_rows), dtype=compute)
    # Otherwise `tau` stands in for the unused pointer.
    iterations = mixed.new_empty((n_rows,), dtype=torch.int32) if count_iterations else tau
    if n_rows == 0:
        return a, b, tau, iterations
    grid, meta = _launch_settings(n_rows, n_cols, mixed.dtype)
    with _on_device(mixed.device):
        _qp_fraction_fwd_kernel[grid](
            mixed, base_a, base_b, lam, a, b, tau, iterations,
            n_rows, n_cols, *mixed.stride(), *base_a.stride(), *base_b.stride(), lam.stride(0),
            COUNT_ITERATIONS=count_iterations, **_SOLVER_CONSTANTS[compute], **meta,
        )
    return a, b, tau, iterations


def _launch_backward(
    grad_a: Tensor, grad_b: Tensor, mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Tensor,
    tau: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``mixed``, ``base_a``, ``base_b`` and ``lam``."""
    n_rows, n_cols = mixed.shape
    d_mixed = mixed.new_empty((n_rows, n_cols))
    d_base_a = mixed.new_empty((n_rows, n_cols))
    d_base_b = mixed.new_empty((n_rows, n_cols))
    d_lam = lam.new_empty((n_rows,))
    if n_rows == 0:
        return d_mixed, d_base_a, d_base_b, d_lam
    grid, meta = _launch_settings(n_rows, n_cols, mixed.dtype)
    with _on_device(mixed.device):
        _qp_fraction_bwd_kernel[grid](
            grad_a, grad_b, mixed, base_a, base_b, lam, tau, d_mixed, d_base_a, d_base_b, d_lam,
            n_rows, n_cols, *grad_a.stride(), *grad_b.stride(), *mixed.stride(),
            *base_a.stride(), *base_b.stride(), lam.stride(0), **meta,
        )
    return d_mixed, d_base_a, d_base_b, d_lam


def _iteration_counts(mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Tensor) -> Tensor:
    """Passes the forward kernel made over each row (Tensor[B] int32); for tests, benchmarks."""
    return _launch_forward(mixed, base_a, base_b, lam, count_iterations=True)[3]


class _QPFractionFunction(torch.autograd.Function):
    """Eager autograd around the two launches (cheaper to call than the custom op)."""

    @staticmethod
    def forward(ctx, mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Tensor):
        a, b, tau, _ = _launch_forward(mixed, base_a, base_b, lam)
        ctx.save_for_backward(mixed, base_a, base_b, lam, tau)
        return a, b

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_a: Tensor, grad_b: Tensor):
        # Missing output gradients arrive as zeros (materialised by autograd).
        return _launch_backward(grad_a, grad_b, *ctx.saved_tensors)


@torch.library.custom_op("mkfkit::qp_fraction", mutates_args=())
def _qp_fraction_op(
    mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    a, b, tau, _ = _launch_forward(mixed, base_a, base_b, lam)
    return a, b, tau


@_qp_fraction_op.register_fake
def _(mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    tau = mixed.new_empty((2, mixed.shape[0]), dtype=_compute_dtype(mixed.dtype))
    return mixed.new_empty(mixed.shape), mixed.new_empty(mixed.shape), tau


@torch.library.custom_op("mkfkit::qp_fraction_backward", mutates_args=())
def _qp_fraction_backward_op(
    grad_a: Tensor, grad_b: Tensor, mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Tensor,
    tau: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _launch_backward(grad_a, grad_b, mixed, base_a, base_b, lam, tau)


@_qp_fraction_backward_op.register_fake
def _(
    grad_a: Tensor, grad_b: Tensor, mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Tensor,
    tau: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    shape = mixed.shape
    d_lam = lam.new_empty(lam.shape)
    return mixed.new_empty(shape), mixed.new_empty(shape), mixed.new_empty(shape), d_lam


def _setup_context(ctx, inputs, output) -> None:
    mixed, base_a, base_b, lam = inputs
    ctx.save_for_backward(mixed, base_a, base_b, lam, output[2])


def _backward(ctx, grad_a: Tensor, grad_b: Tensor, grad_tau: Tensor):
    # `tau` is internal state, never handed to users, so its gradient is ignored.
    mixed, base_a, base_b, lam, tau = ctx.saved_tensors
    if grad_a is None:
        grad_a = torch.zeros_like(mixed)
    if grad_b is None:
        grad_b = torch.zeros_like(mixed)
    return torch.ops.mkfkit.qp_fraction_backward(grad_a, grad_b, mixed, base_a, base_b, lam, tau)


torch.library.register_autograd("mkfkit::qp_fraction", _backward, setup_context=_setup_context)


def _qp_fraction(mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Tensor) -> Tuple[Tensor, Tensor]:
    """:func:`qp_fraction` without the argument checks (for callers that ran them already)."""
    if torch.compiler.is_compiling():
        a, b, _ = torch.ops.mkfkit.qp_fraction(mixed, base_a, base_b, lam)
        return a, b
    if torch.is_grad_enabled() and (
        mixed.requires_grad or base_a.requires_grad or base_b.requires_grad or lam.requires_grad
    ):
        return _QPFractionFunction.apply(mixed, base_a, base_b, lam)
    a, b, _, _ = _launch_forward(mixed, base_a, base_b, lam)
    return a, b


# ----------------------------------------------------------------------------------------------
# Knowledge bank: fused reads (bases, composite target) and the deterministic EMA write-back
#
# The bank keeps its rows in a dense Tensor[N, C] (float32, bfloat16 or float16) and a seen
# flag per row (bool, read and written as uint8). Half-precision rows are renormalised to sum
# 1 when read, as KnowledgeBank's torch path does. One program per batch row (reads) or per
# sorted entry (write-back); rows are walked in chunks of at most _BANK_BLOCK classes.
# Floating-point contraction is switched off (`enable_fp_fusion=False`) and quotients are
# IEEE-rounded (`div_rn`), so every elementwise step rounds as torch's separate kernels do.

_BANK_BLOCK = 4096


@_jit
def _bank_row_sum(store_ptr, row, cols, n_cols, BLOCK: tl.constexpr, NORMALIZE: tl.constexpr):
    """Divisor that decodes stored row ``row``: its float32 sum for half storage, else 1."""
    if NORMALIZE:
        total = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            chunk = start + cols
            total += tl.load(store_ptr + row * n_cols + chunk, mask=chunk < n_cols, other=0.0).to(
                tl.float32)
        return tl.sum(total, 0)
    return 1.0


@_jit
def _bank_read_kernel(
    store_ptr, seen_ptr, index_a_ptr, index_b_ptr, lam_ptr, out_a_ptr, out_b_ptr, flag_ptr,
    n_cols, stride_index_a, stride_index_b, stride_lam,
    HAS_B: tl.constexpr, MIX: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per batch row: K[I1] (and K[I2]) decoded to float32.

    MIX: out_a = lam K[I1] + (1 - lam) K[I2], flag = (seen[I1] | lam == 0) & (seen[I2] | lam == 1).
    Otherwise: out_a = K[I1], out_b = K[I2], flag = seen[I1] & seen[I2] (the bases of a split).
    Without HAS_B: out_a = K[I1], flag = seen[I1].
    """
    pair = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    row_a = tl.load(index_a_ptr + pair * stride_index_a).to(tl.int64)
    seen_a = tl.load(seen_ptr + row_a) != 0
    sum_a = _bank_row_sum(store_ptr, row_a, cols, n_cols, BLOCK, NORMALIZE)
    if HAS_B:
        row_b = tl.load(index_b_ptr + pair * stride_index_b).to(tl.int64)
        seen_b = tl.load(seen_ptr + row_b) != 0
        sum_b = _bank_row_sum(store_ptr, row_b, cols, n_cols, BLOCK, NORMALIZE)
        lam = tl.load(lam_ptr + pair * stride_lam).to(tl.float32)
        if MIX:
            flag = (seen_a | (lam == 0.0)) & (seen_b | (lam == 1.0))
        else:
            flag = seen_a & seen_b
    else:
        flag = seen_a
    for start in range(0, n_cols, BLOCK):
        chunk = start + cols
        in_row = chunk < n_cols
        known_a = tl.load(store_ptr + row_a * n_cols + chunk, mask=in_row, other=0.0).to(tl.float32)
        if NORMALIZE:
            known_a = tl.math.div_rn(known_a, sum_a)
        if HAS_B:
            known_b = tl.load(store_ptr + row_b * n_cols + chunk, mask=in_row, other=0.0).to(
                tl.float32)
            if NORMALIZE:
                known_b = tl.math.div_rn(known_b, sum_b)
            if MIX:
                tl.store(out_a_ptr + pair * n_cols + chunk, lam * known_a + (1.0 - lam) * known_b,
                         mask=in_row)
            else:
                tl.store(out_a_ptr + pair * n_cols + chunk, known_a, mask=in_row)
                tl.store(out_b_ptr + pair * n_cols + chunk, known_b, mask=in_row)
        else:
            tl.store(out_a_ptr + pair * n_cols + chunk, known_a, mask=in_row)
    tl.store(flag_ptr + pair, flag.to(tl.uint8))


@_jit
def _bank_entry(order_ptr, k, lam_ptr, stride_lam, pair_seen_ptr, n_pairs, HAS_B: tl.constexpr):
    """Entry at sorted position ``k``: (batch row, is it a b-side entry, is p~ itself the
    estimate, does it count)."""
    entry = tl.load(order_ptr + k)
    if HAS_B:
        side_b = entry >= n_pairs
        pair = tl.where(side_b, entry - n_pairs, entry)
        lam = tl.load(lam_ptr + pair * stride_lam).to(tl.float32)
        both_seen = tl.load(pair_seen_ptr + pair) != 0
        # A side of weight 1 is p~ itself; a side of weight 0 carries no information; a side
        # whose partner has a positive weight needs both bases known.
        use_probs = tl.where(side_b, lam == 0.0, lam == 1.0)
        valid = tl.where(side_b, lam < 1.0, lam > 0.0) & (use_probs | both_seen)
    else:
        # Unmixed: every entry is a row of p counting for itself (the comparisons give the
        # same types as above).
        pair = entry
        side_b = entry < 0
        use_probs = entry >= 0
        valid = entry >= 0
    return pair, side_b, use_probs, valid


@_jit
def _bank_write_kernel(
    store_ptr, seen_ptr, sorted_rows_ptr, order_ptr, probs_ptr, a_ptr, b_ptr, lam_ptr,
    pair_seen_ptr, n_entries, n_pairs, n_cols, stride_probs_row, stride_probs_col, stride_lam,
    momentum, keep,
    HAS_B: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One EMA step per bank row with the mean of its valid estimates in this call.

    The program at the head of each run of equal rows in ``sorted_rows`` owns that row: it
    sums the run's valid estimates in sorted order (a stable sort keeps batch order, a-side
    entries before b-side entries), so the result depends only on that row's own estimates,
    with no atomics; then new = m * mean + (1 - m) * old (old decoded), or mean for a row
    never written, and sets its seen flag. Other programs return at once.
    """
    head = tl.program_id(0).to(tl.int64)
    row = tl.load(sorted_rows_ptr + head)
    previous = tl.load(sorted_rows_ptr + tl.maximum(head - 1, 0))
    if (head == 0) | (previous != row):
        # The run is [head, end); count its valid entries.
        end = head + 1
        count = tl.full([], 0, tl.int32)
        more = end < n_entries
        while more:
            more = tl.load(sorted_rows_ptr + end) == row
            end = tl.where(more, end + 1, end)
            more = more & (end < n_entries)
        for k in range(head, end):
            _, _, _, valid = _bank_entry(order_ptr, k, lam_ptr, stride_lam, pair_seen_ptr,
                                         n_pairs, HAS_B)
            count += valid.to(tl.int32)
        if count > 0:
            cols = tl.arange(0, BLOCK)
            seen = tl.load(seen_ptr + row) != 0
            old_sum = _bank_row_sum(store_ptr, row, cols, n_cols, BLOCK, NORMALIZE)
            for start in range(0, n_cols, BLOCK):
                chunk = start + cols
                in_row = chunk < n_cols
                total = tl.zeros([BLOCK], tl.float32)
                for k in range(head, end):
                    pair, side_b, use_probs, valid = _bank_entry(
                        order_ptr, k, lam_ptr, stride_lam, pair_seen_ptr, n_pairs, HAS_B)
                    # At most one of the three loads reads memory (none for an entry that does
                    # not count); adding the zeros of the others is exact. (Scalar conditions
                    # join the column mask through tl.where: the interpreter mistypes `&`.)
                    from_probs = tl.load(
                        probs_ptr + pair * stride_probs_row + chunk * stride_probs_col,
                        mask=tl.where(valid & use_probs, in_row, False), other=0.0)
                    from_a = tl.load(a_ptr + pair * n_cols + chunk,
                                     mask=tl.where(valid & ~use_probs & ~side_b, in_row, False),
                                     other=0.0)
                    from_b = tl.load(b_ptr + pair * n_cols + chunk,
                                     mask=tl.where(valid & ~use_probs & side_b, in_row, False),
                                     other=0.0)
                    total += (from_probs + from_a) + from_b
                mean = tl.math.div_rn(total, count.to(tl.float32))
                old = tl.load(store_ptr + row * n_cols + chunk, mask=in_row, other=0.0).to(
                    tl.float32)
                if NORMALIZE:
                    old = tl.math.div_rn(old, old_sum)
                new = tl.where(seen, momentum * mean + keep * old, mean)
                tl.store(store_ptr + row * n_cols + chunk,
                         new.to(store_ptr.dtype.element_ty), mask=in_row)
            tl.store(seen_ptr + row, tl.full([], 1, tl.uint8))


def _bank_settings(n_cols: int) -> dict:
    block = min(triton.next_power_of_2(n_cols), _BANK_BLOCK)
    return dict(BLOCK=block, num_warps=min(max(block // 256, 1), 8), enable_fp_fusion=False)


def bank_read(
    store: Tensor, seen: Tensor, index_a: Tensor, index_b: Tensor | None = None,
    lam: Tensor | None = None,
) -> Tuple[Tensor, Tensor | None, Tensor]:
    """Rows of a dense bank, decoded to float32, in one launch (no checks; for KnowledgeBank).

    Args:
        store: Tensor[N, C] (float32/bfloat16/float16), rows of one group.
        seen: bool Tensor[N].
        index_a, index_b: int Tensor[B] rows ``I1`` and ``I2`` (``index_b`` may be None).
        lam: float Tensor[B]: with it, the composite ``lam K[I1] + (1 - lam) K[I2]``.

    Returns:
        ``(first, second, flag)``, float32 Tensor[B, C], Tensor[B, C] or None, bool Tensor[B]:
        with ``lam``: (composite, None, every side of positive weight seen); with ``index_b``
        only: (K[I1], K[I2], both seen); with neither: (K[I1], None, seen[I1]).
    """
    n_pairs, n_cols = index_a.shape[0], store.shape[1]
    has_b, mix = index_b is not None, lam is not None
    first = torch.empty((n_pairs, n_cols), dtype=torch.float32, device=store.device)
    second = torch.empty_like(first) if has_b and not mix else None
    flag = torch.empty((n_pairs,), dtype=torch.bool, device=store.device)
    if n_pairs == 0:
        return first, second, flag
    with _on_device(store.device):
        _bank_read_kernel[(n_pairs,)](
            store, seen.view(torch.uint8), index_a, index_b if has_b else index_a,
            lam if mix else first, first, second if second is not None else first,
            flag.view(torch.uint8), n_cols, index_a.stride(0),
            index_b.stride(0) if has_b else 0, lam.stride(0) if mix else 0,
            HAS_B=has_b, MIX=mix, NORMALIZE=store.dtype != torch.float32, **_bank_settings(n_cols),
        )
    return first, second, flag


def bank_update(
    store: Tensor, seen: Tensor, probs: Tensor, index_a: Tensor, momentum: float,
    index_b: Tensor | None = None, lam: Tensor | None = None, split=None,
) -> None:
    """KnowledgeBank's update of one group in place, fused (no checks; for KnowledgeBank).

    Unmixed (``index_b`` None): each row named in ``index_a`` takes one EMA step with the mean
    of its ``probs`` rows. Mixed: ``split(probs, K[I1], K[I2], lam) -> (a, b)`` gives the
    estimates (a fraction with ``mask_a = lam > 0``, ``mask_b = lam < 1``); the a side counts
    where ``lam > 0`` and (``lam == 1`` or both rows seen), with ``probs`` itself where
    ``lam == 1``; the b side mirrors it. Launches: one read of both bases (mixed only), the
    split, a stable sort of the destination rows (torch), one write-back kernel.

    Args:
        store: Tensor[N, C] (float32/bfloat16/float16), rows of one group, updated in place.
        seen: bool Tensor[N], updated in place.
        probs: float32 Tensor[B, C].
        index_a, index_b: int64 Tensor[B] on the device of ``store``.
        momentum: EMA weight of the new estimate.
        lam: float32 Tensor[B] (mixed only).
        split: the fraction, ``split(probs, base_a, base_b, lam) -> (a, b)`` (mixed only).
    """
    n_pairs, n_cols = probs.shape
    if n_pairs == 0:
        return
    has_b = index_b is not None
    if has_b:
        base_a, base_b, both_seen = bank_read(store, seen, index_a, index_b)
        a, b = split(probs, base_a, base_b, lam)
        rows = torch.cat((index_a, index_b))
    else:
        a = b = probs
        both_seen, lam, rows = seen, probs, index_a
    sorted_rows, order = torch.sort(rows, stable=True)
    with _on_device(store.device):
        _bank_write_kernel[(rows.shape[0],)](
            store, seen.view(torch.uint8), sorted_rows, order, probs, a.contiguous(),
            b.contiguous(), lam, both_seen.view(torch.uint8), rows.shape[0], n_pairs, n_cols,
            *probs.stride(), lam.stride(0) if has_b else 0, float(momentum), 1.0 - float(momentum),
            HAS_B=has_b, NORMALIZE=store.dtype != torch.float32, **_bank_settings(n_cols),
        )


# ----------------------------------------------------------------------------------------------
# Public entry point


def qp_fraction(
    mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Tensor
) -> Tuple[Tensor, Tensor]:
    """Exact QP knowledge fraction (OPT1) of every row, in one fused kernel launch.

    Same semantics as :func:`mkfkit.fraction.qp_fraction` with the exact solver (see the module
    docstring for the formulas); value checks (ranges, simplex rows) are the caller's job.

    Args:
        mixed: Tensor[B, C] mixed output ``p~``, rows on the probability simplex.
        base_a: Tensor[B, C] stored knowledge of image a.
        base_b: Tensor[B, C] stored knowledge of image b.
        lam: Tensor[B] weights of image a in [0, 1].

    Returns:
        ``(a, b)``, each Tensor[B, C] with the dtype of ``mixed``; differentiable with respect to
        all four inputs (computed in float32 for float32/bfloat16/float16, float64 for float64).

    Example:
        >>> import torch
        >>> from mkfkit import _triton
        >>> mixed = torch.tensor([[0.6, 0.4]])
        >>> a, b = _triton.qp_fraction(mixed, mixed, mixed, torch.tensor([0.5]))  # CPU: interpreter
        >>> torch.allclose(a, mixed) and torch.allclose(b, mixed)
        True
    """
    check_floating(mixed, "mixed")
    check_shape(mixed, "mixed", (None, None), "Tensor[B, C]")
    for value, name in ((base_a, "base_a"), (base_b, "base_b")):
        check_floating(value, name)
        check_same_shape(value, name, mixed, "mixed")
        check_same_dtype(value, name, mixed, "mixed")
        check_same_device(value, name, mixed, "mixed")
    check_floating(lam, "lam")
    check_shape(lam, "lam", (mixed.shape[0],), "Tensor[B]")
    check_same_device(lam, "lam", mixed, "mixed")
    return _qp_fraction(mixed, base_a, base_b, lam)
