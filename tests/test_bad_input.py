"""Bad input, systematically, for every block: the mixer, sampler, losses, fusion teacher, bank, fractions.

Every row of a table is one rejected call: the exception type, a fragment of the message that
names the argument, and a check that the object the call was made on is bitwise unchanged.
The property tests cover the numeric edges that must be accepted: B = 0 and B = 1, C = 1,
one-hot and uniform rows, extreme temperatures, NumPy scalars.
"""

import io

import numpy as np
import mkfkit
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from mkfkit.attention import AttentionTransferLoss, attention_map, attention_transfer_loss
from mkfkit.depth import DepthSampler, find_residual_blocks, recalibrate_batchnorm
from mkfkit.distill import KDLoss, kd_loss
from mkfkit.features import FeatureCollector
from mkfkit.fusion import BranchGate, FeatureFusionTeacher, branch_disagreement, online_distillation_loss
from mkfkit.mixing import CompoundMix, MixedCrossEntropyLoss, cutmix, mixed_cross_entropy, mixup
from mkfkit.models import MultiBranchResNet, ResNet


def snapshot(obj):
    """Every bit of an object's state, as bytes: equal snapshots mean nothing changed."""
    if isinstance(obj, nn.Module):
        state = obj.state_dict()
        flags = [m.training for m in obj.modules()]
    elif isinstance(obj, DepthSampler):
        state, flags = obj.state_dict(), [obj._applied]
    else:  # CompoundMix
        state, flags = obj.state_dict(), []
    buffer = io.BytesIO()
    torch.save((state, flags), buffer)
    return buffer.getvalue()


def expect_rejected(obj, call, error, message):
    before = snapshot(obj)
    with pytest.raises(error, match=message):
        call(obj)
    assert snapshot(obj) == before, "a rejected call changed the state"


# --------------------------------------------------------------------------------------------
# CompoundMix: construction, calls and state
# --------------------------------------------------------------------------------------------

IMAGES, LABELS = torch.rand(4, 3, 6, 6), torch.tensor([0, 1, 2, 1])


def mixer():
    mix = CompoundMix(mix_prob=1.0, generator=torch.Generator().manual_seed(3))
    mix(IMAGES, LABELS)  # a step and some draws behind it
    return mix


def mix_state(**changes):
    return {**mixer().state_dict(), **changes}


MIXER_CALLS = [
    (lambda m: m(torch.zeros(4, 3, 0, 6), LABELS), ValueError, r"`images` must have C, H and W of at least 1"),
    (lambda m: m(torch.zeros(4, 0, 6, 6), LABELS), ValueError, r"`images` must have C, H and W"),
    (lambda m: m(IMAGES.double().long(), LABELS), TypeError, r"`images` must have a floating-point dtype"),
    (lambda m: m(IMAGES, LABELS[:2]), ValueError, r"`targets` must be a Tensor\[B\] with B = 4"),
    (lambda m: m(IMAGES, LABELS, torch.arange(4.0)), TypeError, r"`indices` must have an integer dtype"),
    (lambda m: m.load_state_dict({"step": 1}), ValueError, r"`state_dict` must hold exactly the entries .* missing \['generator_state'\]"),
    (lambda m: m.load_state_dict(mix_state(extra=1)), ValueError, r"unexpected \['extra'\]"),
    (lambda m: m.load_state_dict(mix_state(step=-1)), ValueError, r"`state_dict\['step'\]` must be an int >= 0, but got -1"),
    (lambda m: m.load_state_dict(mix_state(step=2.0)), TypeError, r"`state_dict\['step'\]` must be an int, but got 2.0"),
    (
        lambda m: m.load_state_dict(mix_state(step=5, generator_state=torch.zeros(7, dtype=torch.uint8))),
        ValueError,
        r"`state_dict\['generator_state'\]` must be a CPU torch.Generator state, but got an invalid one",
    ),
    (
        lambda m: m.load_state_dict(mix_state(step=5, generator_state=m.state_dict()["generator_state"].to("meta"))),
        ValueError,
        r"^`state_dict\['generator_state'\]` must be a CPU torch.Generator state, but got one on the meta "
        r"device, which holds no values$",
    ),
    (
        lambda m: m.load_state_dict(mix_state(generator_state=torch.zeros(5056))),
        TypeError,
        r"`state_dict\['generator_state'\]` must be a uint8 Tensor\[N\]",
    ),
    (lambda m: m.load_state_dict([1, 2]), TypeError, r"`state_dict` must be a dict, but got \[1, 2\]"),
]


@pytest.mark.parametrize("call, error, message", MIXER_CALLS)
def test_compound_mix_rejections_change_nothing(call, error, message):
    expect_rejected(mixer(), call, error, message)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"mix_prob": 1.000001}, ValueError, r"`mix_prob` must lie in \[0, 1\], but got 1.000001"),
        ({"mixup_alpha": float("inf")}, ValueError, r"`mixup_alpha` must lie in \(0, inf\), but got inf"),
        ({"cutmix_alpha": float("nan")}, ValueError, r"`cutmix_alpha` must lie in \(0, inf\), but got nan"),
        ({"warmup_steps": 1.5}, TypeError, r"`warmup_steps` must be an int, but got 1.5"),
        ({"switch_prob": "0.5"}, TypeError, r"`switch_prob` must be a number, but got '0.5'"),
    ],
)
def test_compound_mix_constructor_rejections(kwargs, error, message):
    with pytest.raises(error, match=message):
        CompoundMix(**kwargs)


def test_compound_mix_and_functionals_accept_numpy_scalars():
    mix = CompoundMix(np.float32(1.0), np.float64(0.0), np.float32(0.4), warmup_steps=np.int64(0))
    batch = mix(IMAGES, LABELS)
    assert batch.op == "mixup"
    torch.testing.assert_close(mixup(IMAGES, batch.partner, np.float32(0.25)), mixup(IMAGES, batch.partner, 0.25))
    assert mixed_cross_entropy(torch.randn(4, 3), batch, np.float64(0.1)).isfinite()


# --------------------------------------------------------------------------------------------
# Functional losses: tables of bad arguments (stateless; nothing to change)
# --------------------------------------------------------------------------------------------

LOGITS, PROBS = torch.randn(3, 4), torch.full((3, 4), 0.25)
UNMIXED = CompoundMix(mix_prob=0.0)(torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 3]))

LOSS_CALLS = [
    (lambda: kd_loss(LOGITS, PROBS, 1.3e2, teacher_kind="probs"), ValueError, r"`temperature` must lie in \(0, 100\], but got 130"),
    (lambda: kd_loss(LOGITS, PROBS, float("nan"), teacher_kind="probs"), ValueError, r"`temperature` must lie in .* but got nan"),
    (lambda: kd_loss(LOGITS, PROBS, "2", teacher_kind="probs"), TypeError, r"`temperature` must be a number, but got '2' \(str\)"),
    (lambda: kd_loss(torch.zeros(3, 0), torch.zeros(3, 0), teacher_kind="logits"), ValueError, r"`student_logits` must have at least one class"),
    (lambda: kd_loss(LOGITS, PROBS * 1.01, teacher_kind="probs"), ValueError, r"`teacher` must hold probability rows .* but got a row summing to 1.01"),
    (lambda: kd_loss(LOGITS, PROBS, teacher_kind="probs", weight=torch.tensor([1.0, float("nan"), 1.0])), ValueError, r"`weight` must lie in \[0, inf\], but got nan"),
    (lambda: KDLoss(0.0, teacher_kind="logits"), ValueError, r"`temperature` must lie in \(0, 100\], but got 0"),
    (lambda: mixed_cross_entropy(torch.zeros(3, 0), UNMIXED), ValueError, r"`logits` must have at least one class"),
    (lambda: mixed_cross_entropy(LOGITS[:, :3], UNMIXED), ValueError, r"`batch.targets_a` must hold indices in \[0, 2\], but got 3$"),
    (lambda: MixedCrossEntropyLoss(float("inf")), ValueError, r"`label_smoothing` must lie in \[0, 1\], but got inf"),
    (lambda: attention_map(torch.zeros(2, 3, 4, 0)), ValueError, r"`features` must have C, H and W of at least 1"),
    (lambda: attention_map(torch.zeros(2, 3, 4, 4), float("inf")), ValueError, r"`p` must lie in \[1, inf\), but got inf"),
    (lambda: attention_transfer_loss([torch.zeros(2, 3, 4, 4)]), ValueError, r"`features` must hold at least 2 feature maps, but got 1"),
    (lambda: online_distillation_loss([LOGITS, LOGITS], LOGITS, torch.tensor([0, 1, 4])), ValueError, r"`targets` must hold indices in \[0, 3\], but got 4"),
    (lambda: online_distillation_loss([LOGITS, LOGITS], LOGITS, torch.tensor([0, 1, -100])), ValueError, r"`targets` must hold indices in \[0, 3\], but got -100"),
    (lambda: online_distillation_loss([LOGITS] * 2, LOGITS, torch.tensor([0, 1, 2]), theta=float("inf")), ValueError, r"`theta` must lie in \[0, inf\), but got inf"),
    (lambda: online_distillation_loss([torch.zeros(3, 0)] * 2, torch.zeros(3, 0), torch.zeros(3, dtype=torch.long)), ValueError, r"`branch_logits\[0\]` must have at least one class"),
    (lambda: branch_disagreement([LOGITS]), ValueError, r"`logits` must hold at least 2 branches, but got 1"),
    (lambda: recalibrate_batchnorm(ResNet(blocks=(1,), widths=(4,)), [], num_samples=np.int64(0)), ValueError, r"`num_samples` must be an int >= 1, but got 0"),
    (lambda: ResNet(num_classes=0), ValueError, r"`num_classes` must be an int >= 1, but got 0"),
    (lambda: MultiBranchResNet(num_branches=0), ValueError, r"`num_branches` must be an int >= 1, but got 0"),
    (lambda: FeatureCollector(nn.Linear(2, 2), ["weight"]), ValueError, r"`names` holds 'weight', which is not a submodule"),
]


@pytest.mark.parametrize("call, error, message", LOSS_CALLS)
def test_functional_rejections(call, error, message):
    with pytest.raises(error, match=message):
        call()


# Every argument of the KD-ATFF blocks named in its message, and the device checks: a tensor on
# the meta device stands in for one on another device (value checks, which read an index
# tensor's entries, are switched off for the one row that needs it).
AT_MAPS, INDICES = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)], torch.tensor([0, 1, 2])


def value_checks_off(call):
    with mkfkit.value_checks(False):
        return call()


KD_ATFF_ARGUMENT_CALLS = [
    (lambda: attention_map(torch.zeros(2, 3, 4, 4, dtype=torch.long)), TypeError, r"`features` must have a floating-point dtype, but got torch\.int64$"),
    (lambda: attention_map(AT_MAPS[0], "2"), TypeError, r"`p` must be a number, but got '2' \(str\)$"),
    (lambda: attention_transfer_loss(AT_MAPS, mode="both"), ValueError, r"`mode` must be one of 'mutual', 'deep_teaches_shallow', 'shallow_teaches_deep', but got 'both'$"),
    (lambda: attention_transfer_loss(AT_MAPS, reduction="max"), ValueError, r"`reduction` must be one of 'mean', 'sum', but got 'max'$"),
    (lambda: attention_transfer_loss(AT_MAPS, distance="l1"), ValueError, r"`distance` must be one of 'l2', 'mean_squared', but got 'l1'$"),
    (lambda: attention_transfer_loss([torch.randn(2, 3, 4)], [AT_MAPS[1]]), ValueError, r"`features\[0\]` must be a Tensor\[B, C, H, W\], but got shape \(2, 3, 4\)$"),
    (lambda: attention_transfer_loss([AT_MAPS[0]], [torch.randn(2, 3, 4)]), ValueError, r"`teacher_features\[0\]` must be a Tensor\[B, C, H, W\], but got shape \(2, 3, 4\)$"),
    (lambda: attention_transfer_loss([AT_MAPS[0]], [torch.randn(3, 5, 2, 2)]), ValueError, r"`teacher_features\[0\]` must have the batch size of `features\[0\]` \(2\), but got 3$"),
    (lambda: attention_transfer_loss([AT_MAPS[0]], [AT_MAPS[1].to("meta")]), ValueError, r"`teacher_features\[0\]` must be on the device of `features\[0\]` \(cpu\), but got meta$"),
    (lambda: AttentionTransferLoss(resize="crop"), ValueError, r"`resize` must be one of 'pool', 'interpolate', 'none', but got 'crop'$"),
    (lambda: AttentionTransferLoss(reduction="max"), ValueError, r"`reduction` must be one of 'mean', 'sum', but got 'max'$"),
    (lambda: AttentionTransferLoss(distance="l1"), ValueError, r"`distance` must be one of 'l2', 'mean_squared', but got 'l1'$"),
    (lambda: AttentionTransferLoss(loss_weight=-1.0), ValueError, r"`loss_weight` must lie in \[0, inf\), but got -1$"),
    (lambda: AttentionTransferLoss(loss_weight=float("inf")), ValueError, r"`loss_weight` must lie in \[0, inf\), but got inf$"),
    (lambda: kd_loss(LOGITS, INDICES[:, None].expand(3, 4), teacher_kind="logits"), TypeError, r"`teacher` must have a floating-point dtype, but got torch\.int64$"),
    (lambda: kd_loss(LOGITS, LOGITS.to("meta"), teacher_kind="logits"), ValueError, r"`teacher` must be on the device of `student_logits` \(cpu\), but got meta$"),
    (lambda: kd_loss(LOGITS, LOGITS, teacher_kind="logits", weight=[1.0, 1.0, 1.0]), TypeError, r"`weight` must be a torch\.Tensor, but got \[1\.0, 1\.0, 1\.0\] \(list\)$"),
    (lambda: kd_loss(LOGITS, LOGITS, teacher_kind="logits", weight=torch.ones(3, device="meta")), ValueError, r"`weight` must be on the device of `student_logits` \(cpu\), but got meta$"),
    (lambda: KDLoss(teacher_kind="labels"), ValueError, r"`teacher_kind` must be one of 'logits', 'probs', but got 'labels'$"),
    (lambda: KDLoss(teacher_kind="logits", reduction="mean"), ValueError, r"`reduction` must be one of 'batchmean', 'sum', 'none', but got 'mean'$"),
    (lambda: online_distillation_loss([torch.zeros(3)] * 2, LOGITS, INDICES), ValueError, r"`branch_logits\[0\]` must be a Tensor\[B, K\], but got shape \(3,\)$"),
    (lambda: online_distillation_loss([LOGITS] * 2, INDICES[:, None].expand(3, 4), INDICES), TypeError, r"`teacher_logits` must have a floating-point dtype, but got torch\.int64$"),
    (lambda: online_distillation_loss([LOGITS] * 2, LOGITS.to("meta"), INDICES), ValueError, r"`teacher_logits` must be on the device of `branch_logits` \(cpu\), but got meta$"),
    (lambda: value_checks_off(lambda: online_distillation_loss([LOGITS] * 2, LOGITS, INDICES.to("meta"))), ValueError, r"`targets` must be on the device of `branch_logits` \(cpu\), but got meta$"),
    (lambda: online_distillation_loss([LOGITS] * 2, LOGITS, INDICES, beta=-1.0), ValueError, r"`beta` must lie in \[0, inf\), but got -1$"),
    (lambda: online_distillation_loss([LOGITS] * 2, LOGITS, INDICES, beta=float("inf")), ValueError, r"`beta` must lie in \[0, inf\), but got inf$"),
    (lambda: online_distillation_loss([LOGITS] * 2, LOGITS, INDICES, attention_loss=torch.tensor(1)), TypeError, r"`attention_loss` must have a floating-point dtype, but got torch\.int64$"),
    (lambda: online_distillation_loss([LOGITS] * 2, LOGITS, INDICES, attention_loss=torch.tensor(1.0, device="meta")), ValueError, r"`attention_loss` must be on the device of `branch_logits` \(cpu\), but got meta$"),
    (lambda: FeatureFusionTeacher(0, 2), ValueError, r"`in_channels` must be an int >= 1, but got 0$"),
    (lambda: FeatureFusionTeacher((4,), 2), ValueError, r"`in_channels` must be an int or a sequence of 2 ints \(one per branch\), but got \(4,\) \(tuple\)$"),
    (lambda: FeatureFusionTeacher((4, 0), 2), ValueError, r"`in_channels\[1\]` must be an int >= 1, but got 0$"),
    (lambda: FeatureFusionTeacher(4, 2, num_layers=-1), ValueError, r"`num_layers` must be an int >= 0, but got -1$"),
    (lambda: FeatureFusionTeacher(4, 2, hidden_channels=0), ValueError, r"`hidden_channels` must be an int >= 1, but got 0$"),
    (lambda: FeatureFusionTeacher(4, 2, kernel_size=0), ValueError, r"`kernel_size` must be an int >= 1, but got 0$"),
    (lambda: FeatureFusionTeacher(4, 2, num_layers=1)([torch.randn(2, 4, 4, 4), torch.zeros(2, 4, 4, 4, dtype=torch.long)], [LOGITS[:2]] * 2), TypeError, r"`features\[1\]` must have a floating-point dtype, but got torch\.int64$"),
    (lambda: FeatureFusionTeacher(4, 2, num_layers=1)([torch.randn(2, 4, 3, 3), torch.randn(3, 4, 3, 3)], [LOGITS[:2]] * 2), ValueError, r"`features\[1\]` must have the batch size and spatial size of `features\[0\]` \(B=2, 3x3\), but got B=3, 3x3$"),
    (lambda: FeatureFusionTeacher(4, 2, num_layers=1)([torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3, device="meta")], [LOGITS[:2]] * 2), ValueError, r"`features\[1\]` must be on the device of `features\[0\]` \(cpu\), but got meta$"),
    (lambda: BranchGate(0, 2), ValueError, r"`in_channels` must be an int >= 1, but got 0$"),
    (lambda: BranchGate(4, 2)(torch.randn(3, 4, 2, 2), [LOGITS.to("meta")] * 2), ValueError, r"`logits` must be on the device of `shared` \(cpu\), but got meta$"),
]


@pytest.mark.parametrize("call, error, message", KD_ATFF_ARGUMENT_CALLS)
def test_kd_atff_arguments_are_named_and_devices_checked(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --------------------------------------------------------------------------------------------
# Modules with state: AttentionTransferLoss, FeatureFusionTeacher, recalibrate_batchnorm
# --------------------------------------------------------------------------------------------


def attention_loss():
    module = AttentionTransferLoss(warmup_steps=5)
    module.num_steps = 2
    return module


@pytest.mark.parametrize(
    "state, error, message",
    [
        ({"num_steps": -3}, ValueError, r"`state\['num_steps'\]` must be an int >= 0, but got -3"),
        ({"num_steps": torch.tensor(3)}, TypeError, r"`state\['num_steps'\]` must be an int"),
        ({"steps": 3}, ValueError, r"`state` must hold exactly the entries \['num_steps'\]"),
    ],
)
def test_attention_state_rejections_change_nothing(state, error, message):
    expect_rejected(attention_loss(), lambda m: m.load_state_dict({"_extra_state": state}), error, message)


FEATURES = [torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)]
FUSION_CALLS = [
    (lambda m: m(FEATURES[:1], [LOGITS[:2]] * 2), ValueError, r"`features` must hold one tensor per branch \(2\), but got 1"),
    (lambda m: m([FEATURES[0], torch.randn(2, 5, 3, 3)], [LOGITS[:2]] * 2), ValueError, r"`features\[1\]` must be a Tensor\[B, 4, H, W\]"),
    (lambda m: m(FEATURES, [LOGITS] * 2), ValueError, r"`logits` must have the batch size of `features` \(2\), but got 3"),
    (lambda m: m(FEATURES, [torch.zeros(2, 0)] * 2), ValueError, r"`logits\[0\]` must have at least one class"),
]


@pytest.mark.parametrize("call, error, message", FUSION_CALLS)
def test_fusion_rejections_change_nothing(call, error, message):
    expect_rejected(FeatureFusionTeacher(4, 2, num_layers=1), call, error, message)


def calibrated_model():
    model = ResNet(blocks=(1,), widths=(4,))
    recalibrate_batchnorm(model, [torch.randn(6, 3, 5, 5)])
    return model.eval()


class FailsOnSecond:
    """Batches that break in the middle: the first is fine, the second is not a tensor."""

    def __iter__(self):
        yield torch.randn(4, 3, 5, 5)
        yield "not a tensor"


@pytest.mark.parametrize(
    "batches, error, message",
    [
        ([], ValueError, r"`batches` must yield at least one image, but got none"),
        ([torch.zeros(0, 3, 5, 5)] * 2, ValueError, r"`batches` must yield at least one image"),
        (FailsOnSecond(), TypeError, r"`batches` must yield tensors or tuples starting with one, but got 'not a tensor'"),
    ],
)
def test_recalibration_that_fails_leaves_the_statistics_as_they_were(batches, error, message):
    expect_rejected(calibrated_model(), lambda m: recalibrate_batchnorm(m, batches), error, message)


def test_recalibration_with_fewer_images_than_asked_uses_them_all():
    model = calibrated_model()
    data = [torch.zeros(0, 3, 5, 5), torch.randn(3, 3, 5, 5), torch.randn(2, 3, 5, 5)]
    assert recalibrate_batchnorm(model, data, num_samples=2000) == 5
    stem = model.bn1
    assert not torch.equal(stem.running_var, torch.ones_like(stem.running_var))  # not a bare reset


# --------------------------------------------------------------------------------------------
# DepthSampler: construction, sample and state
# --------------------------------------------------------------------------------------------

BLOCKS = [nn.Identity() for _ in range(8)]  # max_dropped = 4 with the defaults


def sampler():
    depth = DepthSampler(BLOCKS, num_groups=3, seed=1)
    depth.draw(), depth.draw()  # at position 2, with a chain that dropped 1 or 2 blocks
    return depth


def depth_state(**changes):
    return {**sampler().state_dict(), **changes}


def all_dropped():
    return torch.zeros(8, dtype=torch.bool)


SAMPLER_CALLS = [
    (lambda s: s.load_state_dict({"position": 1, "chain": torch.ones(8, dtype=torch.bool)}), ValueError, r"`state` must hold exactly the entries \['position', 'chain', 'generator'\], but got missing \['generator'\]"),
    (lambda s: s.load_state_dict(depth_state(chain=torch.ones(8))), TypeError, r"`state\['chain'\]` must be a bool Tensor\[N\], but got Tensor of shape \(8,\), dtype torch.float32"),
    (lambda s: s.load_state_dict(depth_state(chain=all_dropped())), ValueError, r"`state\['chain'\]` must drop between 1 and 3 of the 8 blocks at position 2, but got 8 dropped"),
    (lambda s: s.load_state_dict(depth_state(position=0, chain=all_dropped())), ValueError, r"must drop between 0 and 4 of the 8 blocks at position 0, but got 8"),
    (lambda s: s.load_state_dict(depth_state(chain=torch.ones(8, dtype=torch.bool))), ValueError, r"must drop between 1 and 3 .* but got 0 dropped"),
    (lambda s: s.load_state_dict(depth_state(position=3)), ValueError, r"`state\['position'\]` must lie in \[0, 2\], but got 3"),
    (lambda s: s.load_state_dict(depth_state(position=1.0)), TypeError, r"`state\['position'\]` must be an int, but got 1.0"),
    (lambda s: s.load_state_dict(depth_state(generator=torch.zeros(3, dtype=torch.uint8))), ValueError, r"`state\['generator'\]` must be a CPU torch.Generator state, but got an invalid one"),
]


@pytest.mark.parametrize("call, error, message", SAMPLER_CALLS)
def test_depth_sampler_rejections_change_nothing(call, error, message):
    expect_rejected(sampler(), call, error, message)


def test_draw_without_the_full_network_needs_two_groups_and_changes_nothing():
    one_group = DepthSampler(BLOCKS, 1, seed=0)
    expect_rejected(one_group, lambda s: s.draw(include_full=False), ValueError, r"`include_full=False` needs `num_groups` >= 2")


def test_nested_sample_raises_before_the_cycle_and_generator_advance():
    depth = sampler()
    with depth.sample():
        before = snapshot(depth)
        with pytest.raises(RuntimeError, match="^DepthSampler contexts cannot be nested: leave the "
                           "current sub-network first$"):
            depth.sample()
        assert snapshot(depth) == before


def enter(context):
    with context:
        pass


# Whole messages, anchored at both ends: each names the argument and shows what it got.
DEPTH_AND_MODEL_MESSAGES = [
    (lambda: DepthSampler(nn.Linear(2, 2)), TypeError, r"^`blocks` must be a sequence of residual "
     r"blocks \(DepthSampler.from_model\(model\) finds them\), but got a single Linear$"),
    (lambda: DepthSampler([]), ValueError, r"^`blocks` must hold at least one residual block, but got none$"),
    (lambda: DepthSampler([BLOCKS[0], BLOCKS[0]], 1, seed=0), ValueError,
     r"^`blocks` must not contain the same module twice$"),
    (lambda: DepthSampler(BLOCKS, generator=torch.Generator(), seed=1), ValueError,
     r"^pass either `generator` or `seed`, not both$"),
    (lambda: DepthSampler(BLOCKS, generator=3), TypeError,
     r"^`generator` must be a CPU torch.Generator, but got 3 \(int\)$"),
    (lambda: DepthSampler.from_model(nn.Linear(2, 2)), ValueError, r"^`model` must contain residual "
     r"blocks with an identity shortcut, but none were found in Linear; pass them explicitly or via "
     r"`extra_types`$"),
    (lambda: DepthSampler(BLOCKS, 1, seed=0).draw(include_full=False), ValueError,
     r"^`include_full=False` needs `num_groups` >= 2, but got 1$"),
    (lambda: enter(sampler().apply(torch.zeros(8))), TypeError, r"^`subnet` must be a SubNetwork or a "
     r"bool Tensor\[N\] with N = 8, but got Tensor of shape \(8,\), dtype torch.float32 on cpu$"),
    (lambda: enter(sampler().apply([True, False])), ValueError,
     r"^`subnet` must be a SubNetwork or a mask of 8 bools, but got \[True, False\] \(list\)$"),
    (lambda: ResNet(10, 0, (1,), (4,)), ValueError, r"^`in_channels` must be an int >= 1, but got 0$"),
    (lambda: ResNet(10, 1, (1, 1), (4,)), ValueError, r"^`blocks` and `widths` must be non-empty and of "
     r"equal length \(one entry per stage\), but got 2 and 1 entries$"),
    (lambda: ResNet(10, 1, (1, 1), (4, 0)), ValueError, r"^`widths\[1\]` must be an int >= 1, but got 0$"),
]


@pytest.mark.parametrize("call, error, message", DEPTH_AND_MODEL_MESSAGES)
def test_depth_and_model_messages_in_full(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"growth": float("inf")}, ValueError, r"`growth` must lie in \[1, inf\), but got inf"),
        ({"growth": float("nan")}, ValueError, r"`growth` must lie in \[1, inf\), but got nan"),
        ({"drop_rate": 1.0000001}, ValueError, r"`drop_rate` must lie in \(0, 1\], but got 1.0000001"),
        ({"max_drop_fraction": float("-inf")}, ValueError, r"`max_drop_fraction` must lie in \(0, 1\], but got -inf"),
        ({"seed": 1.5}, TypeError, r"`seed` must be an int, but got 1.5"),
        ({"seed": -1}, ValueError, r"`seed` must be an int >= 0, but got -1"),
    ],
)
def test_depth_sampler_constructor_rejections(kwargs, error, message):
    with pytest.raises(error, match=message):
        DepthSampler.from_model(ResNet(blocks=(4,), widths=(4,)), **kwargs)


def test_depth_sampler_accepts_numpy_numbers():
    depth = DepthSampler(BLOCKS, np.int64(3), drop_rate=np.float32(0.5), growth=np.float64(2.0), seed=np.int64(4))
    assert depth.num_groups == 3 and [depth.draw().group for _ in range(3)] == [0, 1, 2]
    assert len(find_residual_blocks(ResNet(blocks=(2, 2), widths=(4, 8)))) == 3


# --------------------------------------------------------------------------------------------
# Numeric edges that must be accepted, and the empty-batch rule
# --------------------------------------------------------------------------------------------


def teacher_rows(kind, batch, classes, generator):
    if kind == "one_hot":
        return nn.functional.one_hot(torch.randint(classes, (batch,), generator=generator), classes).float()
    if kind == "uniform":
        return torch.full((batch, classes), 1.0 / classes)
    return torch.rand(batch, classes, generator=generator).softmax(1)


@given(
    batch=st.integers(0, 3),
    classes=st.integers(1, 5),
    rows=st.sampled_from(["one_hot", "uniform", "random"]),
    temperature=st.sampled_from([1e-4, 0.1, 0.5, 1.0, 3.0, 100.0]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_property_every_loss_is_finite_at_the_edges(batch, classes, rows, temperature, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, classes, generator=gen) * 4).to(dtype).requires_grad_()
    probs = teacher_rows(rows, batch, classes, gen).to(dtype)
    labels = torch.randint(classes, (batch,), generator=gen)
    weight = torch.rand(batch, generator=gen) > 0.5
    losses = [
        kd_loss(logits, probs, np.float64(temperature), teacher_kind="probs", weight=weight),
        kd_loss(logits, probs.float().log().clamp_min(-1e4).to(dtype), temperature, teacher_kind="logits"),
        online_distillation_loss([logits, logits * 0.5], logits.detach(), labels, temperature).total,
        mixed_cross_entropy(logits, CompoundMix(mix_prob=1.0)(torch.rand(batch, 1, 2, 2), labels), 0.1),
    ]
    sum(losses).backward()
    assert all(torch.isfinite(loss) and loss.item() >= -1e-4 for loss in losses)
    assert torch.isfinite(logits.grad).all()


@given(batch=st.integers(0, 2), size=st.sampled_from([(1, 1), (3, 2), (4, 4)]), seed=st.integers(0, 2**16))
def test_property_attention_losses_at_the_edges(batch, size, seed):
    gen = torch.Generator().manual_seed(seed)
    features = [torch.randn(batch, 2, *size, generator=gen, requires_grad=True), torch.zeros(batch, 3, 1, 1)]
    loss = attention_transfer_loss(features) + AttentionTransferLoss()(features)
    loss.backward()
    assert torch.isfinite(loss) and 0 <= loss.item() <= 4
    assert torch.isfinite(features[0].grad).all()


@pytest.mark.parametrize(
    "loss",
    [
        lambda x: kd_loss(x, torch.zeros(0, 4), teacher_kind="logits"),
        lambda x: kd_loss(x, torch.zeros(0, 4), teacher_kind="probs", weight=torch.zeros(0, dtype=torch.bool)),
        lambda x: mixed_cross_entropy(x, CompoundMix()(torch.zeros(0, 1, 2, 2), torch.zeros(0, dtype=torch.long))),
        lambda x: online_distillation_loss([x, x], x, torch.zeros(0, dtype=torch.long)).total,
        lambda x: branch_disagreement([x, x]).top1 + branch_disagreement([x, x]).kl,
        lambda x: attention_transfer_loss([x.view(0, 4, 1, 1), x.view(0, 2, 2, 1)]),
    ],
)
def test_empty_batch_rule_every_loss_gives_an_attached_zero(loss):
    x = torch.zeros(0, 4, requires_grad=True)
    value = loss(x)
    assert value.shape == () and value.item() == 0.0
    if value.requires_grad:
        value.backward()
        assert x.grad.shape == (0, 4)


def test_sizes_accept_numpy_integers():
    fusion = FeatureFusionTeacher(np.int64(4), np.int64(2), num_layers=np.int64(1), kernel_size=np.int32(3))
    assert fusion.in_channels == (4, 4)
    model = MultiBranchResNet(np.int64(3), np.int64(1), blocks=(1, 1), widths=(4, 8), shared_stages=np.int64(1))
    assert len(model(torch.randn(2, 1, 4, 4)).logits) == 2
    box = tuple(np.int64(v) for v in (0, 2, 0, 2))
    torch.testing.assert_close(cutmix(IMAGES, torch.tensor([1, 2, 3, 0]), box), cutmix(IMAGES, torch.tensor([1, 2, 3, 0]), (0, 2, 0, 2)))
    with pytest.raises(TypeError, match=r"`shared_stages` must be an int, but got 1.0"):
        MultiBranchResNet(blocks=(1, 1), widths=(4, 8), shared_stages=1.0)


# --------------------------------------------------------------------------------------------
# KnowledgeBank and the fractions: calls, what a fraction hands the bank, state
# --------------------------------------------------------------------------------------------

from mkfkit import kernels  # noqa: E402
from mkfkit.bank import KnowledgeBank  # noqa: E402
from mkfkit.fraction import Fraction, LinearFraction, QPFraction, linear_fraction, qp_fraction  # noqa: E402

ROWS = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
PAIR = dict(group=0, probs=ROWS, index_a=torch.tensor([0, 4, 9]), index_b=torch.tensor([1, 2, 3]), lam=0.5)


def bank(**kwargs):
    made = KnowledgeBank(10, 4, 2, **kwargs)
    made.update(0, ROWS.repeat(2, 1)[:4], torch.tensor([0, 1, 2, 3]))  # rows seen
    return made


def returning(change):
    """A user fraction that splits like LinearFraction() and then applies ``change``."""

    def fraction(mixed, base_a, base_b, lam):
        return change(LinearFraction()(mixed, base_a, base_b, lam))

    return fraction


class Summing3(nn.Module):
    def forward(self, mixed, base_a, base_b, lam):
        return Fraction(3 * mixed, base_b, torch.ones_like(lam, dtype=torch.bool), torch.ones_like(lam, dtype=torch.bool))


BAD_FRACTIONS = [
    ("qp", TypeError, r"`fraction` must be a fraction strategy, an object called as fraction\(mixed, base_a, base_b, lam\) -> Fraction .* but got 'qp' \(str\)"),
    (QPFraction, TypeError, r"`fraction` must be a fraction strategy object, but got the class QPFraction; use QPFraction\(\)"),
    (Summing3(), ValueError, r"`fraction` Summing3\(\) returned rows a bank cannot store: `a` must hold probability rows \(each summing to 1 within 0.001\), but got a row summing to 3"),
    (returning(lambda f: f._replace(b=f.b * float("nan"))), ValueError, r"`fraction` .*fraction returned rows a bank cannot store: `b` must be finite"),
    (returning(lambda f: f._replace(a=-f.a)), ValueError, r"`a` must hold probability rows \(entries >= 0\)"),
    (returning(lambda f: f._replace(a=f.a[:, :3])), ValueError, r"`a` must be a Tensor\[B, C\] with B = 3, C = 4, but got shape \(3, 3\)"),
    (returning(lambda f: f._replace(b=f.b.long())), TypeError, r"`b` must have a floating-point dtype, but got torch.int64"),
    (returning(lambda f: f._replace(mask_a=f.mask_a.float())), TypeError, r"`mask_a` must have dtype torch.bool, but got torch.float32"),
    (returning(lambda f: f._replace(mask_b=f.mask_b[:2])), ValueError, r"`mask_b` must be a Tensor\[B\] with B = 3"),
    (returning(lambda f: (f.a, f.b)), TypeError, r"`fraction` .*returning.<locals>.fraction must return a Fraction\(a, b, mask_a, mask_b\), but got \("),
    # Rows and masks elsewhere than `mixed` (the meta device stands in for another device).
    (returning(lambda f: f._replace(a=f.a.to("meta"))), ValueError, r"returned rows a bank cannot store: `a` must be on the device of `mixed` \(cpu\), but got meta$"),
    (returning(lambda f: f._replace(mask_b=f.mask_b.to("meta"))), ValueError, r"returned rows a bank cannot store: `mask_b` must be on the device of `mixed` \(cpu\), but got meta$"),
    (returning(lambda f: f._replace(mask_a=f.mask_a.tolist())), TypeError, r"returned rows a bank cannot store: `mask_a` must be a torch.Tensor, but got \[True, True, True\] \(list\)$"),
]


@pytest.mark.parametrize("fraction, error, message", BAD_FRACTIONS)
def test_bank_refuses_what_a_fraction_hands_it_and_changes_nothing(fraction, error, message):
    expect_rejected(bank(), lambda b: b.update(**PAIR, fraction=fraction), error, message)


def test_bank_skips_rows_a_fraction_masks_off_and_value_checks_can_be_switched_off():
    # Rows whose mask is False are never stored, so they may hold anything.
    masked_nan = returning(lambda f: Fraction(f.a * float("nan"), f.b, torch.zeros_like(f.mask_a), f.mask_b))
    checked, unchecked, reference = bank(), bank(), bank()
    checked.update(**PAIR, fraction=masked_nan)
    reference.update(**PAIR, fraction=returning(lambda f: f._replace(mask_a=torch.zeros_like(f.mask_a))))
    assert snapshot(checked) == snapshot(reference)
    # The switch is the user's: off, a fraction's values are not read (shapes still are).
    with mkfkit.value_checks(False):
        unchecked.update(**PAIR, fraction=Summing3())
        with pytest.raises(ValueError, match=r"`a` must be a Tensor\[B, C\]"):
            unchecked.update(**PAIR, fraction=returning(lambda f: f._replace(a=f.a[:, :3])))


def test_built_in_fractions_are_trusted_and_a_subclass_is_checked():
    calls = []

    class Counting(LinearFraction):
        def forward(self, *args):
            calls.append(1)
            out = super().forward(*args)
            return out._replace(a=out.a * 2)

    made = bank()
    expect_rejected(made, lambda b: b.update(**PAIR, fraction=Counting()), ValueError, r"`fraction` Counting\(project=True\) returned rows")
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lam", [1e-8, 1e-19, 1e-30, 1e-45, 1 - 6e-8])
def test_tiny_weights_never_corrupt_the_bank(lam, dtype):
    # LinearFraction() used to hand the bank rows summing to C - 1 here (CompoundMix draws such
    # weights in about 1 % of batches); every stored row must stay a probability row.
    made = bank()
    made.update(0, ROWS.to(dtype), PAIR["index_a"], PAIR["index_b"], torch.full((3,), lam, dtype=torch.float64).to(dtype).float())
    with mkfkit.value_checks(True):
        made.check_state_dict(made.state_dict())
    target = made.target(0, PAIR["index_a"], PAIR["index_b"], lam)
    assert bool(torch.isfinite(target.probs).all())
    torch.testing.assert_close(target.probs.sum(-1), torch.ones(3), atol=1e-6, rtol=0)


BAD_BANK_CALLS = [
    (dict(group=2), ValueError, r"`group` must be an int in \[0, 1\], but got 2"),
    (dict(fraction="qp"), TypeError, r"`fraction` must be a fraction strategy"),  # refused on unmixed updates too
    (dict(probs=torch.full((3, 0), 0.2)), ValueError, r"`probs` must be a Tensor\[B, C\] with C = 4, but got shape \(3, 0\)"),
]


@pytest.mark.parametrize("change, error, message", BAD_BANK_CALLS)
def test_bank_update_rejections_change_nothing(change, error, message):
    arguments = dict(group=0, probs=ROWS, index_a=torch.tensor([0, 4, 9]))
    expect_rejected(bank(), lambda b: b.update(**{**arguments, **change}), error, message)


def test_bank_construction_and_target_arguments():
    with pytest.raises(ValueError, match=r"`device` must be a torch.device or a device string such as 'cpu' or 'cuda:0', but got 'gpu' \(str\)"):
        KnowledgeBank(10, 3, device="gpu")
    with pytest.raises(ValueError, match=r"`device` must be a torch.device .* but got 1.5 \(float\)"):
        bank().target(0, torch.tensor([1]), device=1.5)
    made = KnowledgeBank(np.int64(10), np.int32(3), np.int64(2), storage="topk", k=np.int64(2), momentum=np.float32(0.5))
    assert (made.num_samples, made.num_classes, made.k) == (10, 3, 2) and type(made.k) is int
    assert KnowledgeBank.memory_bytes(np.int64(10), np.int64(3)) == KnowledgeBank.memory_bytes(10, 3)
    made.update(np.int64(1), ROWS[:, :3].softmax(-1), torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), np.float32(0.25))
    assert made.target(np.int64(1), torch.tensor([0]), torch.tensor([3]), np.float64(0.25)).probs.shape == (1, 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device runs the fused kernels")
def test_triton_backend_refused_when_made_where_it_cannot_run(monkeypatch):
    from mkfkit.kernels import _import

    # Triton compiled for a GPU this machine lacks (the tests run it interpreted on CPU).
    monkeypatch.setattr(_import, "INTERPRETED", False)
    message = r"`backend` 'triton' needs Triton and a CUDA device \(or TRITON_INTERPRET=1 on CPU\), but got this machine"
    with pytest.raises(RuntimeError, match=message):
        QPFraction(backend="triton")
    with pytest.raises(RuntimeError, match=message):
        KnowledgeBank(10, 3, backend="triton")


def test_triton_backend_refused_when_made_without_triton(monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda device: False)
    with pytest.raises(RuntimeError, match=r"needs Triton .* but got this machine without a usable Triton; use backend='auto' or 'torch'"):
        QPFraction(backend="triton")


@pytest.mark.parametrize("fraction", [linear_fraction, qp_fraction, QPFraction(), LinearFraction()])
def test_fractions_refuse_zero_classes_and_accept_empty_batches(fraction):
    empty = torch.zeros(3, 0)
    with pytest.raises(ValueError, match=r"`mixed` must have at least one class \(C >= 1; B may be 0\), but got shape \(3, 0\)"):
        fraction(empty, empty, empty, 0.5)
    none = torch.zeros(0, 4)
    out = fraction(none, none, none, np.float32(0.5))
    assert out.a.shape == (0, 4) and out.mask_a.shape == (0,)


# State: every corruption refused before anything changes, alone or inside a parent.

def bank_state(storage="float32", **changes):
    kwargs = dict(storage=storage, k=2) if storage == "topk" else dict(storage=storage)
    state = bank(**kwargs).state_dict()
    state.update(changes)
    return {key: value for key, value in state.items() if value is not None}


KNOWLEDGE = bank().knowledge
TOPK = bank_state("topk")
BAD_STATES = [
    ("float32", dict(knowledge=KNOWLEDGE * float("nan")), ValueError, r"`state_dict\['knowledge'\]` must be finite"),
    ("float32", dict(knowledge=-KNOWLEDGE), ValueError, r"`state_dict\['knowledge'\]` must hold probability rows \(entries >= 0\)"),
    ("float32", dict(knowledge=3 * KNOWLEDGE), ValueError, r"each summing to 1 within 0.001\), but got a row summing to 3"),
    ("float32", dict(knowledge=KNOWLEDGE.double()), TypeError, r"`state_dict\['knowledge'\]` must have dtype torch.float32, but got torch.float64"),
    ("float32", dict(knowledge=KNOWLEDGE[:1]), ValueError, r"`state_dict\['knowledge'\]` must have shape \(2, 10, 4\), but got \(1, 10, 4\)"),
    ("float32", dict(seen=torch.ones(2, 10)), TypeError, r"`state_dict\['seen'\]` must have dtype torch.bool, but got torch.float32"),
    ("float32", dict(seen=[True] * 10), TypeError, r"`state_dict\['seen'\]` must be a torch.Tensor"),
    ("float32", dict(seen=None), ValueError, r"`state_dict` must hold exactly the entries \['knowledge', 'seen', '_extra_state'\], but got missing \['seen'\]"),
    ("float32", dict(extra=torch.zeros(1)), ValueError, r"but got unexpected \['extra'\]"),
    ("float32", dict(_extra_state=None), ValueError, r"`state_dict` must come from a KnowledgeBank"),
    ("float32", dict(_extra_state={**TOPK["_extra_state"], "storage": "float32", "k": None, "num_classes": 5}), ValueError, r"must describe a bank of this layout"),
    ("topk", dict(ids=torch.full_like(TOPK["ids"], 4)), ValueError, r"`state_dict\['ids'\]` must lie in \[0, 3\], but got 4"),
    ("topk", dict(ids=torch.zeros_like(TOPK["ids"])), ValueError, r"`state_dict\['ids'\]` must name each class at most once per row, but got class 0 twice"),
    ("topk", dict(values=TOPK["values"] * float("nan")), ValueError, r"`state_dict\['values'\]` must lie in \[0, 1\], but got nan"),
    ("topk", dict(values=torch.full_like(TOPK["values"], 0.75)), ValueError, r"`state_dict\['values'\]` must hold rows summing to at most 1 \(within 0.00195312\), but got a row summing to 1.5"),
    # The sum in the shortest float32 form (float64 would print 1.400390625).
    ("topk", dict(values=torch.full_like(TOPK["values"], 0.7)), ValueError, r"but got a row summing to 1.4003906$"),
    ("topk", dict(ids=TOPK["ids"].long()), TypeError, r"`state_dict\['ids'\]` must have dtype torch.int16, but got torch.int64"),
]


@pytest.mark.parametrize("storage, changes, error, message", BAD_STATES)
def test_bank_state_is_checked_whole_before_anything_changes(storage, changes, error, message):
    kwargs = dict(storage=storage, k=2) if storage == "topk" else dict(storage=storage)
    source = bank_state(storage, **changes)
    target = bank(**kwargs)
    target.update(1, ROWS, torch.tensor([5, 6, 7]))  # differs from the source
    expect_rejected(target, lambda b: b.load_state_dict(source), error, message)
    # Inside a parent: the same refusal with the bank's keys named, before the bank changes.
    parent = nn.ModuleDict({"bank": target})
    nested = {f"bank.{key}": value for key, value in source.items()}
    if "extra" not in changes:  # an unexpected key is the parent's to report
        nested_message = message.replace("state_dict\\['", "state_dict\\['bank.").replace(
            "`state_dict` must hold", "`state_dict \\(under 'bank.'\\)` must hold")
        expect_rejected(target, lambda b: parent.load_state_dict(nested), error, nested_message)


def test_bank_state_without_bank_entries_loads_nothing_unless_strict():
    parent = nn.ModuleDict({"head": nn.Linear(2, 2), "bank": bank()})
    before = snapshot(parent["bank"])
    result = parent.load_state_dict({"head.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)}, strict=False)
    assert result.missing_keys == ["bank.knowledge", "bank.seen", "bank._extra_state"]
    assert snapshot(parent["bank"]) == before and bool((parent["head"].weight == 0).all())
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "bank.knowledge"'):
        parent.load_state_dict({"head.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)})
    assert snapshot(parent["bank"]) == before
    # A strict=False load of the bank's own state ignores other entries, like torch.
    result = parent["bank"].load_state_dict({**bank_state(), "other": 1}, strict=False)
    assert result.unexpected_keys == ["other"]
    # check_state_dict lets a caller refuse a checkpoint before any sibling changes.
    with pytest.raises(TypeError, match=r"`state_dict\['bank.seen'\]` must have dtype torch.bool"):
        parent["bank"].check_state_dict({"bank." + k: v for k, v in bank_state(seen=torch.ones(2, 10)).items()}, "bank.")
