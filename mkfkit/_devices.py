"""Devices: copies that do not stall the host (tensors and index vectors), and a device named
without its index resolved to the one it means."""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor


def to_device(tensor: Tensor, device: Union[str, torch.device]) -> Tensor:
    """Copy ``tensor`` to ``device``; a small host tensor bound for CUDA goes asynchronously.

    A copy from pageable host memory synchronises the CUDA stream before it starts, so one such
    copy per training step makes the host wait for all queued GPU work and the next kernels
    launch late. Staged in pinned memory (PyTorch's caching host allocator, which also keeps the
    buffer alive until the copy has run) the copy simply queues behind that work.
    """
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def indices_on(index: Tensor, device: Union[str, torch.device]) -> Tensor:
    """``index`` as int64 on ``device``; a copy from the host does not stall it (:func:`to_device`)."""
    return to_device(index.to(torch.int64), device)


def resolved(device: Union[str, torch.device]) -> torch.device:
    """``device`` with its index: ``"cuda"`` means the current CUDA device, ``cuda:0`` say, and a
    tensor made there reports ``cuda:0``; compared unresolved, the two would differ."""
    device = torch.device(device)
    if device.index is None and device.type not in ("cpu", "meta"):
        return torch.empty(0, device=device).device  # allocates nothing, does not synchronise
    return device
