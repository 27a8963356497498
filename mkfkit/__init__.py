"""mkfkit: drop-in PyTorch building blocks for MKF and KD-ATFF distillation."""

from mkfkit._checks import set_value_checks, value_checks
from mkfkit.mixing import (
    CompoundMix,
    MixedBatch,
    MixedCrossEntropyLoss,
    cutmix,
    mixed_cross_entropy,
    mixup,
    sample_beta,
    sample_box,
)

__version__ = "0.1.0"

__all__ = [
    "CompoundMix",
    "MixedBatch",
    "MixedCrossEntropyLoss",
    "cutmix",
    "mixed_cross_entropy",
    "mixup",
    "sample_beta",
    "sample_box",
    "set_value_checks",
    "value_checks",
]
