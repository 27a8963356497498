"""mkfkit: drop-in PyTorch building blocks for MKF and KD-ATFF distillation."""

from mkfkit._checks import set_value_checks, value_checks

__version__ = "0.1.0"

__all__ = [
    "set_value_checks",
    "value_checks",
]
