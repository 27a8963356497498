"""mkfkit: drop-in PyTorch building blocks for MKF and KD-ATFF distillation."""

from mkfkit._checks import set_value_checks, value_checks
from mkfkit.attention import AttentionTransferLoss, attention_map, attention_transfer_loss
from mkfkit.bank import BankTarget, KnowledgeBank
from mkfkit.depth import (
    DepthSampler,
    SubNetwork,
    find_residual_blocks,
    is_residual_block,
    recalibrate_batchnorm,
)
from mkfkit.distill import KDLoss, kd_loss
from mkfkit.features import FeatureCollector
from mkfkit.fraction import (
    DominantFraction,
    Fraction,
    LinearFraction,
    QPFraction,
    dominant_fraction,
    linear_fraction,
    qp_fraction,
)
from mkfkit.fusion import (
    BranchDisagreement,
    FeatureFusionTeacher,
    OnlineDistillationLoss,
    branch_disagreement,
    online_distillation_loss,
)
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
    "BankTarget",
    "DepthSampler",
    "DominantFraction",
    "Fraction",
    "KnowledgeBank",
    "LinearFraction",
    "QPFraction",
    "SubNetwork",
    "dominant_fraction",
    "find_residual_blocks",
    "is_residual_block",
    "linear_fraction",
    "qp_fraction",
    "recalibrate_batchnorm",
    "AttentionTransferLoss",
    "BranchDisagreement",
    "FeatureCollector",
    "FeatureFusionTeacher",
    "KDLoss",
    "OnlineDistillationLoss",
    "attention_map",
    "attention_transfer_loss",
    "branch_disagreement",
    "kd_loss",
    "online_distillation_loss",
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
