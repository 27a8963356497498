"""The import guard of the fused kernels: Triton if importable, and what its import decided.

Imported only when a block has chosen a kernel (:func:`mkfkit.kernels.use_triton`), or to ask
:func:`mkfkit.kernels.available`: importing mkfkit never imports Triton.
"""

from __future__ import annotations

import contextlib

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.jit import JITFunction
except ImportError:  # Triton ships with CUDA builds of PyTorch; CPU-only installs may lack it.
    triton = tl = JITFunction = None


def jit(fn):
    """``triton.jit``, or the plain function when Triton is missing (never launched then)."""
    return fn if triton is None else triton.jit(fn)


@jit
def _probe():
    pass


# Under TRITON_INTERPRET=1 (read when Triton is imported) triton.jit returns interpreted kernels.
INTERPRETED = triton is not None and not isinstance(_probe, JITFunction)

_NO_GUARD = contextlib.nullcontext()


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device (if it is not)."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(device)
