"""The one dtype rule of mkfkit's arithmetic."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when an input already is: half precision never reaches the math.

    Shared by every block (losses, fractions, kernels) so they upcast the same way.
    """
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
