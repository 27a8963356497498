"""Fused Triton kernels: the import guard and the one rule for ``backend``.

Every block with a fused path (:class:`~mkfkit.fraction.QPFraction`,
:class:`~mkfkit.bank.KnowledgeBank`) takes ``backend="auto" | "torch" | "triton"`` with one
meaning, decided here by :func:`use_triton`: ``"torch"`` never runs a kernel, ``"triton"``
always does (an error where it cannot run), ``"auto"`` runs one on CUDA tensors when Triton is
importable and the block supports the call. The kernels themselves live by concept:
:mod:`mkfkit.kernels.qp` (the exact QP fraction) and :mod:`mkfkit.kernels.bank` (the knowledge
bank's reads and deterministic write-back). They only compute: no argument checks, no
callbacks.

CPU tensors run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is
imported; slow, meant for tests without a GPU).
"""

from __future__ import annotations

import torch

from mkfkit._checks import check_choice

__all__ = ["BACKENDS", "available", "check_backend", "use_triton"]

BACKENDS = ("auto", "torch", "triton")


def available(device: torch.device | str) -> bool:
    """Whether the fused kernels can run on ``device``.

    True when Triton is importable and ``device`` is a CUDA device, or ``device`` is the CPU
    and Triton runs its interpreter (``TRITON_INTERPRET=1`` when Triton was imported; for tests).
    """
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        return False
    from mkfkit.kernels import _import  # imports Triton

    if _import.triton is None:
        return False
    return device.type == "cuda" or _import.INTERPRETED


def check_backend(backend: object) -> str:
    """Check a block's ``backend`` argument when the block is made: one of :data:`BACKENDS`, and
    ``"triton"`` only where the kernels can run on some device of this machine (a CUDA device,
    or the CPU under Triton's interpreter), so that it is refused here and not at the first call.
    """
    check_choice(backend, "backend", BACKENDS)
    devices = ("cuda", "cpu") if torch.cuda.is_available() else ("cpu",)
    if backend == "triton" and not any(available(device) for device in devices):
        _refuse("this machine", "", runnable=False)
    return backend


def _refuse(where: object, needs: str, runnable: bool) -> None:
    """The error of a forced ``backend="triton"`` that cannot run ``where``."""
    raise RuntimeError(
        f"`backend` 'triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1 on CPU){needs}, "
        f"but got {where}{'' if runnable else ' without a usable Triton'}; use backend='auto' or 'torch'"
    )


def use_triton(backend: str, device: torch.device | str, *, supported: bool = True,
               preferred: bool = True, needs: str = "") -> bool:
    """Whether a block with ``backend`` runs its Triton kernel for a call on ``device``.

    Args:
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (checked by the caller).
        device: the device the call computes on.
        supported: whether the kernel can serve this call at all (e.g. a dense bank layout).
        preferred: whether ``"auto"`` should take the kernel when it can (e.g. not for float64).
        needs: what ``supported`` asks for, in words, for the error of a forced ``"triton"``.
    """
    if backend == "torch":
        return False
    device = torch.device(device)
    usable = supported and available(device)
    if backend == "triton":
        if not usable:
            _refuse(device, needs, runnable=available(device))
        return True
    return usable and preferred and device.type == "cuda"

