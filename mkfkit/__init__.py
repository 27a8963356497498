"""mkfkit: drop-in PyTorch building blocks for MKF and KD-ATFF distillation."""

from mkfkit import attention, bank, depth, distill, features, fraction, fusion, mixing
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
    FractionStrategy,
    LinearFraction,
    QPFraction,
    dominant_fraction,
    linear_fraction,
    qp_fraction,
)
from mkfkit.fusion import (
    BranchDisagreement,
    BranchGate,
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
    *attention.__all__,
    *bank.__all__,
    *depth.__all__,
    *distill.__all__,
    *features.__all__,
    *fraction.__all__,
    *fusion.__all__,
    *mixing.__all__,
    "set_value_checks",
    "value_checks",
]
