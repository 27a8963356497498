"""Per-sample group knowledge for MKF: an EMA bank that learns from mixed batches.

For each group ``t`` (sub-network size class) and each training sample ``I`` the bank holds
``K_t[I]``, an exponential moving average of the probabilities the sampled sub-network of group
``t`` gave sample ``I`` (docs/METHOD.md, section 1, steps 4-5).
"""

from __future__ import annotations

from collections import abc
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mkfkit import kernels
from mkfkit._checks import (
    as_lam,
    check_choice,
    check_device,
    check_distribution_rows,
    check_floating,
    check_in_range,
    check_index,
    check_number,
    check_positive_int,
    check_shape,
    check_state_keys,
    check_tensor,
    describe,
    distribution_tolerance,
    format_number,
    value_checks_enabled,
)
from mkfkit._devices import indices_on as _indices_on, resolved
from mkfkit.distributed import all_gather_uneven, distributed_world_size
from mkfkit.fraction import (
    DEFAULT_FRACTION,
    FractionStrategy,
    check_storable,
    pair_known,
    settle_sides,
    side_weights,
    split_unchecked,
)

__all__ = ["BankTarget", "KnowledgeBank"]

STORAGES = ("float32", "bfloat16", "float16", "topk")
SYNCS = ("none", "all_gather")


class BankTarget(NamedTuple):
    """Composite knowledge for a batch.

    Attributes:
        probs: float32 ``Tensor[B, C]``, ``lam * K_t[I1] + (1 - lam) * K_t[I2]``; rows with
            ``mask`` False hold a placeholder (unknown knowledge reads as uniform) and must not
            be used as a teacher.
        mask: bool ``Tensor[B]``, True where every side with a positive weight has been written.
    """

    probs: Tensor
    mask: Tensor


class _Dense:
    """Rows stored as they are, in float32, bfloat16 or float16."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def empty(self, groups: int, samples: int, classes: int) -> Dict[str, Tensor]:
        return {"knowledge": torch.full((groups, samples, classes), 1.0 / classes, dtype=self.dtype)}

    def row_bytes(self, classes: int) -> int:
        return classes * _itemsize(self.dtype)

    def encode(self, rows: Tensor) -> Tuple[Tensor, ...]:
        return (rows.to(self.dtype),)

    def check(self, knowledge: Tensor, prefix: str) -> None:
        """Refuse stored rows that are not probability rows (a state to load)."""
        check_distribution_rows(knowledge, f"state_dict['{prefix}knowledge']")

    def decode(self, raw: Tuple[Tensor, ...]) -> Tensor:
        (stored,) = raw
        if self.dtype == torch.float32:
            return stored
        # Rounding to 8 or 11 significant bits moves each row sum off 1; put it back.
        rows = stored.float()
        return rows / rows.sum(dim=-1, keepdim=True)


class _TopK:
    """The ``k`` largest entries of a row (float16) with their class ids; the rest of the mass,
    ``1 - sum(values)``, spread evenly over the other ``C - k`` classes."""

    def __init__(self, k: int, classes: int) -> None:
        self.k = k
        self.classes = classes
        self.id_dtype = torch.int16 if classes <= 32767 else torch.int32

    def empty(self, groups: int, samples: int, classes: int) -> Dict[str, Tensor]:
        return {
            "values": torch.full((groups, samples, self.k), 1.0 / classes, dtype=torch.float16),
            "ids": torch.arange(self.k, dtype=self.id_dtype).expand(groups, samples, -1).clone(),
        }

    def row_bytes(self, classes: int) -> int:
        return self.k * (_itemsize(torch.float16) + _itemsize(self.id_dtype))

    def encode(self, rows: Tensor) -> Tuple[Tensor, ...]:
        values, ids = rows.topk(self.k, dim=-1)
        return values.to(torch.float16), ids.to(self.id_dtype)

    def check(self, values: Tensor, ids: Tensor, prefix: str) -> None:
        """Refuse stored entries no row can have (a state to load): values outside [0, 1] or
        summing past 1, class ids outside [0, C) or named twice in a row."""
        check_in_range(values, f"state_dict['{prefix}values']", 0.0, 1.0)
        check_in_range(ids, f"state_dict['{prefix}ids']", 0, self.classes - 1)
        if not value_checks_enabled(values) or values.numel() == 0:
            return
        sums = values.sum(-1, dtype=torch.float32)
        tolerance = distribution_tolerance(torch.float16)
        if float(sums.max()) > 1 + tolerance:
            raise ValueError(
                f"`state_dict['{prefix}values']` must hold rows summing to at most 1 (within "
                f"{tolerance:g}), but got a row summing to {format_number(float(sums.max()), torch.float32)}"
            )
        ordered = ids.sort(-1).values
        repeated = ordered[..., 1:] == ordered[..., :-1]
        if bool(repeated.any()):
            raise ValueError(
                f"`state_dict['{prefix}ids']` must name each class at most once per row, but got "
                f"class {int(ordered[..., 1:][repeated][0])} twice"
            )

    def decode(self, raw: Tuple[Tensor, ...]) -> Tensor:
        values, ids = raw
        values = values.float()
        rest = (1 - values.sum(dim=-1, keepdim=True)).clamp(min=0) / max(self.classes - self.k, 1)
        rows = rest.expand(-1, self.classes).clone()
        rows.scatter_(1, ids.long(), values)
        # float16 rounding of the kept values can push their sum past 1: renormalise.
        return rows / rows.sum(dim=-1, keepdim=True)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _make_layout(storage: str, classes: int, k: Optional[int]) -> Union[_Dense, _TopK]:
    check_choice(storage, "storage", STORAGES)
    if storage == "topk":
        if k is None:
            raise ValueError("`k` must be given for storage='topk', but got None")
        check_positive_int(k, "k")
        if k > classes:
            raise ValueError(f"`k` must be at most num_classes = {classes}, but got {k}")
        return _TopK(k, classes)
    if k is not None:
        raise ValueError(f"`k` must be None unless storage='topk', but got {k!r}")
    return _Dense(getattr(torch, storage))


def _mean_per_row(rows: Tensor, estimates: Tensor, valid: Tensor) -> Tuple[Tensor, Tensor]:
    """Average the valid estimates that name the same row, without atomics or host syncs.

    A stable sort puts the entries of each row next to each other, valid ones first, in their
    original order, and ``torch.segment_reduce`` sums every run of equal keys from left to right
    and divides by its length (one thread per run and class on CUDA, a loop on the CPU: no
    atomics). The mean of a row depends only on that row's own estimates and their order, so
    the result is the same whatever else is in the batch, on every device, run after run, and it
    is the fused write kernel's mean (:mod:`mkfkit.kernels.bank`). The segments have fixed
    shapes (one per entry) and nothing is read back to the host: it runs under
    ``torch.compile`` (the same ATen kernel) and CUDA graphs.

    Args:
        rows: int64 ``Tensor[E]`` target row of each entry.
        estimates: float32 ``Tensor[E, C]``.
        valid: bool ``Tensor[E]``, entries that count.

    Returns:
        ``(mean, written)``: ``mean[i]`` (``Tensor[E, C]``) is the mean of the valid estimates
        of row ``rows[i]`` (anything where there is none) and ``written[i]`` (bool
        ``Tensor[E]``) whether there is one (False: leave the row alone). Every entry of a row
        carries the same values, so writing all of them, duplicates included, is deterministic.
    """
    # Sorted by the key 2 * row for a valid entry, 2 * row + 1 for an invalid one. A row's
    # valid entries start where its key 2 * row would be inserted and stop where 2 * row would
    # be inserted after its equals.
    valid_key = rows * 2
    keys, order = torch.sort(valid_key + ~valid, stable=True)
    # Segment i runs from the end of the run before sorted entry i to the end of entry i's run:
    # the whole run at the run's first entry (its mean: the sum over the count), empty at the
    # others.
    ends = torch.searchsorted(keys, keys, right=True)
    means = torch.segment_reduce(
        estimates.index_select(0, order), "mean", offsets=F.pad(ends, (1, 0)), unsafe=True
    )
    # The first entry of each row's valid run, or of its invalid run where it has no valid entry.
    start = torch.searchsorted(keys, valid_key)
    written = torch.searchsorted(keys, valid_key, right=True) > start
    return means.index_select(0, start), written


class KnowledgeBank(nn.Module):
    r"""Per-sample group knowledge ``K_t[I]``, updated by EMA from (mixed) batches.

    The bank holds one probability row per group ``t`` and training sample ``I``. After each
    forward pass of the sub-network of group ``t``:

    * **unmixed batch** (``index_b=None``): ``K_t[I] := m * p + (1 - m) * K_t[I]`` with the
      momentum ``m`` (paper: 0.5) and the sub-network's probabilities ``p``;
    * **mixed batch** (``p~`` for ``lam * x[I1] + (1 - lam) * x[I2]``): the fraction strategy
      splits ``p~`` with the stored rows as bases,
      ``a, b = fraction(p~, K_t[I1], K_t[I2], lam)``, and ``a`` is folded into ``K_t[I1]``,
      ``b`` into ``K_t[I2]`` by the same EMA.

    The composite teacher for a (mixed) batch is
    ``target(t) = lam * K_t[I1] + (1 - lam) * K_t[I2]``.

    The rules (rows never written, duplicates, storage layouts and their error, devices, the
    fused GPU path, which group teaches which, one MKF step, distributed use) are written out in
    docs/METHOD.md, "Knowledge bank".

    Shapes:
        ``update``: ``probs`` Tensor[B, C], ``index_a``/``index_b`` int Tensor[B], ``lam`` a
        number or Tensor[B]. ``target``: ``probs`` float32 Tensor[B, C], ``mask`` bool
        Tensor[B].

    Args:
        num_samples: number of training samples ``N``.
        num_classes: number of classes ``C``.
        num_groups: number of groups ``T`` (paper: 3).
        momentum: EMA weight ``m`` of the new estimate, in (0, 1] (paper's ``alpha``: 0.5).
        storage: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"topk"``.
        k: entries kept per row for ``storage="topk"`` (required there, else None).
        device: device of the storage (default CPU).
        sync: ``"none"`` or ``"all_gather"`` (every rank applies all ranks' batches).
        process_group: process group for ``sync="all_gather"`` (default: the world).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``: the bank's read and write kernels
            (:func:`mkfkit.kernels.use_triton`); the fraction chooses its own.

    Example:
        >>> import torch
        >>> from mkfkit.bank import KnowledgeBank
        >>> bank = KnowledgeBank(num_samples=10, num_classes=3, num_groups=2)
        >>> probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
        >>> bank.update(0, probs, torch.tensor([4, 7]))
        >>> mixed = 0.25 * probs[0] + 0.75 * probs[1]
        >>> bank.update(0, mixed[None], torch.tensor([4]), torch.tensor([7]), lam=0.25)
        >>> target = bank.target(0, torch.tensor([4, 5]))
        >>> target.probs[0]
        tensor([0.7000, 0.2000, 0.1000])
        >>> target.mask
        tensor([ True, False])
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        num_groups: int = 3,
        momentum: float = 0.5,
        storage: str = "float32",
        k: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
        sync: str = "none",
        process_group: Optional[object] = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.num_samples = check_positive_int(num_samples, "num_samples")
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.num_groups = check_positive_int(num_groups, "num_groups")
        check_in_range(momentum, "momentum", 0.0, 1.0, low_open=True)
        self.momentum = check_number(momentum, "momentum")
        self._layout = _make_layout(storage, num_classes, k)
        self.storage = storage
        self.k = None if k is None else int(k)
        check_choice(sync, "sync", SYNCS)
        self.sync = sync
        self.process_group = process_group
        if backend == "triton" and storage == "topk":
            raise ValueError("`backend` 'triton' needs a dense storage (float32, bfloat16, float16), but got storage='topk'")
        self.backend = kernels.check_backend(backend)
        device = None if device is None else check_device(device, "device")
        empty = self._layout.empty(self.num_groups, self.num_samples, self.num_classes)
        self._storage_names = tuple(empty)
        for name, tensor in empty.items():
            self.register_buffer(name, tensor.to(device))
        self.register_buffer("seen", torch.zeros(self.num_groups, self.num_samples, dtype=torch.bool, device=device))

    # ----------------------------------------------------------------------------- size

    @staticmethod
    def memory_bytes(
        num_samples: int,
        num_classes: int,
        num_groups: int = 3,
        storage: str = "float32",
        k: Optional[int] = None,
    ) -> int:
        """Bytes a bank of this configuration holds, computed without allocating it.

        Example:
            >>> KnowledgeBank.memory_bytes(1_281_167, 1000, 3, "topk", k=32) / 1e9
            0.495811629
        """
        check_positive_int(num_samples, "num_samples")
        check_positive_int(num_classes, "num_classes")
        check_positive_int(num_groups, "num_groups")
        layout = _make_layout(storage, num_classes, k)
        rows = num_groups * num_samples
        return rows * (layout.row_bytes(num_classes) + _itemsize(torch.bool))

    @property
    def nbytes(self) -> int:
        """Bytes held by the bank's buffers (measured on the allocated tensors)."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers())

    @property
    def device(self) -> torch.device:
        return self.seen.device

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return (
            f"num_samples={self.num_samples}, num_classes={self.num_classes}, "
            f"num_groups={self.num_groups}, momentum={self.momentum}, "
            f"storage={self.storage!r}{k}, sync={self.sync!r}"
        )

    # ----------------------------------------------------------------------------- reading

    def _slices(self, group: int) -> Tuple[Tensor, ...]:
        """Each buffer's rows of ``group``, the storage's, then the seen flags: views, which the
        reads and the write of one call share."""
        return tuple(getattr(self, name)[group] for name in (*self._storage_names, "seen"))

    def _gather(self, tensors: Tuple[Tensor, ...], index: Tensor, device: torch.device) -> Tuple[Tuple[Tensor, ...], Tensor]:
        """Stored rows ``(raw, seen)`` at ``index`` of a group's ``tensors`` (:meth:`_slices`),
        moved to ``device``."""
        index = _indices_on(index, self.device)
        if self.device == device:
            gathered = [tensor.index_select(0, index) for tensor in tensors]
        elif self.device.type == "cpu" and device.type == "cuda":
            # Gather into page-locked memory so the copy to the GPU does not block the host.
            gathered = []
            for tensor in tensors:
                staged = torch.empty(
                    (index.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, pin_memory=True
                )
                torch.index_select(tensor, 0, index, out=staged)
                gathered.append(staged.to(device, non_blocking=True))
        else:
            gathered = [tensor.index_select(0, index).to(device) for tensor in tensors]
        return tuple(gathered[:-1]), gathered[-1]

    def _gather_pairs(
        self, tensors: Tuple[Tensor, ...], index_a: Tensor, index_b: Tensor, device: torch.device
    ) -> Tuple[Tensor, Tuple[Tensor, ...], Tensor, Tensor]:
        """Both sides of a mixed batch read from a group's ``tensors`` (:meth:`_slices`) in one
        gather (torch path), side a then side b:
        ``(rows, raw, seen, known)``, the int64 row ids ``Tensor[2B]`` on ``device``, the stored
        rows and seen flags (bool ``Tensor[2B]``) as gathered, and the rows decoded to float32,
        ``Tensor[2B, C]``."""
        rows = torch.cat((_indices_on(index_a, device), _indices_on(index_b, device)))
        raw, seen = self._gather(tensors, rows, device)
        return rows, raw, seen, self._layout.decode(raw)

    def _check_group(self, group: int) -> int:
        check_positive_int(group, "group", minimum=0)
        if group >= self.num_groups:
            raise ValueError(
                f"`group` must be an int in [0, {self.num_groups - 1}], but got {group}"
            )
        return group

    def _check_pair(self, index_a: Tensor, index_b: Optional[Tensor], lam: object, batch: int) -> None:
        check_index(index_a, "index_a", self.num_samples, batch)
        if index_b is None:
            if lam is not None:
                raise ValueError(f"`lam` must be None when `index_b` is None, but got {describe(lam)}")
            return
        check_index(index_b, "index_b", self.num_samples, batch)
        if lam is None:
            raise ValueError("`lam` must be given with `index_b`, but got None")

    def _fused(self, device: torch.device) -> bool:
        """Whether the bank's read and write kernels serve a call computing on ``device``."""
        return kernels.use_triton(
            self.backend, device, supported=self.storage != "topk" and device == self.device,
            needs=f", a dense storage and the batch on the bank's device ({self.device})",
        )

    def target(
        self,
        group: int,
        index_a: Tensor,
        index_b: Optional[Tensor] = None,
        lam: Optional[Union[float, Tensor]] = None,
        *,
        device: Optional[Union[str, torch.device]] = None,
    ) -> BankTarget:
        """Composite knowledge ``lam * K_t[I1] + (1 - lam) * K_t[I2]`` of a batch.

        Args:
            group: the group ``t`` to read, in ``[0, num_groups)``.
            index_a: int ``Tensor[B]`` sample ids ``I1``.
            index_b: int ``Tensor[B]`` partner ids ``I2`` of a mixed batch, or None.
            lam: weight of ``I1``, a number or ``Tensor[B]`` in [0, 1] on the result's device;
                required with ``index_b``.
            device: device of the result (default: the device of ``index_a``).

        Returns:
            :class:`BankTarget`: float32 ``probs`` ``Tensor[B, C]`` and bool ``mask``
            ``Tensor[B]`` (every side with a positive weight is known), on ``device``.
        """
        self._check_group(group)
        batch = index_a.shape[0] if isinstance(index_a, Tensor) else 0
        self._check_pair(index_a, index_b, lam, batch)
        out = resolved(check_device(device, "device")) if device is not None else index_a.device
        weight = None if index_b is None else as_lam(lam, batch, out, torch.float32)
        if self._fused(out):
            from mkfkit.kernels import bank as bank_kernels  # imports Triton

            probs, _, seen = bank_kernels.read(
                self.knowledge[group], self.seen[group], _indices_on(index_a, out),
                None if index_b is None else _indices_on(index_b, out), weight,
            )
            return BankTarget(probs, seen[0] if index_b is None else pair_known(seen, side_weights(weight)))
        if index_b is None:
            raw, seen = self._gather(self._slices(group), index_a, out)
            return BankTarget(self._layout.decode(raw), seen)
        _, _, seen, known = self._gather_pairs(self._slices(group), index_a, index_b, out)
        weights = side_weights(weight)
        # lam * K[I1] + (1 - lam) * K[I2]: the sum of two products, in one reduction.
        probs = (weights.unsqueeze(-1) * known.unflatten(0, (2, -1))).sum(0)
        return BankTarget(probs, pair_known(seen.unflatten(0, (2, -1)), weights))

    # ----------------------------------------------------------------------------- writing

    @torch.no_grad()
    def update(
        self,
        group: int,
        probs: Tensor,
        index_a: Tensor,
        index_b: Optional[Tensor] = None,
        lam: Optional[Union[float, Tensor]] = None,
        fraction: FractionStrategy = DEFAULT_FRACTION,
    ) -> None:
        """Fold a batch of sub-network outputs of ``group`` into the bank.

        All arguments are checked before anything is written: a rejected call leaves the bank
        unchanged. No gradient flows into ``probs``: the update runs under ``torch.no_grad``.

        Args:
            group: the group ``t`` that produced ``probs``, in ``[0, num_groups)``.
            probs: ``Tensor[B, C]`` probability rows (any float dtype; used in float32).
            index_a: int ``Tensor[B]`` sample ids ``I1``.
            index_b: int ``Tensor[B]`` partner ids ``I2`` of a mixed batch, or None (unmixed).
            lam: weight of ``I1`` in the mix, a number or ``Tensor[B]`` in [0, 1] on the
                device of ``probs``; required with ``index_b``.
            fraction: strategy splitting a mixed output into the two clean estimates,
                ``fraction(mixed, base_a, base_b, lam) -> Fraction`` (``LinearFraction``,
                ``QPFraction``, ``DominantFraction``, or your own). The paper's raw OPT2,
                ``LinearFraction(project=False)``, is refused: its rows leave the simplex.
                What your own strategy returns is checked before anything is written
                (:func:`~mkfkit.fraction.check_split`; its values only with value checks on).
        """
        self._check_group(group)
        check_floating(probs, "probs")
        check_shape(probs, "probs", (None, self.num_classes), f"Tensor[B, C] with C = {self.num_classes}")
        batch = probs.shape[0]
        self._check_pair(index_a, index_b, lam, batch)
        check_distribution_rows(probs, "probs")  # within distribution_tolerance of their dtype
        check_storable(fraction)
        if index_b is not None:
            lam = as_lam(lam, batch, probs.device, torch.float32)

        if self.sync == "all_gather" and distributed_world_size(self.process_group) > 1:
            probs, index_a, index_b, lam = self._all_gather(group, probs, index_a, index_b, lam)
        if probs.shape[0] == 0:
            return
        if probs.element_size() < 4:
            # Sums of bfloat16/float16 rows are off by up to ~1e-2: restore them in float32.
            probs = probs.float()
            probs = probs / probs.sum(dim=1, keepdim=True)
        probs = probs.float()
        self._fold(group, probs, index_a, index_b, lam, fraction)

    def _fold(
        self, group: int, probs: Tensor, index_a: Tensor, index_b: Optional[Tensor],
        lam: Optional[Tensor], fraction: FractionStrategy,
    ) -> None:
        """Fold checked float32 ``probs`` into ``group``: read the bases, split, EMA, write back.

        The fused path reads and writes with the bank's kernels; the fraction decides its own
        kernel. Everything is checked already and the bases are the bank's own rows, so the
        fraction runs unchecked; a strategy other than the built-in ones has its result checked
        before anything is written (:func:`~mkfkit.fraction.split_unchecked`).
        """
        device = probs.device
        fused = self._fused(device)
        if fused:
            from mkfkit.kernels import bank as bank_kernels  # imports Triton
        else:
            tensors = self._slices(group)
        if index_b is None:
            rows = _indices_on(index_a, device)
            estimates, valid = probs, None
            old = None if fused else self._gather(tensors, rows, device)
        else:
            if fused:
                rows = torch.cat((_indices_on(index_a, device), _indices_on(index_b, device)))
                known, _, (seen,) = bank_kernels.read(self.knowledge[group], self.seen[group], rows)
            else:
                rows, raw, seen, known = self._gather_pairs(tensors, index_a, index_b, device)
                old = raw, seen, known
            sides, weights = (2, -1), side_weights(lam)
            pair, masks = split_unchecked(fraction, probs, known.unflatten(0, sides), weights)
            estimates, valid = settle_sides(pair, masks, probs, weights, seen.unflatten(0, sides))
        if fused:
            bank_kernels.write(self.knowledge[group], self.seen[group], rows, estimates, valid, self.momentum)
        else:
            self._write(tensors, rows, estimates, valid, *old)

    def _write(
        self, tensors: Tuple[Tensor, ...], rows: Tensor, estimates: Tensor, valid: Optional[Tensor],
        raw_old: Tuple[Tensor, ...], seen_old: Tensor, known_old: Optional[Tensor] = None,
    ) -> None:
        """One EMA step per named row with the mean of its valid estimates (torch path), into a
        group's ``tensors`` (:meth:`_slices`).

        ``raw_old``, ``seen_old``: the stored rows at ``rows`` as gathered; ``known_old`` their
        decoded values (decoded here when not given).
        """
        if valid is None:
            valid = torch.ones_like(seen_old)
        if known_old is None:
            known_old = self._layout.decode(raw_old)
        mean, written = _mean_per_row(rows, estimates, valid)
        momentum = self.momentum
        blended = momentum * mean + (1 - momentum) * known_old
        new = torch.where(seen_old.unsqueeze(1), blended, mean)
        encoded = [torch.where(written.unsqueeze(1), fresh, old) for fresh, old in zip(self._layout.encode(new), raw_old)]
        seen_new = seen_old | written

        rows = rows.to(self.device)
        for tensor, value in zip(tensors, (*encoded, seen_new)):
            tensor.index_put_((rows,), value.to(self.device))

    def _all_gather(
        self, group: int, probs: Tensor, index_a: Tensor, index_b: Optional[Tensor], lam: Optional[Tensor]
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every rank's batch, concatenated in rank order; unmixed batches as mixed with lam = 1."""
        device = probs.device
        index_a = _indices_on(index_a, device)
        if index_b is None:
            index_b = index_a
            lam = torch.ones(probs.shape[0], dtype=torch.float32, device=device)
        index_b = _indices_on(index_b, device)
        groups = torch.full_like(index_a, group)
        probs, ids, lam = all_gather_uneven(
            [probs, torch.stack((index_a, index_b, groups), dim=1), lam],
            group=self.process_group,
        )
        if value_checks_enabled(ids) and bool((ids[:, 2] != group).any()):
            others = sorted(set(ids[:, 2].tolist()))
            raise ValueError(
                f"`group` must be the same on every rank under sync='all_gather', but got {others}"
            )
        return probs, ids[:, 0], ids[:, 1], lam

    # ----------------------------------------------------------------------------- state

    def _layout_state(self) -> Dict[str, object]:
        return {
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "num_groups": self.num_groups,
            "storage": self.storage,
            "k": self.k,
        }

    def get_extra_state(self) -> Dict[str, object]:
        return self._layout_state()

    def set_extra_state(self, state: Dict[str, object]) -> None:
        # Checked (before any buffer is copied) in _load_from_state_dict: check_state_dict.
        pass

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: ANN001
        """``nn.Module.load_state_dict``, all or nothing: the whole state is checked first
        (:meth:`check_state_dict`); a rejected state leaves the bank unchanged."""
        if strict:
            self.check_state_dict(state_dict)
        return super().load_state_dict(state_dict, strict, assign)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # noqa: E501
        # Also the path of a parent's load_state_dict, which passes strict=True whatever it was
        # given and decides on missing and unexpected keys at the end. A state without any of
        # the bank's entries loads nothing into it and reports them missing (an error only for a
        # strict load); a state with some of them must hold all, checked before any is copied.
        names = (*self._storage_names, "seen", "_extra_state")
        if not any(prefix + name in state_dict for name in names):
            missing_keys.extend(prefix + name for name in names)
            return
        self.check_state_dict(state_dict, prefix, strict=False)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def check_state_dict(self, state_dict: Dict[str, object], prefix: str = "", *, strict: bool = True) -> None:
        """Raise the error loading ``state_dict`` would raise for the bank, changing nothing.

        The bank's entries are those under ``prefix`` (``"bank."`` for a parent's child
        ``bank``). They must be all there, of the bank's layout, dtypes and shapes, with
        probability rows (for ``storage="topk"``: values in [0, 1] summing to at most 1,
        distinct class ids in [0, C) per row; values checked with value checks on).
        ``strict=True`` also refuses other entries under ``prefix``.

        Inside a parent module, siblings that come before the bank are loaded by the time the
        bank checks its entries; check first to keep the whole model unchanged, e.g.
        ``model.bank.check_state_dict(checkpoint, "bank.")`` before
        ``model.load_state_dict(checkpoint)``.
        """
        label = "state_dict" if not prefix else f"state_dict (under '{prefix}')"
        layout = state_dict.get(prefix + "_extra_state") if isinstance(state_dict, abc.Mapping) else None
        if layout is None:
            raise ValueError(
                "`state_dict` must come from a KnowledgeBank (it holds no layout description "
                f"under '{prefix}_extra_state')"
            )
        if layout != self._layout_state():
            raise ValueError(
                f"`state_dict` must describe a bank of this layout {self._layout_state()}, "
                f"but got {layout}"
            )
        names = (*self._storage_names, "seen", "_extra_state")
        entries = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
        check_state_keys(entries if strict else {key: entries[key] for key in names if key in entries}, label, names)
        for name in names[:-1]:
            key, own, value = f"state_dict['{prefix}{name}']", getattr(self, name), entries[name]
            check_tensor(value, key)
            if value.dtype != own.dtype:
                raise TypeError(f"`{key}` must have dtype {own.dtype}, but got {value.dtype}")
            if value.shape != own.shape:
                raise ValueError(f"`{key}` must have shape {tuple(own.shape)}, but got {tuple(value.shape)}")
        self._layout.check(*(entries[name] for name in self._storage_names), prefix)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001
        # The storage dtypes are the bank's format: a parent's .half() or .to(dtype) may move
        # the bank but never convert (and round) its knowledge.
        for name, buffer in self._buffers.items():
            moved = fn(buffer)
            self._buffers[name] = moved if moved.dtype == buffer.dtype else buffer.to(moved.device)
        return self

