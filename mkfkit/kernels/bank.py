"""Fused Triton kernels for the knowledge bank: reads of stored rows, deterministic write-back.

The bank keeps its rows of one group in a dense Tensor[N, C] (float32, bfloat16 or float16) and
a seen flag per row (bool, read and written as uint8). Half-precision rows are renormalised to
sum 1 when read, as :class:`~mkfkit.bank.KnowledgeBank`'s torch path does. The kernels only
compute: which estimates count, and what a seen flag means for a target, is the bank's rule
(:mod:`mkfkit.bank`); it hands :func:`write` the estimates and their validity.

One program per batch row (reads) or per sorted entry (write-back); rows are walked in chunks
of at most ``_MAX_BLOCK`` classes (:func:`_launch_config`). Floating-point contraction is
switched off (``enable_fp_fusion=False``) and quotients are IEEE-rounded (``div_rn``), so
every elementwise step rounds as torch's separate kernels do. No atomics, no host synchronisation.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mkfkit.kernels._import import jit, on_device, tl, triton

__all__ = ["read", "write"]

# Launch rule (benchmarks/bench_kernels.py; RESULTS.md, "Kernel resources"): a block of
# _MIN_BLOCK to _MAX_BLOCK columns, a warp per 256 of them (up to 8 elements a thread, at most
# 68 registers on sm_80/sm_90, no spills). _MIN_BLOCK is one warp's 16-byte float32 loads: a
# smaller block would cost no less, only add a compiled variant. Sixteen warps for the longest
# rows, so that a batch with a row for every SM fills a quarter of its warp slots (8 warps
# left the H100 short of that up to 263 rows).
_MIN_BLOCK = 128
_MAX_BLOCK = 4096


@jit
def _row_sum(store_ptr, row, cols, n_cols, BLOCK: tl.constexpr, NORMALIZE: tl.constexpr):
    """Divisor that decodes stored row ``row``: its float32 sum for half storage, else 1."""
    if NORMALIZE:
        total = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            chunk = start + cols
            total += tl.load(store_ptr + row * n_cols + chunk, mask=chunk < n_cols, other=0.0).to(
                tl.float32)
        return tl.sum(total, 0)
    return 1.0


@jit
def _read_kernel(
    store_ptr, seen_ptr, index_a_ptr, index_b_ptr, lam_ptr, out_a_ptr, out_b_ptr, seen_out_ptr,
    n_pairs, n_cols, HAS_B: tl.constexpr, MIX: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per batch row: K[I1] (and K[I2]) decoded to float32, and both seen flags.

    MIX: out_a = lam K[I1] + (1 - lam) K[I2]. Otherwise: out_a = K[I1], out_b = K[I2].
    """
    pair = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    row_a = tl.load(index_a_ptr + pair).to(tl.int64)
    tl.store(seen_out_ptr + pair, tl.load(seen_ptr + row_a))
    sum_a = _row_sum(store_ptr, row_a, cols, n_cols, BLOCK, NORMALIZE)
    if HAS_B:
        row_b = tl.load(index_b_ptr + pair).to(tl.int64)
        tl.store(seen_out_ptr + n_pairs + pair, tl.load(seen_ptr + row_b))
        sum_b = _row_sum(store_ptr, row_b, cols, n_cols, BLOCK, NORMALIZE)
        lam = tl.load(lam_ptr + pair).to(tl.float32)
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
                known_a = lam * known_a + (1.0 - lam) * known_b
            else:
                tl.store(out_b_ptr + pair * n_cols + chunk, known_b, mask=in_row)
        tl.store(out_a_ptr + pair * n_cols + chunk, known_a, mask=in_row)


@jit
def _write_kernel(
    store_ptr, seen_ptr, sorted_rows_ptr, order_ptr, estimates_ptr, valid_ptr, n_entries, n_cols,
    momentum, keep, ALL_VALID: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One EMA step per bank row with the mean of its valid estimates in this call.

    The program at the head of each run of equal rows in ``sorted_rows`` owns that row: it
    sums the run's valid estimates in sorted order (a stable sort keeps the entries' order), so
    the result depends only on that row's own estimates, with no atomics; then
    new = m * mean + (1 - m) * old (old decoded), or mean for a row never written, and sets its
    seen flag. Other programs return at once.
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
        if ALL_VALID:
            count = (end - head).to(tl.int32)
        else:
            for k in range(head, end):
                count += (tl.load(valid_ptr + tl.load(order_ptr + k)) != 0).to(tl.int32)
        if count > 0:
            cols = tl.arange(0, BLOCK)
            seen = tl.load(seen_ptr + row) != 0
            old_sum = _row_sum(store_ptr, row, cols, n_cols, BLOCK, NORMALIZE)
            for start in range(0, n_cols, BLOCK):
                chunk = start + cols
                in_row = chunk < n_cols
                total = tl.zeros([BLOCK], tl.float32)
                for k in range(head, end):
                    entry = tl.load(order_ptr + k)
                    if ALL_VALID:
                        take = in_row
                    else:
                        # (A scalar condition joins the column mask through tl.where: the
                        # interpreter mistypes `&`.)
                        take = tl.where(tl.load(valid_ptr + entry) != 0, in_row, False)
                    total += tl.load(estimates_ptr + entry * n_cols + chunk, mask=take, other=0.0)
                mean = tl.math.div_rn(total, count.to(tl.float32))
                old = tl.load(store_ptr + row * n_cols + chunk, mask=in_row, other=0.0).to(
                    tl.float32)
                if NORMALIZE:
                    old = tl.math.div_rn(old, old_sum)
                new = tl.where(seen, momentum * mean + keep * old, mean)
                tl.store(store_ptr + row * n_cols + chunk,
                         new.to(store_ptr.dtype.element_ty), mask=in_row)
            tl.store(seen_ptr + row, tl.full([], 1, tl.uint8))


def _launch_config(n_cols: int, dtype: torch.dtype) -> dict:
    """Constexprs and launch keywords for rows of ``n_cols`` classes stored in ``dtype`` (the
    launch rule of both kernels: one owner)."""
    block = min(max(triton.next_power_of_2(n_cols), _MIN_BLOCK), _MAX_BLOCK)
    return dict(BLOCK=block, NORMALIZE=dtype != torch.float32, num_warps=max(block // 256, 1),
                enable_fp_fusion=False)


def read(
    store: Tensor, seen: Tensor, index_a: Tensor, index_b: Optional[Tensor] = None,
    lam: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """Rows of a dense bank, decoded to float32, in one launch.

    Args:
        store: Tensor[N, C] (float32/bfloat16/float16), rows of one group.
        seen: bool Tensor[N].
        index_a, index_b: int64 Tensor[B] rows ``I1`` and ``I2`` (``index_b`` may be None).
        lam: float32 Tensor[B]: with it (and ``index_b``), the composite
            ``lam K[I1] + (1 - lam) K[I2]`` instead of both rows.

    Returns:
        ``(first, second, seen_rows)``: float32 Tensor[B, C] ``K[I1]`` (or the composite),
        Tensor[B, C] ``K[I2]`` (None with ``lam`` or without ``index_b``), and bool
        Tensor[S, B], the seen flags of ``I1`` (and ``I2``; ``S`` = 1 or 2).
    """
    has_b, mix = index_b is not None, lam is not None
    index_a, index_b, lam = (None if t is None else t.contiguous() for t in (index_a, index_b, lam))
    n_pairs, n_cols = index_a.shape[0], store.shape[1]
    first = torch.empty((n_pairs, n_cols), dtype=torch.float32, device=store.device)
    second = torch.empty_like(first) if has_b and not mix else None
    seen_rows = torch.empty((1 + has_b, n_pairs), dtype=torch.bool, device=store.device)
    if n_pairs == 0:
        return first, second, seen_rows
    with on_device(store.device):
        _read_kernel[(n_pairs,)](
            store, seen.view(torch.uint8), index_a, index_b if has_b else index_a,
            lam if mix else first, first, first if second is None else second,
            seen_rows.view(torch.uint8), n_pairs, n_cols, HAS_B=has_b, MIX=mix, **_launch_config(store.shape[1], store.dtype),
        )
    return first, second, seen_rows


def write(
    store: Tensor, seen: Tensor, rows: Tensor, estimates: Tensor, valid: Optional[Tensor],
    momentum: float,
) -> None:
    """Fold ``estimates`` into the rows ``rows`` of a dense bank, in place.

    Each row named in ``rows`` with at least one valid entry takes one EMA step with the mean
    of its valid estimates, summed in the order of the entries: a stable sort of ``rows``
    (torch), then one write-back launch.

    Args:
        store: Tensor[N, C] (float32/bfloat16/float16), rows of one group, updated in place.
        seen: bool Tensor[N], updated in place.
        rows: int64 Tensor[E], the destination row of each entry.
        estimates: float32 Tensor[E, C].
        valid: bool Tensor[E], the entries that count, or None for all.
        momentum: EMA weight of the new estimate.
    """
    if rows.shape[0] == 0:
        return
    sorted_rows, order = torch.sort(rows, stable=True)
    estimates = estimates.contiguous()
    with on_device(store.device):
        _write_kernel[(rows.shape[0],)](
            store, seen.view(torch.uint8), sorted_rows, order, estimates,
            order if valid is None else valid.view(torch.uint8), rows.shape[0], store.shape[1],
            float(momentum), 1.0 - float(momentum), ALL_VALID=valid is None, **_launch_config(store.shape[1], store.dtype),
        )
