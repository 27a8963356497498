"""Fused Triton kernels for the exact QP knowledge fraction (OPT1 in closed form).

For one row with weight ``lam`` in [0, 1] (``mu = 1 - lam``), bases ``K_a``, ``K_b`` and the
mixed output clamped to [0, 1] and scaled to sum 1, ``p`` (the QP's constraints hold together
only on the simplex; :func:`mkfkit.fraction._feasible_target` makes the same row), the exact QP
fraction is two projections sharing one residual:

.. math::

    r = p - \\lambda K_a - \\mu K_b, \\qquad
    a = \\operatorname{clip}(K_a + r + \\tau_a, lo_a, hi_a), \\qquad
    b = \\operatorname{clip}(K_b + r + \\tau_b, lo_b, hi_b),

with ``lo``/``hi`` the bounds the mixing identity puts on each side and the scalars ``tau``
chosen so that both rows sum to 1. ``tau`` is found by safeguarded Newton steps on the row sum
(no sort), both sides in the same pass, after one pass for the row sums; a side of weight 0
keeps its base. The backward takes three passes after that one. The algorithm, its stopping
rules and the backward's chain rule are written out in docs/METHOD.md, "Knowledge fraction: the
fused QP kernel". At a side with every coordinate at a bound, the gradients of the three
probability rows may differ from the torch path's by a constant per row (the kernel counts only
coordinates strictly inside their box as free); they agree on the part tangent to the simplex
("Gradients on the simplex" there).

Arithmetic is float32 for float32/bfloat16/float16 inputs (float64 stays float64); outputs
have the input dtype. No host-device synchronisation, no atomics; the forward and the backward
are one launch each, on contiguous rows (the launchers make them so). Under ``torch.compile``
they are the custom ops ``mkfkit::qp_fraction`` and ``mkfkit::qp_fraction_backward``; in eager
mode the same launches run from a plain ``torch.autograd.Function`` (or directly, when no input
needs a gradient), which costs far less host time per call than a Python custom op.
"""

from __future__ import annotations

import functools
from typing import Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mkfkit._dtypes import compute_dtype
from mkfkit.kernels._import import jit, on_device, tl, triton

__all__ = ["qp_pair", "iteration_counts"]

# Launch rule, from the kernels compiled for sm_80 and sm_90 (benchmarks/bench_kernels.py;
# RESULTS.md, "Kernel resources"). A thread holds _PER_THREAD elements of its program's tile
# (float64 needs twice the registers an element), in up to _MAX_WARPS warps; short rows are
# packed _TILE // BLOCK to a program, whatever the batch (one compiled kernel per block size).
# Rows of up to _MAX_BLOCK classes stay in registers (16 warps, up to four elements a thread);
# longer rows loop over chunks of _MAX_BLOCK classes. ptxas is held to _MAX_REGISTERS a
# thread, which leaves an SM room for 16 of its 64 warps: without the bound it trades a few
# spilled bytes for occupancy of its own choosing (8 to 56 bytes in some configurations).
# Blocks of 4096 classes need more than 128 registers and spill under it.
_PER_THREAD = {torch.float32: 2, torch.float64: 1}
_MAX_BLOCK = {torch.float32: 2048, torch.float64: 1024}
_TILE = 256
_MIN_BLOCK = 16
_MAX_WARPS = 16
_MAX_REGISTERS = 128
# Cap on the Newton passes: bisection alone shrinks a bracket to rounding level in about 25
# (float32) or 54 (float64).
_SOLVER_CONSTANTS = {
    dtype: dict(EPS=torch.finfo(dtype).eps, MAX_ITERATIONS=cap)
    for dtype, cap in ((torch.float32, 64), (torch.float64, 128))
}
_TL_DTYPES = {} if triton is None else {torch.float32: tl.float32, torch.float64: tl.float64}


# ----------------------------------------------------------------------------------------------
# Device functions. A program owns a tile of ROWS rows; rows longer than one BLOCK of columns
# are walked chunk by chunk. Per-row solver state lives in Tensor[ROWS] vectors.


@jit
def _load_tile(ptr, offsets, mask, COMPUTE: tl.constexpr):
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(COMPUTE)


@jit
def _bounds(target, weight, other_weight):
    # lo = max(0, (target - other_weight) / weight), hi = min(1, target / weight); a zero weight
    # never divides (its side keeps its base and these bounds are unused).
    safe_weight = tl.where(weight > 0, weight, 1.0)
    lo = tl.maximum((target - other_weight) / safe_weight, 0.0)
    hi = tl.minimum(target / safe_weight, 1.0)
    return lo, hi


@jit
def _clamped(p):
    # Entries of p a hair outside [0, 1] (within the row tolerance) would cross the bounds.
    return tl.minimum(tl.maximum(p, 0.0), 1.0)


@jit
def _row_totals(mixed_ptr, rows, row_mask, cols, n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                COMPUTE: tl.constexpr):
    """Row sums of the clamped p, Tensor[ROWS, 1] (1 on padding rows): the target is the clamped
    p over its sum, on the simplex as the QP needs (mkfkit.fraction._feasible_target)."""
    acc = tl.zeros([ROWS, BLOCK], COMPUTE)
    for start in range(0, n_cols, BLOCK):
        offsets, mask = _tile(rows, row_mask, start, cols, n_cols)
        acc += _clamped(_load_tile(mixed_ptr, offsets, mask, COMPUTE))
    total = tl.sum(acc, 1)
    return tl.where(total > 0, total, 1.0)[:, None]


@jit
def _side_terms(target, base_a, base_b, lam, mu):
    """Projection inputs v and bounds of both sides; masked lanes get v = lo = hi = 0."""
    residual = target - lam * base_a - mu * base_b
    lo_a, hi_a = _bounds(target, lam, mu)
    lo_b, hi_b = _bounds(target, mu, lam)
    return base_a + residual, lo_a, hi_a, base_b + residual, lo_b, hi_b


@jit
def _load_terms(mixed_ptr, base_a_ptr, base_b_ptr, offsets, mask, lam, mu, total, COMPUTE: tl.constexpr):
    """Load a tile of p, K_a, K_b; derive the target (p clamped, over ``total``, its row sums)
    and both sides' projection inputs and bounds."""
    p = _load_tile(mixed_ptr, offsets, mask, COMPUTE)
    base_a = _load_tile(base_a_ptr, offsets, mask, COMPUTE)
    base_b = _load_tile(base_b_ptr, offsets, mask, COMPUTE)
    target = _clamped(p) / total
    v_a, lo_a, hi_a, v_b, lo_b, hi_b = _side_terms(target, base_a, base_b, lam, mu)
    return p, target, base_a, base_b, v_a, lo_a, hi_a, v_b, lo_b, hi_b


@jit
def _load_grad_terms(grad_a_ptr, grad_b_ptr, mixed_ptr, base_a_ptr, base_b_ptr, rows, row_mask, start, cols,
                     n_cols, lam, mu, total, COMPUTE: tl.constexpr):
    """The backward's loads of the tile of columns ``start + cols``: its offsets and mask,
    :func:`_load_terms` and the incoming gradients."""
    offsets, mask = _tile(rows, row_mask, start, cols, n_cols)
    p, target, base_a, base_b, v_a, lo_a, hi_a, v_b, lo_b, hi_b = _load_terms(
        mixed_ptr, base_a_ptr, base_b_ptr, offsets, mask, lam, mu, total, COMPUTE)
    grad_a = _load_tile(grad_a_ptr, offsets, mask, COMPUTE)
    grad_b = _load_tile(grad_b_ptr, offsets, mask, COMPUTE)
    return offsets, mask, p, target, base_a, base_b, v_a, lo_a, hi_a, v_b, lo_b, hi_b, grad_a, grad_b


@jit
def _tile(rows, row_mask, start, cols, n_cols):
    """Offsets (contiguous rows) and mask of the tile of columns ``start + cols``."""
    chunk = start + cols
    return rows[:, None] * n_cols + chunk[None, :], row_mask[:, None] & (chunk < n_cols)[None, :]


@jit
def _program_rows(lam_ptr, n_rows, ROWS: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    """The rows a program owns, their mask, the column offsets of one block, the weights as
    columns, and which rows are solved (both weights positive)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    lam = tl.load(lam_ptr + rows, mask=row_mask, other=0.0).to(COMPUTE)
    mu = 1.0 - lam
    return rows, row_mask, tl.arange(0, BLOCK), lam[:, None], mu[:, None], (lam > 0) & (mu > 0)


@jit
def _classify(v, lo, hi, tau, mask):
    """Projected values, free set and upper-bound set of one side at ``tau`` (Tensor[ROWS])."""
    shifted = v + tau[:, None]
    x = tl.minimum(tl.maximum(shifted, lo), hi)
    free = (shifted > lo) & (shifted < hi) & mask
    upper = (shifted >= hi) & mask
    return x, free, upper


@jit
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


@jit
def _qp_fraction_fwd_kernel(
    mixed_ptr, base_a_ptr, base_b_ptr, lam_ptr, a_ptr, b_ptr, tau_ptr, iterations_ptr,
    n_rows, n_cols,
    COMPUTE: tl.constexpr, EPS: tl.constexpr, MAX_ITERATIONS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
    COUNT_ITERATIONS: tl.constexpr,
):
    rows, row_mask, cols, lam_col, mu_col, solve = _program_rows(lam_ptr, n_rows, ROWS, BLOCK, COMPUTE)

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
    # A zero-weight side keeps its base; the other side's bounds then pin it to the target.
    done_a = ~solve
    done_b = ~solve
    row_passes = tl.full([ROWS], 0, tl.int32)
    total = _row_totals(mixed_ptr, rows, row_mask, cols, n_cols, ROWS, BLOCK, COMPUTE)

    if SINGLE_BLOCK:
        offsets, mask = _tile(rows, row_mask, 0, cols, n_cols)
        p, target, base_a, base_b, v_a, lo_a, hi_a, v_b, lo_b, hi_b = _load_terms(
            mixed_ptr, base_a_ptr, base_b_ptr, offsets, mask, lam_col, mu_col, total, COMPUTE)
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
                offsets, mask = _tile(rows, row_mask, start, cols, n_cols)
                p, target, base_a, base_b, v_a, lo_a, hi_a, v_b, lo_b, hi_b = _load_terms(
                    mixed_ptr, base_a_ptr, base_b_ptr, offsets, mask, lam_col, mu_col, total, COMPUTE)
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
        if not SINGLE_BLOCK:
            offsets, mask = _tile(rows, row_mask, start, cols, n_cols)
            p, target, base_a, base_b, v_a, lo_a, hi_a, v_b, lo_b, hi_b = _load_terms(
                mixed_ptr, base_a_ptr, base_b_ptr, offsets, mask, lam_col, mu_col, total, COMPUTE)
        a = tl.minimum(tl.maximum(v_a + tau_a[:, None], lo_a), hi_a)
        b = tl.minimum(tl.maximum(v_b + tau_b[:, None], lo_b), hi_b)
        a = tl.where(lam_col > 0, a, base_a)
        b = tl.where(mu_col > 0, b, base_b)
        tl.store(a_ptr + offsets, a.to(a_ptr.dtype.element_ty), mask=mask)
        tl.store(b_ptr + offsets, b.to(b_ptr.dtype.element_ty), mask=mask)


@jit
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


@jit
def _tile_vjp(target, base_a, base_b, v_a, lo_a, hi_a, v_b, lo_b, hi_b, grad_a, grad_b, mean_a, mean_b,
              tau_a, tau_b, mask, lam, mu, solve):
    """Gradients reaching the target, K_a, K_b and lam from one tile: the chain rule through
    v = K + r, r = target - lam K_a - mu K_b, and the bounds."""
    to_v_a, to_target_a, to_lam_a = _side_vjp(grad_a, mean_a, v_a, lo_a, hi_a, tau_a, mask, target, lam, mu)
    to_v_b, to_target_b, to_mu_b = _side_vjp(grad_b, mean_b, v_b, lo_b, hi_b, tau_b, mask, target, mu, lam)
    d_target = to_v_a + to_v_b + to_target_a + to_target_b
    d_base_a = mu * to_v_a - lam * to_v_b
    d_base_b = lam * to_v_b - mu * to_v_a
    d_lam = (to_v_a + to_v_b) * (base_b - base_a) + to_lam_a - to_mu_b
    # lam == 0: a = K_a, b = target.  lam == 1: a = target, b = K_b.
    d_target = tl.where(solve, d_target, tl.where(lam > 0, grad_a, grad_b))
    d_base_a = tl.where(solve, d_base_a, tl.where(lam > 0, 0.0, grad_a))
    d_base_b = tl.where(solve, d_base_b, tl.where(lam > 0, grad_b, 0.0))
    return d_target, d_base_a, d_base_b, tl.where(solve, d_lam, 0.0)


@jit
def _free_grad(grad, v, lo, hi, tau, mask):
    _, free, _ = _classify(v, lo, hi, tau, mask)
    return tl.where(free, grad, 0.0), free.to(tl.int32)


@jit
def _qp_fraction_bwd_kernel(
    grad_a_ptr, grad_b_ptr, mixed_ptr, base_a_ptr, base_b_ptr, lam_ptr, tau_ptr,
    d_mixed_ptr, d_base_a_ptr, d_base_b_ptr, d_lam_ptr,
    n_rows, n_cols,
    COMPUTE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    rows, row_mask, cols, lam_col, mu_col, solve = _program_rows(lam_ptr, n_rows, ROWS, BLOCK, COMPUTE)
    solve_col = solve[:, None]
    tau_a = tl.load(tau_ptr + rows, mask=row_mask, other=0.0).to(COMPUTE)
    tau_b = tl.load(tau_ptr + n_rows + rows, mask=row_mask, other=0.0).to(COMPUTE)
    total = _row_totals(mixed_ptr, rows, row_mask, cols, n_cols, ROWS, BLOCK, COMPUTE)

    # Pass 1: the mean incoming gradient over each side's free set.
    if SINGLE_BLOCK:
        (offsets, mask, p, target, base_a, base_b, v_a, lo_a, hi_a, v_b, lo_b, hi_b, grad_a,
         grad_b) = _load_grad_terms(grad_a_ptr, grad_b_ptr, mixed_ptr, base_a_ptr, base_b_ptr, rows,
                                    row_mask, 0, cols, n_cols, lam_col, mu_col, total, COMPUTE)
        acc_grad_a, acc_free_a = _free_grad(grad_a, v_a, lo_a, hi_a, tau_a, mask)
        acc_grad_b, acc_free_b = _free_grad(grad_b, v_b, lo_b, hi_b, tau_b, mask)
    else:
        acc_grad_a = tl.zeros([ROWS, BLOCK], COMPUTE)
        acc_grad_b = tl.zeros([ROWS, BLOCK], COMPUTE)
        acc_free_a = tl.zeros([ROWS, BLOCK], tl.int32)
        acc_free_b = tl.zeros([ROWS, BLOCK], tl.int32)
        for start in range(0, n_cols, BLOCK):
            (offsets, mask, p, target, base_a, base_b, v_a, lo_a, hi_a, v_b, lo_b, hi_b, grad_a,
             grad_b) = _load_grad_terms(grad_a_ptr, grad_b_ptr, mixed_ptr, base_a_ptr, base_b_ptr, rows,
                                        row_mask, start, cols, n_cols, lam_col, mu_col, total, COMPUTE)
            chunk_grad_a, chunk_free_a = _free_grad(grad_a, v_a, lo_a, hi_a, tau_a, mask)
            chunk_grad_b, chunk_free_b = _free_grad(grad_b, v_b, lo_b, hi_b, tau_b, mask)
            acc_grad_a += chunk_grad_a
            acc_grad_b += chunk_grad_b
            acc_free_a += chunk_free_a
            acc_free_b += chunk_free_b
    mean_a = tl.sum(acc_grad_a, 1) / tl.maximum(tl.sum(acc_free_a, 1), 1).to(COMPUTE)
    mean_b = tl.sum(acc_grad_b, 1) / tl.maximum(tl.sum(acc_free_b, 1), 1).to(COMPUTE)

    # Pass 2: lam's gradient, and the row sum of the target's gradient times the target.
    acc_lam = tl.zeros([ROWS, BLOCK], COMPUTE)
    acc_dot = tl.zeros([ROWS, BLOCK], COMPUTE)
    for start in range(0, n_cols, BLOCK):
        if not SINGLE_BLOCK:
            (offsets, mask, p, target, base_a, base_b, v_a, lo_a, hi_a, v_b, lo_b, hi_b, grad_a,
             grad_b) = _load_grad_terms(grad_a_ptr, grad_b_ptr, mixed_ptr, base_a_ptr, base_b_ptr, rows,
                                        row_mask, start, cols, n_cols, lam_col, mu_col, total, COMPUTE)
        d_target, _, _, d_lam = _tile_vjp(target, base_a, base_b, v_a, lo_a, hi_a, v_b, lo_b, hi_b, grad_a,
                                          grad_b, mean_a, mean_b, tau_a, tau_b, mask, lam_col, mu_col, solve_col)
        acc_lam += d_lam
        acc_dot += d_target * target
    tl.store(d_lam_ptr + rows, tl.sum(acc_lam, 1).to(d_lam_ptr.dtype.element_ty), mask=row_mask)
    dot = tl.sum(acc_dot, 1)[:, None]

    # Pass 3: the three rows' gradients. target = clamp(p, 0, 1) / total has the Jacobian
    # (I - target 1^T) / total where p lies in [0, 1], and 0 elsewhere.
    for start in range(0, n_cols, BLOCK):
        if not SINGLE_BLOCK:
            (offsets, mask, p, target, base_a, base_b, v_a, lo_a, hi_a, v_b, lo_b, hi_b, grad_a,
             grad_b) = _load_grad_terms(grad_a_ptr, grad_b_ptr, mixed_ptr, base_a_ptr, base_b_ptr, rows,
                                        row_mask, start, cols, n_cols, lam_col, mu_col, total, COMPUTE)
        d_target, d_base_a, d_base_b, _ = _tile_vjp(target, base_a, base_b, v_a, lo_a, hi_a, v_b, lo_b, hi_b,
                                                    grad_a, grad_b, mean_a, mean_b, tau_a, tau_b, mask, lam_col,
                                                    mu_col, solve_col)
        d_mixed = tl.where((p >= 0) & (p <= 1), (d_target - dot) / total, 0.0)
        tl.store(d_mixed_ptr + offsets, d_mixed.to(d_mixed_ptr.dtype.element_ty), mask=mask)
        tl.store(d_base_a_ptr + offsets, d_base_a.to(d_base_a_ptr.dtype.element_ty), mask=mask)
        tl.store(d_base_b_ptr + offsets, d_base_b.to(d_base_b_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launching. The eager path (an autograd.Function, or a bare launch when no gradient is needed)
# and the custom ops that torch.compile sees call the same two launch helpers. The per-call
# host work is kept to allocating the outputs and one kernel launch: launch settings are cached
# per shape and dtype, and the current-device guard is skipped when it is already right.

def _launch_config(n_cols: int, compute: torch.dtype) -> Tuple[int, int, bool, int]:
    """Rows per program, columns per block, whether a row fits in one block, and warps, for
    rows of ``n_cols`` classes computed in ``compute`` (the launch rule: one owner)."""
    single_block = n_cols <= _MAX_BLOCK[compute]
    block = max(triton.next_power_of_2(n_cols), _MIN_BLOCK) if single_block else _MAX_BLOCK[compute]
    rows = max(_TILE // block, 1)
    return rows, block, single_block, min(rows * block // (32 * _PER_THREAD[compute]), _MAX_WARPS)


@functools.lru_cache(maxsize=1024)
def _launch_settings(n_rows: int, n_cols: int, compute: torch.dtype) -> Tuple[Tuple[int], dict]:
    """Grid and constexpr/launch keywords shared by the forward and backward kernels."""
    rows, block, single_block, num_warps = _launch_config(n_cols, compute)
    meta = dict(COMPUTE=_TL_DTYPES[compute], ROWS=rows, BLOCK=block, SINGLE_BLOCK=single_block,
                num_warps=num_warps, maxnreg=_MAX_REGISTERS)
    return (triton.cdiv(n_rows, rows),), meta


def _launch_forward(
    mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Tensor, count_iterations: bool = False
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(a, b, tau, iterations)``; ``iterations`` is written only with ``count_iterations``."""
    mixed, base_a, base_b, lam = (t.contiguous() for t in (mixed, base_a, base_b, lam))
    n_rows, n_cols = mixed.shape
    compute = compute_dtype(mixed)
    a = mixed.new_empty((n_rows, n_cols))
    b = mixed.new_empty((n_rows, n_cols))
    tau = mixed.new_empty((2, n_rows), dtype=compute)
    # Otherwise `tau` stands in for the unused pointer.
    iterations = mixed.new_empty((n_rows,), dtype=torch.int32) if count_iterations else tau
    if n_rows == 0:
        return a, b, tau, iterations
    grid, meta = _launch_settings(n_rows, n_cols, compute)
    with on_device(mixed.device):
        _qp_fraction_fwd_kernel[grid](
            mixed, base_a, base_b, lam, a, b, tau, iterations,
            n_rows, n_cols,
            COUNT_ITERATIONS=count_iterations, **_SOLVER_CONSTANTS[compute], **meta,
        )
    return a, b, tau, iterations


def _launch_backward(
    grad_a: Tensor, grad_b: Tensor, mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Tensor,
    tau: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``mixed``, ``base_a``, ``base_b`` and ``lam``."""
    grad_a, grad_b, mixed, base_a, base_b, lam = (
        t.contiguous() for t in (grad_a, grad_b, mixed, base_a, base_b, lam))
    n_rows, n_cols = mixed.shape
    d_mixed = mixed.new_empty((n_rows, n_cols))
    d_base_a = mixed.new_empty((n_rows, n_cols))
    d_base_b = mixed.new_empty((n_rows, n_cols))
    d_lam = lam.new_empty((n_rows,))
    if n_rows == 0:
        return d_mixed, d_base_a, d_base_b, d_lam
    grid, meta = _launch_settings(n_rows, n_cols, compute_dtype(mixed))
    with on_device(mixed.device):
        _qp_fraction_bwd_kernel[grid](
            grad_a, grad_b, mixed, base_a, base_b, lam, tau, d_mixed, d_base_a, d_base_b, d_lam,
            n_rows, n_cols, **meta,
        )
    return d_mixed, d_base_a, d_base_b, d_lam


def iteration_counts(mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Tensor) -> Tensor:
    """Passes the forward kernel made over each row (Tensor[B] int32): a diagnostic."""
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
    tau = mixed.new_empty((2, mixed.shape[0]), dtype=compute_dtype(mixed))
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


def qp_pair(mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Tensor) -> Tuple[Tensor, Tensor]:
    """Exact QP fraction ``(a, b)`` of every row, one launch (no checks: the fraction's job).

    Args:
        mixed, base_a, base_b: Tensor[B, C] probability rows of one floating dtype.
        lam: Tensor[B] weights of image a in [0, 1].

    Returns:
        ``(a, b)``, each Tensor[B, C] in the dtype of ``mixed``; differentiable with respect to
        all four inputs (computed in float32 for float32/bfloat16/float16, else float64).

    Example:
        >>> from mkfkit import kernels
        >>> mixed = torch.tensor([[0.6, 0.4]])
        >>> if kernels.available("cpu"):  # CPU: only under Triton's interpreter
        ...     a, b = qp_pair(mixed, mixed, mixed, torch.tensor([0.5]))
        ...     assert torch.allclose(a, mixed) and torch.allclose(b, mixed)
    """
    if torch.compiler.is_compiling():
        a, b, _ = torch.ops.mkfkit.qp_fraction(mixed, base_a, base_b, lam)
        return a, b
    if torch.is_grad_enabled() and (
        mixed.requires_grad or base_a.requires_grad or base_b.requires_grad or lam.requires_grad
    ):
        return _QPFractionFunction.apply(mixed, base_a, base_b, lam)
    a, b, _, _ = _launch_forward(mixed, base_a, base_b, lam)
    return a, b
