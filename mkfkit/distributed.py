"""Collectives for blocks whose state must stay identical on every rank.

Under ``torch.distributed`` every rank sees its own batch, and the last batch of an epoch (or a
``drop_last=False`` loader) may be shorter on some ranks. :func:`all_gather_uneven` gathers such
batches: the sizes are exchanged first, every rank pads its tensors to the largest size, one
``all_gather`` per tensor moves them, and the padding is cut off again.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from mkfkit._checks import check_tensor

__all__ = ["all_gather_uneven", "distributed_rank", "distributed_world_size", "shared_seed"]


def distributed_world_size(group: Optional[object] = None) -> int:
    """Number of ranks in ``group``, or 1 when ``torch.distributed`` is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def distributed_rank() -> int:
    """This process's rank in the world, or 0 when ``torch.distributed`` is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank()


def shared_seed() -> int:
    """A seed from torch's global generator, the same on every rank under torch.distributed
    (drawn on rank 0 and broadcast)."""
    seed = [int(torch.randint(0, 2**62, (), dtype=torch.int64))]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(seed, src=0)
    return seed[0]


def all_gather_uneven(tensors: Sequence[Tensor], group: Optional[object] = None) -> List[Tensor]:
    """All-gather tensors whose first dimension differs from rank to rank.

    Every rank passes tensors that share their first dimension ``B_r`` (which may be 0); each
    result is the concatenation, in rank order, of that tensor from every rank:
    ``Tensor[B_0 + ... + B_{W-1}, *rest]``. Without an initialised process group (or with one
    rank) the tensors come back unchanged.

    Cost per call: one ``all_gather`` of a single int64 per rank (the sizes), then one
    ``all_gather`` per tensor of ``max_r B_r`` rows. The sizes must be read on the host to pad and
    trim, so with NCCL the call synchronises the host with the device once.

    Args:
        tensors: the rank's tensors, each ``Tensor[B, *rest]`` with the same ``B``, all on the
            device the backend communicates from (CUDA for NCCL, CPU for gloo).
        group: process group, default the world.

    Returns:
        list of ``Tensor[sum_r B_r, *rest]``, one per input, on the inputs' device.

    Example:
        >>> import torch
        >>> from mkfkit.distributed import all_gather_uneven
        >>> x, = all_gather_uneven([torch.arange(3)])  # one process: returned as is
        >>> x.tolist()
        [0, 1, 2]
    """
    if len(tensors) == 0:
        raise ValueError("`tensors` must hold at least one tensor, but got an empty sequence")
    for position, tensor in enumerate(tensors):
        check_tensor(tensor, f"tensors[{position}]")
        if tensor.dim() == 0 or tensor.shape[0] != tensors[0].shape[0]:
            raise ValueError(
                f"`tensors[{position}]` must have the first dimension of `tensors[0]` "
                f"({tensors[0].shape[0]}), but got shape {tuple(tensor.shape)}"
            )
    world = distributed_world_size(group)
    if world == 1:
        return list(tensors)

    device = tensors[0].device
    size = torch.tensor([tensors[0].shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = torch.cat(sizes).tolist()
    largest = max(counts)

    gathered = []
    for tensor in tensors:
        padded = tensor.new_zeros((largest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        gathered.append(torch.cat([part[:count] for part, count in zip(parts, counts)]))
    return gathered
