import collections
import math
import re
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import mkfkit
from mkfkit import mixing
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
from mkfkit.mixing import _log_gamma_variate

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def make_mix(**kwargs):
    kwargs.setdefault("generator", seeded())
    return CompoundMix(**kwargs)


def random_batch(size=6, channels=3, height=8, width=10, classes=5, device="cpu", dtype=None):
    # continuous random pixels: every pixel of every image differs from the others (a.s.), so a
    # pixel's value tells which image it came from
    images = torch.rand(size, channels, height, width, dtype=torch.float64, device=device)
    images = images.to(dtype or torch.float32)
    targets = torch.randint(0, classes, (size,), device=device)
    return images, targets


def cutmix_from_partner(batch, images):
    """Bool Tensor[B, H, W]: pixels (all channels) equal to the partner's and not to the own."""
    partner_images = images[batch.partner]
    from_partner = (batch.images == partner_images).all(1)
    from_self = (batch.images == images).all(1)
    assert bool((from_partner ^ from_self).all()), "every pixel comes from exactly one image"
    return from_partner


# --------------------------------------------------------------------------------------------
# Output of one call


def test_unmixed_batch_has_one_path(device):
    images, targets = random_batch(device=device)
    batch = make_mix(mix_prob=0.0)(images, targets)
    assert isinstance(batch, MixedBatch) and batch.op == "none" and batch.box is None
    assert batch.images is images and batch.targets_b is targets
    assert batch.lam.dtype == torch.float32 and batch.lam.device == images.device
    assert torch.equal(batch.lam, torch.ones(6, device=device))
    assert torch.equal(batch.partner, torch.arange(6, device=device))
    assert torch.equal(batch.index_a, torch.arange(6, device=device))
    assert torch.equal(batch.index_b, batch.index_a)


@pytest.mark.parametrize("switch_prob", [0.0, 1.0])
def test_single_sample_batch_is_returned_unmixed(device, switch_prob):
    # timm asserts an even batch (pytorch-image-models#1304); here B = 1 passes through unmixed
    images, targets = random_batch(size=1, device=device)
    batch = make_mix(mix_prob=1.0, switch_prob=switch_prob)(images, targets, torch.tensor([42]))
    assert batch.op == "none" and torch.equal(batch.lam, torch.ones(1, device=device))
    assert batch.index_b.tolist() == [42] and batch.partner.tolist() == [0]


@pytest.mark.parametrize("size", [2, 3, 5, 7])
@pytest.mark.parametrize("switch_prob", [0.0, 1.0])
def test_odd_and_small_batches_pair_with_other_samples(device, size, switch_prob):
    mix = make_mix(mix_prob=1.0, switch_prob=switch_prob)
    for _ in range(5):
        images, targets = random_batch(size=size, device=device)
        indices = torch.randperm(1000)[:size] + 7
        batch = mix(images, targets, indices)
        assert batch.op == ("cutmix" if switch_prob else "mixup")
        assert batch.images.shape == images.shape and batch.lam.shape == (size,)
        partner = batch.partner.cpu()
        assert partner.dtype == torch.int64 and batch.partner.device == images.device
        assert sorted(partner.tolist()) == list(range(size)), "a permutation of the batch"
        assert bool((partner != torch.arange(size)).all()), "no sample is its own partner"
        assert torch.equal(batch.targets_b, targets[batch.partner])
        assert torch.equal(batch.index_a, indices)
        assert torch.equal(batch.index_b, indices[partner])


def test_partner_is_uniform_over_the_other_samples():
    mix = make_mix(mix_prob=1.0, switch_prob=0.0)
    images, targets = random_batch(size=4, height=2, width=2)
    counts = torch.zeros(4, 4)
    calls = 1200
    for _ in range(calls):
        partner = mix(images, targets).partner
        counts[torch.arange(4), partner] += 1
    assert counts.diagonal().sum() == 0
    off_diagonal = counts[~torch.eye(4, dtype=torch.bool)]
    expected, sd = calls / 3, math.sqrt(calls * (1 / 3) * (2 / 3))
    assert bool(((off_diagonal - expected).abs() < 4.5 * sd).all()), counts


@pytest.mark.parametrize("switch_prob", [0.0, 1.0])
def test_input_is_never_modified(device, switch_prob):
    images, targets = random_batch(device=device)
    before, version = images.clone(), images._version
    mix = make_mix(mix_prob=1.0, switch_prob=switch_prob)
    for _ in range(3):
        batch = mix(images, targets)
        assert batch.images.data_ptr() != images.data_ptr()
    assert torch.equal(images, before) and images._version == version


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_mixup_pixels_come_from_the_stated_partners(device, dtype):
    images, targets = random_batch(size=5, device=device, dtype=dtype)
    mix = make_mix(mix_prob=1.0, switch_prob=0.0)
    for _ in range(4):
        batch = mix(images, targets)
        assert batch.op == "mixup" and batch.images.dtype == dtype
        assert batch.lam.dtype == torch.float32 and batch.lam.device == images.device
        lam = batch.lam.double().view(-1, 1, 1, 1)
        assert bool((batch.lam == batch.lam[0]).all()), "one lam per batch"
        reference = lam * images.double() + (1 - lam) * images.double()[batch.partner]
        tolerance = {torch.float32: 1e-6, torch.float64: 1e-12}.get(dtype, 1e-2)
        torch.testing.assert_close(
            batch.images.double(), reference, atol=tolerance, rtol=tolerance
        )


def test_lam_is_float32_and_mixes_the_pixels_under_a_float64_default_dtype():
    # torch.set_default_dtype(torch.float64) must not change the documented float32 lam, nor let
    # Mixup mix the pixels with the unrounded float64 draw.
    images, targets = random_batch(size=4, dtype=torch.float64)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        unmixed = make_mix(mix_prob=0.0)(images, targets)
        mix = make_mix(mix_prob=1.0, switch_prob=0.5)
        batches = [mix(images, targets) for _ in range(12)]
    finally:
        torch.set_default_dtype(default)
    assert unmixed.lam.dtype == torch.float32 and bool((unmixed.lam == 1).all())
    assert {batch.op for batch in batches} == {"mixup", "cutmix"}
    for batch in batches:
        assert batch.lam.dtype == torch.float32
        if batch.op == "mixup":
            lam = batch.lam[0].item()  # the float32 value, exactly
            expected = images * lam + images[batch.partner] * (1 - lam)
            assert torch.equal(batch.images, expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cutmix_lam_is_the_kept_pixel_fraction(device, dtype):
    # distinct values exact even in bfloat16 (7 mantissa bits): 2**octave * (1 + k / 128)
    code = torch.randperm(5 * 2 * 9 * 13, device=device)
    values = torch.exp2((code // 128).double()) * (1 + (code % 128).double() / 128)
    images = values.view(5, 2, 9, 13).to(dtype)
    assert images.flatten().unique().numel() == images.numel()
    targets = torch.arange(5, device=device)
    mix = make_mix(mix_prob=1.0, switch_prob=1.0)
    for _ in range(12):
        batch = mix(images, targets)
        assert batch.op == "cutmix" and batch.images.dtype == dtype
        from_partner = cutmix_from_partner(batch, images)
        kept = 1 - from_partner.double().mean(dim=(1, 2))
        assert torch.equal(batch.lam, kept.float()), (batch.lam, kept)
        y0, y1, x0, x1 = batch.box
        box_mask = torch.zeros(9, 13, dtype=torch.bool, device=device)
        box_mask[y0:y1, x0:x1] = True
        assert bool((from_partner == box_mask).all()), "exactly the box comes from the partner"


@pytest.mark.parametrize("height, width, lam", [(3, 4, 0.5), (1, 5, 0.2), (5, 1, 0.2), (4, 4, 0.0)])
def test_sample_box_has_the_exact_law_of_a_uniform_centre(height, width, lam):
    # The uncut box, floor(H sqrt(1 - lam)) x floor(W sqrt(1 - lam)), centred on a pixel drawn
    # uniformly (top-left corner at centre - side // 2), clipped to the image: every pixel
    # contributes 1 / (H W) to the probability of its box.
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    exact = collections.Counter()
    for cy in range(height):
        for cx in range(width):
            y0, x0 = cy - cut_h // 2, cx - cut_w // 2
            box = (max(y0, 0), min(y0 + cut_h, height), max(x0, 0), min(x0 + cut_w, width))
            exact[box] += 1 / (height * width)
    draws, generator = 4000, seeded(5)
    counts = collections.Counter(sample_box(height, width, lam, generator) for _ in range(draws))
    assert set(counts) <= set(exact)
    for box, prob in exact.items():
        assert abs(counts[box] / draws - prob) < 4.5 * math.sqrt(prob * (1 - prob) / draws) + 1 / draws, box


def test_cutmix_reports_the_clipped_area_not_the_sampled_lam():
    # clovaai/CutMix-PyTorch#1: a box clipped at the border pastes less than 1 - lam
    generator = seeded(3)
    clipped = 0
    for _ in range(300):
        lam = sample_beta(1.0, 1.0, generator)
        y0, y1, x0, x1 = sample_box(16, 16, lam, generator)
        uncut_h = int(16 * math.sqrt(1 - lam))
        clipped += (y1 - y0) < uncut_h
    assert clipped > 50
    mix = make_mix(mix_prob=1.0, switch_prob=1.0)
    images, targets = random_batch(size=3, height=16, width=16)
    far_from_draw = 0
    for _ in range(200):
        batch = mix(images, targets)
        y0, y1, x0, x1 = batch.box
        assert batch.lam[0].item() == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 256, abs=1e-7)
        far_from_draw += batch.lam[0].item() > 0.999 and (y1 - y0) * (x1 - x0) == 0
    assert far_from_draw > 0  # boxes clipped away entirely report lam = 1


def test_sample_box_stays_inside_and_centres_cover_the_image():
    generator = seeded(1)
    corners = set()
    for _ in range(400):
        y0, y1, x0, x1 = sample_box(5, 7, 0.9, generator)
        assert 0 <= y0 <= y1 <= 5 and 0 <= x0 <= x1 <= 7
        corners.add((y0, x0))
    assert len(corners) > 20
    unclipped = 0
    for _ in range(400):
        lam = sample_beta(1.0, 1.0, generator)
        y0, y1, x0, x1 = sample_box(20, 30, lam, generator)
        if 0 < y0 and y1 < 20 and 0 < x0 and x1 < 30:
            unclipped += 1
            ratio = math.sqrt(1 - lam)
            assert (y1 - y0, x1 - x0) == (int(20 * ratio), int(30 * ratio))
    assert unclipped > 50
    assert sample_box(4, 4, 0.0, generator) is not None
    y0, y1, x0, x1 = sample_box(4, 6, 1.0, generator)
    assert (y1 - y0) * (x1 - x0) == 0


# --------------------------------------------------------------------------------------------
# Schedule and distributions


def test_schedule_statistics():
    warmup, calls, mix_prob, switch_prob = 40, 3000, 0.3, 0.7
    mix = make_mix(mix_prob=mix_prob, switch_prob=switch_prob, warmup_steps=warmup)
    images, targets = random_batch(size=2, channels=1, height=3, width=3)
    ops = [mix(images, targets).op for _ in range(warmup + calls)]
    assert set(ops[:warmup]) == {"none"}, "no mixing during warm-up"
    assert mix.step == warmup + calls
    after = ops[warmup:]
    mixed = sum(op != "none" for op in after)
    sd = math.sqrt(calls * mix_prob * (1 - mix_prob))
    assert abs(mixed - calls * mix_prob) < 4 * sd
    cut = sum(op == "cutmix" for op in after)
    sd = math.sqrt(mixed * switch_prob * (1 - switch_prob))
    assert abs(cut - mixed * switch_prob) < 4 * sd


@pytest.mark.parametrize("mix_prob,switch_prob", [(0.0, 0.5), (1.0, 0.0), (1.0, 1.0)])
def test_schedule_extremes(mix_prob, switch_prob):
    mix = make_mix(mix_prob=mix_prob, switch_prob=switch_prob)
    images, targets = random_batch(size=3, height=4, width=4)
    expected = "none" if mix_prob == 0 else ("cutmix" if switch_prob == 1 else "mixup")
    assert {mix(images, targets).op for _ in range(50)} == {expected}


@pytest.mark.parametrize("alpha,beta", [(0.2, 0.2), (1.0, 1.0), (3.0, 3.0), (2.0, 5.0), (0.5, 1.5)])
def test_sample_beta_follows_the_beta_distribution(alpha, beta):
    stats = pytest.importorskip("scipy.stats")
    generator = seeded(11)
    draws = [sample_beta(alpha, beta, generator) for _ in range(3000)]
    assert all(0.0 <= d <= 1.0 for d in draws)
    assert stats.kstest(draws, stats.beta(alpha, beta).cdf).pvalue > 1e-3


def test_mixup_lam_follows_beta_alpha_alpha():
    stats = pytest.importorskip("scipy.stats")
    mix = make_mix(mix_prob=1.0, switch_prob=0.0, mixup_alpha=0.4)
    images, targets = random_batch(size=2, channels=1, height=2, width=2)
    lams = [mix(images, targets).lam[0].item() for _ in range(2000)]
    assert stats.kstest(lams, stats.beta(0.4, 0.4).cdf).pvalue > 1e-3


def test_sample_beta_moments_without_scipy():
    generator = seeded(5)
    draws = torch.tensor([sample_beta(2.0, 5.0, generator) for _ in range(4000)])
    mean, var = 2 / 7, (2 * 5) / (7**2 * 8)
    assert abs(draws.mean().item() - mean) < 4 * math.sqrt(var / 4000)
    assert abs(draws.var().item() - var) < 0.1 * var


@pytest.mark.parametrize("shape", [0.3, 1.0, 3.0, 50.0])
def test_gamma_core_log_moments(shape):
    # E[log X] = digamma(a), Var[log X] = trigamma(a) for X ~ Gamma(a): sensitive to the
    # constant d = a - 1/3 of Marsaglia-Tsang and to the shape < 1 boost; at a large shape to
    # its c = 1 / sqrt(9 d) too (a smaller c lets the proposal exceed the target: Var[log X]
    # about 10 % low)
    draws = 20000
    generator = seeded(17)
    logs = torch.tensor([_log_gamma_variate(shape, generator) for _ in range(draws)])
    a = torch.tensor(shape, dtype=torch.float64)
    mean, var = torch.special.digamma(a).item(), torch.special.polygamma(1, a).item()
    assert abs(logs.double().mean().item() - mean) < 4 * math.sqrt(var / draws)
    assert abs(logs.double().var().item() / var - 1) < 0.05


def test_sample_beta_tiny_alpha_stays_finite():
    generator = seeded(2)
    draws = [sample_beta(0.005, 0.005, generator) for _ in range(200)]
    assert all(0.0 <= d <= 1.0 and math.isfinite(d) for d in draws)
    assert sum(min(d, 1 - d) < 1e-6 for d in draws) > 150, "mass concentrates at 0 and 1"


def test_gamma_core_skips_a_proposal_at_the_cube_roots_zero():
    # v = 1 + c x = 0 exactly (shape 4/3: d = 1, c = 1/3, x = -3) must be rejected like v < 0:
    # log(v^3) has no value there. The next proposal, x = 0, gives v = 1 and log X = log d = 0.
    with mock.patch.object(mixing, "_normal", side_effect=[-3.0, 0.0]):
        assert _log_gamma_variate(4 / 3, seeded(0)) == 0.0


@pytest.mark.parametrize("alpha,beta", [(0.3, 0.3), (0.5, 2.0), (2.0, 0.5)])
def test_sample_beta_with_small_shapes_draws_only_from_the_generator(alpha, beta):
    # A shape below 1 takes one more uniform draw (the boost): from the generator as well.
    global_state = torch.get_rng_state()
    draws = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        generator = seeded(4)
        draws.append([sample_beta(alpha, beta, generator) for _ in range(20)])
        assert torch.equal(torch.get_rng_state(), before), "the global RNG is never drawn from"
    torch.set_rng_state(global_state)
    assert draws[0] == draws[1]


def test_cutmix_and_mixup_draw_lam_with_their_own_alpha():
    # Beta(1e4, 1e4) is within 0.01 of 0.5 and Beta(1e-3, 1e-3) within 1e-3 of 0 or 1 (but for
    # a chance of about 1 %). In a 64 x 64 image a sampled lam of 0.5 gives a box of sides
    # floor(64 * sqrt(0.5)) = 45, 23 to 45 after clipping; a lam near 1 a box of at most 3 x 3,
    # and a lam near 0 one of 64 x 64 around the centre, at least 32 x 32 after clipping.
    for cutmix_alpha, mixup_alpha in ((1e4, 1e-3), (1e-3, 1e4)):
        mix = make_mix(mix_prob=1.0, switch_prob=0.5, cutmix_alpha=cutmix_alpha, mixup_alpha=mixup_alpha)
        images, targets = random_batch(size=2, channels=1, height=64, width=64)
        batches = [mix(images, targets) for _ in range(40)]
        cut = [batch for batch in batches if batch.op == "cutmix"]
        mixed = [batch.lam[0].item() for batch in batches if batch.op == "mixup"]
        assert len(cut) >= 10 and len(mixed) >= 10
        sides = [(y1 - y0, x1 - x0) for (y0, y1, x0, x1) in (batch.box for batch in cut)]
        if cutmix_alpha > 1:
            assert all(23 <= side <= 45 for pair in sides for side in pair), sides
            assert all(min(lam, 1 - lam) < 0.01 for lam in mixed), mixed
        else:
            assert all(max(pair) <= 3 or min(pair) >= 32 for pair in sides), sides
            assert all(abs(lam - 0.5) < 0.01 for lam in mixed), mixed


# --------------------------------------------------------------------------------------------
# RNG: own generator, reproducibility, resume, ranks


def outputs(batch):
    return (batch.images, batch.lam, batch.partner, batch.targets_b, batch.index_b)


def assert_same_batch(left, right):
    assert left.op == right.op and left.box == right.box
    for a, b in zip(outputs(left), outputs(right)):
        assert torch.equal(a, b)


def test_resume_mixes_exactly_as_an_uninterrupted_run(device):
    stream = [random_batch(device=device) for _ in range(10)]
    settings = dict(mix_prob=0.7, switch_prob=0.5, warmup_steps=2)
    uninterrupted = make_mix(generator=seeded(7), **settings)
    reference = [uninterrupted(images, targets) for images, targets in stream]

    first = make_mix(generator=seeded(7), **settings)
    for images, targets in stream[:4]:
        first(images, targets)
    state = first.state_dict()
    first(*stream[4])  # advancing the saved object must not change the saved state
    resumed = make_mix(generator=seeded(12345), **settings)
    resumed.load_state_dict(state)
    assert resumed.step == 4
    for (images, targets), expected in zip(stream[4:], reference[4:]):
        assert_same_batch(resumed(images, targets), expected)
    assert {b.op for b in reference[4:]} >= {"mixup", "cutmix"}


def test_draws_use_only_the_own_generator():
    images, targets = random_batch()
    global_state = torch.get_rng_state()
    runs = []
    for _ in range(2):
        mix = make_mix(mix_prob=1.0, generator=seeded(9))
        runs.append([mix(images, targets) for _ in range(6)])
        torch.rand(3)  # disturbing the global RNG changes nothing
    for left, right in zip(*runs):
        assert_same_batch(left, right)
    torch.set_rng_state(global_state)
    CompoundMix(mix_prob=1.0)(images, targets)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_default_generator_follows_manual_seed_and_differs_per_rank(monkeypatch):
    images, targets = random_batch()

    def draws(mix):
        return [mix(images, targets).partner.tolist() for _ in range(8)]

    torch.manual_seed(123)
    rank0 = draws(CompoundMix(mix_prob=1.0))
    torch.manual_seed(123)
    assert draws(CompoundMix(mix_prob=1.0)) == rank0

    # pytorch-image-models#1519: every rank drew the same augmentation
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    torch.manual_seed(123)
    assert draws(CompoundMix(mix_prob=1.0)) != rank0
    torch.manual_seed(123)
    assert draws(CompoundMix(mix_prob=1.0, same_on_all_ranks=True)) == rank0
    # Every rank its own stream (ranks 0 to 3), also from the largest torch seed.
    for seed in (123, 2**64 - 1):
        streams = []
        for rank in range(4):
            monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, rank=rank: rank)
            torch.manual_seed(seed)
            streams.append(draws(CompoundMix(mix_prob=1.0)))
        assert len({str(stream) for stream in streams}) == 4


# --------------------------------------------------------------------------------------------
# Targets


def test_probability_targets_are_carried_with_the_same_partners(device):
    images, _ = random_batch(device=device)
    soft = torch.softmax(torch.randn(6, 4, device=device), dim=1)
    mix = make_mix(mix_prob=1.0)
    for _ in range(4):
        batch = mix(images, soft)
        assert batch.targets_a is soft, "the mixer never smooths or copies targets"
        assert torch.equal(batch.targets_b, soft[batch.partner])
        dense = batch.soft_targets()
        lam = batch.lam.unsqueeze(1)
        torch.testing.assert_close(dense, lam * soft + (1 - lam) * soft[batch.partner])


def test_soft_targets_of_teacher_knowledge_is_the_composite_bank_target(device):
    # facebookresearch/deit#168: the teacher target of a mixed image is lam*K[I1] + (1-lam)*K[I2]
    knowledge = torch.softmax(torch.randn(50, 7, dtype=torch.float64, device=device), dim=1)
    indices = torch.randperm(50, device=device)[:6]
    images, _ = random_batch(device=device)
    batch = make_mix(mix_prob=1.0)(images, knowledge[indices], indices)
    lam = batch.lam.double().unsqueeze(1)
    composite = lam * knowledge[batch.index_a] + (1 - lam) * knowledge[batch.index_b]
    torch.testing.assert_close(batch.soft_targets(), composite, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_soft_targets_of_probability_targets_are_float32(dtype):
    images, _ = random_batch()
    soft = torch.softmax(torch.randn(6, 4), dim=1).to(dtype)
    batch = make_mix(mix_prob=1.0)(images, soft)
    dense = batch.soft_targets()
    assert dense.dtype == torch.float32
    lam = batch.lam.unsqueeze(1)
    torch.testing.assert_close(dense, lam * soft.float() + (1 - lam) * soft.float()[batch.partner])


def test_soft_targets_of_float64_targets_are_mixed_in_float64():
    # lam = 0.1 (float32): 1 - lam is exact in float64, not in float32.
    generator = seeded(3)
    soft = torch.softmax(torch.randn(4, 5, generator=generator, dtype=torch.float64), dim=1)
    partner = torch.tensor([1, 2, 3, 0])
    lam = torch.full((4,), 0.1)
    index = torch.arange(4)
    batch = MixedBatch(torch.zeros(4, 1, 1, 1), soft, soft[partner], index, index[partner], lam, partner, "mixup", None)
    dense = batch.soft_targets()
    assert dense.dtype == torch.float64
    lam64 = lam.double().unsqueeze(1)
    assert torch.equal(dense, lam64 * soft + (1 - lam64) * soft[partner])


def test_soft_targets_from_class_indices(device):
    images, targets = random_batch(device=device, classes=5)
    batch = make_mix(mix_prob=1.0, switch_prob=0.0)(images, targets)
    dense = batch.soft_targets(num_classes=5)
    assert dense.dtype == torch.float32 and dense.shape == (6, 5)
    torch.testing.assert_close(dense.sum(1), torch.ones(6, device=device))
    rows = torch.arange(6, device=device)
    expected_a = batch.lam + (1 - batch.lam) * (batch.targets_b == targets).float()
    torch.testing.assert_close(dense[rows, targets], expected_a)
    with pytest.raises(ValueError, match=r"`num_classes` must be given for class-index targets"):
        batch.soft_targets()


@pytest.mark.parametrize("bad_label", [7, -1])
@pytest.mark.parametrize("side", ["targets_a", "targets_b"])
def test_soft_targets_refuse_labels_outside_the_classes(device, bad_label, side):
    images, targets = random_batch(device=device, classes=4)
    batch = make_mix(mix_prob=1.0)(images, targets)
    bad = getattr(batch, side).clone()
    bad[2] = bad_label
    batch = batch._replace(**{side: bad})
    with pytest.raises(ValueError, match=rf"`{side}` must hold indices in \[0, 3\], but got {bad_label}$"):
        batch.soft_targets(num_classes=4)
    with pytest.raises(TypeError, match=r"`num_classes` must be an int, but got 4.0 \(float\)"):
        batch.soft_targets(num_classes=4.0)


# --------------------------------------------------------------------------------------------
# Functional pieces


def test_functionals_match_the_sampler(device):
    images, targets = random_batch(device=device)
    mix = make_mix(mix_prob=1.0)
    seen = set()
    for _ in range(10):
        batch = mix(images, targets)
        seen.add(batch.op)
        if batch.op == "mixup":
            expected = mixup(images, batch.partner, batch.lam[0].item())
        else:
            expected = cutmix(images, batch.partner, batch.box)
        assert torch.equal(batch.images, expected)
    assert seen == {"mixup", "cutmix"}


def test_mixup_with_per_sample_lam(device):
    images, _ = random_batch(size=4, device=device, dtype=torch.float64)
    partner = torch.tensor([2, 0, 3, 1], device=device)
    lam = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64, device=device)
    mixed = mixup(images, partner, lam)
    for i in range(4):
        expected = lam[i] * images[i] + (1 - lam[i]) * images[partner[i]]
        torch.testing.assert_close(mixed[i], expected)


# --------------------------------------------------------------------------------------------
# Loss


def reference_loss(logits, targets_a, targets_b, lam, smoothing):
    """Hand-written loop in float64: lam*CE(y_a) + (1-lam)*CE(y_b) per sample, then mean."""
    logits = logits.double().cpu()
    size, classes = logits.shape
    total = 0.0
    for i in range(size):
        log_z = math.log(sum(math.exp(v) for v in logits[i].tolist()))
        log_p = [v - log_z for v in logits[i].tolist()]

        def ce(target):
            if target.dim() == 0:
                row = [1.0 if c == int(target) else 0.0 for c in range(classes)]
            else:
                row = target.double().tolist()
            row = [(1 - smoothing) * t + smoothing / classes for t in row]
            return -sum(t * lp for t, lp in zip(row, log_p))

        w = float(lam[i])
        total += w * ce(targets_a[i].cpu()) + (1 - w) * ce(targets_b[i].cpu())
    return total / size


def build_batch(logits, targets, partner, lam, op="mixup"):
    size = logits.shape[0]
    index = torch.arange(size, device=logits.device)
    return MixedBatch(
        images=torch.zeros(size, 1, 1, 1, device=logits.device),
        targets_a=targets,
        targets_b=targets[partner],
        index_a=index,
        index_b=index[partner],
        lam=lam,
        partner=partner,
        op=op,
        box=None,
    )


@given(
    size=st.integers(1, 6),
    classes=st.integers(2, 6),
    soft=st.booleans(),
    smoothing=st.sampled_from([0.0, 0.1, 1.0]),
    lam_kind=st.sampled_from(["random", "zero", "one", "near"]),
    seed=st.integers(0, 2**16),
)
def test_mixed_cross_entropy_matches_a_loop(size, classes, soft, smoothing, lam_kind, seed):
    gen = seeded(seed)
    logits = torch.randn(size, classes, generator=gen, dtype=torch.float64) * 3
    if soft:
        targets = torch.softmax(torch.randn(size, classes, generator=gen) * 4, dim=1)
        if seed % 3 == 0:
            targets = torch.full((size, classes), 1 / classes)  # uniform rows
    else:
        targets = torch.randint(0, classes, (size,), generator=gen)
    lam = {
        "random": torch.rand(size, generator=gen),
        "zero": torch.zeros(size),
        "one": torch.ones(size),
        "near": torch.tensor([1e-6, 1 - 1e-6] * size)[:size],
    }[lam_kind]
    partner = torch.randperm(size, generator=gen)
    batch = build_batch(logits, targets, partner, lam)
    for dtype in (torch.float64, torch.float32):
        loss = mixed_cross_entropy(logits.to(dtype), batch, label_smoothing=smoothing)
        assert loss.dtype == dtype and loss.shape == ()
        expected = reference_loss(logits, targets, targets[partner], lam, smoothing)
        tolerance = 1e-10 if dtype == torch.float64 else 1e-5
        assert loss.item() == pytest.approx(expected, rel=tolerance, abs=tolerance)


def test_loss_weights_each_sample_before_reducing(device):
    # TorchSSL#69 / fastai#2286: per-sample weights applied after the mean are wrong
    logits = torch.randn(4, 3, device=device)
    targets = torch.tensor([0, 1, 2, 0], device=device)
    partner = torch.tensor([1, 2, 3, 0], device=device)
    lam = torch.tensor([0.1, 0.9, 0.5, 0.3], device=device)
    batch = build_batch(logits, targets, partner, lam)
    loss = mixed_cross_entropy(logits, batch)
    per_sample_a = F.cross_entropy(logits, targets, reduction="none")
    per_sample_b = F.cross_entropy(logits, targets[partner], reduction="none")
    torch.testing.assert_close(loss, (lam * per_sample_a + (1 - lam) * per_sample_b).mean())
    reduced_first = lam.mean() * per_sample_a.mean() + (1 - lam.mean()) * per_sample_b.mean()
    assert abs(loss.item() - reduced_first.item()) > 1e-3


def test_loss_has_no_hidden_label_smoothing(device):
    # timm's Mixup smooths by default; here the loss of an unmixed batch is plain CE
    images, targets = random_batch(device=device)
    batch = make_mix(mix_prob=0.0)(images, targets)
    logits = torch.randn(6, 5, device=device)
    torch.testing.assert_close(mixed_cross_entropy(logits, batch), F.cross_entropy(logits, targets))
    torch.testing.assert_close(
        mixed_cross_entropy(logits, batch, label_smoothing=0.2),
        F.cross_entropy(logits, targets, label_smoothing=0.2),
    )


def test_loss_without_smoothing_allows_masked_out_classes():
    # Logits of -inf (classes masked out) off the target: plain cross-entropy stays finite, as
    # F.cross_entropy's does; only smoothing spreads mass onto them.
    logits = torch.tensor([[2.0, -float("inf"), 0.5], [1.0, -float("inf"), 0.0]])
    targets = torch.tensor([0, 2])
    batch = build_batch(logits, targets, torch.tensor([1, 0]), torch.tensor([0.7, 0.4]))
    loss = mixed_cross_entropy(logits, batch)
    loss_a, loss_b = (F.cross_entropy(logits, t, reduction="none") for t in (batch.targets_a, batch.targets_b))
    assert bool(torch.isfinite(loss))
    torch.testing.assert_close(loss, (batch.lam * loss_a + (1 - batch.lam) * loss_b).mean())


def test_loss_gradcheck():
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    soft = torch.softmax(torch.randn(5, 4, dtype=torch.float64), dim=1)
    for targets in (torch.tensor([0, 1, 2, 3, 0]), soft):
        batch = build_batch(logits, targets, torch.tensor([4, 0, 1, 2, 3]), torch.rand(5))
        assert torch.autograd.gradcheck(
            lambda z: mixed_cross_entropy(z, batch, label_smoothing=0.1), (logits,)
        )


def test_loss_under_bf16_autocast_is_float32():
    layer = torch.nn.Linear(8, 5)
    features = torch.randn(6, 8)
    images, targets = random_batch()
    batch = make_mix(mix_prob=1.0)(images, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(features)
        assert logits.dtype == torch.bfloat16
        loss = mixed_cross_entropy(logits, batch)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, mixed_cross_entropy(logits.float(), batch))


def test_module_equals_functional(device):
    images, targets = random_batch(device=device)
    batch = make_mix(mix_prob=1.0)(images, targets)
    logits = torch.randn(6, 5, device=device)
    criterion = MixedCrossEntropyLoss(label_smoothing=0.1)
    assert "label_smoothing=0.1" in repr(criterion)
    assert torch.equal(criterion(logits, batch), mixed_cross_entropy(logits, batch, 0.1))
    # No smoothing unless asked (USER-REPORTS: smoothing hidden in the mixer or the loss).
    assert torch.equal(MixedCrossEntropyLoss()(logits, batch), mixed_cross_entropy(logits, batch))


def test_compound_mix_defaults_are_the_papers():
    # MKF: mix half of the batches, Mixup or CutMix with equal probability, Beta(1, 1) weights.
    mix = CompoundMix()
    assert (mix.mix_prob, mix.switch_prob, mix.mixup_alpha, mix.cutmix_alpha) == (0.5, 0.5, 1.0, 1.0)


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda g: sample_beta(1.0, 0.0, g), ValueError, r"^`beta` must lie in \(0, inf\), but got 0$"),
        (lambda g: sample_beta(1.0, math.inf, g), ValueError, r"^`beta` must lie in \(0, inf\), but got inf$"),
        (lambda g: sample_box(0, 4, 0.5, g), ValueError, r"^`height` must be an int >= 1, but got 0$"),
        (lambda g: sample_box(4, 0, 0.5, g), ValueError, r"^`width` must be an int >= 1, but got 0$"),
        (lambda g: CompoundMix(generator=g)(torch.rand(2, 1, 2, 2), [0, 1]), TypeError, r"^`targets` must be a torch.Tensor, but got \[0, 1\] \(list\)$"),
        (lambda g: mixup(torch.rand(3, 1, 2, 2), torch.tensor([1, 2, 0]), torch.full((2,), 0.5)), ValueError, r"^`lam` must be a number or Tensor\[B\] with B = 3, but got shape \(2,\)$"),
    ],
)
def test_draw_and_mix_arguments_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call(seeded(0))


def test_empty_boxes_and_half_images_are_mixed_as_given():
    images, partner = torch.rand(3, 1, 4, 5), torch.tensor([1, 2, 0])
    for box in ((2, 2, 0, 5), (0, 4, 3, 3)):  # no rows, no columns: nothing is pasted
        assert torch.equal(cutmix(images, partner, box), images)
    half = images.half()
    mixed = mixup(half, partner, torch.full((3,), 0.25))
    assert mixed.dtype == torch.float16
    torch.testing.assert_close(mixed, 0.25 * half + 0.75 * half[partner])


def test_tensors_on_another_device_are_named():
    # The meta device stands in for a second device; value checks read no meta values.
    images, targets = random_batch()
    batch = make_mix(mix_prob=1.0)(images, targets)
    logits = torch.randn(6, 5)
    with mkfkit.value_checks(False):
        with pytest.raises(ValueError, match=r"^`partner` must be on the device of `images` \(cpu\), but got meta$"):
            mixup(images, batch.partner.to("meta"), 0.5)
        for name in ("targets_b", "lam"):
            moved = batch._replace(**{name: getattr(batch, name).to("meta")})
            with pytest.raises(ValueError, match=rf"^`batch.{name}` must be on the device of `logits` \(cpu\), but got meta$"):
                mixed_cross_entropy(logits, moved)


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"`mix_prob` must lie in \[0, 1\], but got 1.5"):
        CompoundMix(mix_prob=1.5)
    with pytest.raises(ValueError, match=r"`switch_prob` must lie in \[0, 1\], but got -0.1"):
        CompoundMix(switch_prob=-0.1)
    with pytest.raises(ValueError, match=r"`mixup_alpha` must lie in \(0, inf\), but got 0"):
        CompoundMix(mixup_alpha=0.0)
    with pytest.raises(ValueError, match=r"`cutmix_alpha` must lie in \(0, inf\), but got -1"):
        CompoundMix(cutmix_alpha=-1.0)
    with pytest.raises(ValueError, match=r"`warmup_steps` must be an int >= 0, but got -3"):
        CompoundMix(warmup_steps=-3)
    with pytest.raises(TypeError, match=r"`warmup_steps` must be an int, but got 0.1 \(float\)"):
        CompoundMix(warmup_steps=0.1)
    with pytest.raises(TypeError, match=r"`generator` must be a torch.Generator, but got 0"):
        CompoundMix(generator=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generator_is_rejected():
    with pytest.raises(ValueError, match=r"`generator` must be a CPU torch.Generator"):
        CompoundMix(generator=torch.Generator(device="cuda"))


class _GeneratorOnCuda(torch.Generator):
    """A CPU generator that says it is on CUDA: the refusal, on a machine without one."""

    @property
    def device(self):
        return torch.device("cuda", 0)


@pytest.mark.parametrize(
    "call",
    [lambda g: CompoundMix(generator=g), lambda g: sample_beta(1.0, 1.0, g), lambda g: sample_box(4, 4, 0.5, g)],
)
def test_generator_on_another_device_is_refused_naming_it(call):
    message = r"`generator` must be a CPU torch.Generator \(the draws are a few numbers per batch\), but got one on cuda:0"
    with pytest.raises(ValueError, match=message):
        call(_GeneratorOnCuda())


IMAGES, TARGETS = torch.rand(4, 3, 8, 10), torch.tensor([0, 1, 2, 1])

CALL_ERRORS = [
    (
        lambda mix: mix(IMAGES[:, 0], TARGETS),
        ValueError,
        r"`images` must be a Tensor\[B, C, H, W\], but got shape \(4, 8, 10\)",
    ),
    (
        lambda mix: mix(IMAGES.to(torch.uint8), TARGETS),
        TypeError,
        r"`images` must have a floating-point dtype .*, but got torch.uint8",
    ),
    (
        lambda mix: mix(IMAGES, TARGETS[:3]),
        ValueError,
        r"`targets` must be a Tensor\[B\] with B = 4, but got shape \(3,\)",
    ),
    (
        lambda mix: mix(IMAGES, TARGETS.float()),
        ValueError,
        r"`targets` must be a Tensor\[B, K\] with B = 4, but got shape \(4,\)",
    ),
    (
        lambda mix: mix(IMAGES, torch.full((4, 3), 2.0)),
        ValueError,
        r"`targets` must lie in \[0, 1\], but got 2",
    ),
    (
        lambda mix: mix(IMAGES, TARGETS > 0),
        TypeError,
        r"`targets` must have an integer dtype, but got torch.bool",
    ),
    (
        lambda mix: mix(IMAGES, TARGETS, torch.arange(5)),
        ValueError,
        r"`indices` must be a Tensor\[B\] with B = 4, but got shape \(5,\)",
    ),
    (
        lambda mix: mix(IMAGES, TARGETS, torch.zeros(4)),
        TypeError,
        r"`indices` must have an integer dtype, but got torch.float32",
    ),
]


@pytest.mark.parametrize("call,error,message", CALL_ERRORS)
def test_call_errors(call, error, message):
    mix = make_mix(mix_prob=1.0)
    with pytest.raises(error, match=message):
        call(mix)
    assert mix.step == 0, "a rejected call does not count"


PARTNER = torch.tensor([1, 2, 0, 3])

FUNCTIONAL_ERRORS = [
    (lambda: mixup(IMAGES, PARTNER, 1.2), ValueError, r"`lam` must lie in \[0, 1\], but got 1.2"),
    (
        lambda: mixup(IMAGES, PARTNER[:2], 0.5),
        ValueError,
        r"`partner` must be a Tensor\[B\] with B = 4, but got shape \(2,\)",
    ),
    (
        lambda: cutmix(IMAGES, torch.tensor([1, 2, 3, 4]), (0, 1, 0, 1)),
        ValueError,
        r"`partner` must hold indices in \[0, 3\], but got 4",
    ),
    (
        lambda: cutmix(IMAGES, PARTNER, (0, 9, 0, 1)),
        ValueError,
        r"`box` must be 4 ints \(y0, y1, x0, x1\) with 0 <= y0 <= y1 <= 8 and "
        r"0 <= x0 <= x1 <= 10, but got \(0, 9, 0, 1\)",
    ),
    (
        lambda: cutmix(IMAGES, PARTNER, (0.0, 1.0, 0.0, 1.0)),
        ValueError,
        r"`box` must be 4 ints .*, but got \(0.0, 1.0, 0.0, 1.0\)",
    ),
    (
        lambda: sample_beta(0.0, 1.0, seeded()),
        ValueError,
        r"`alpha` must lie in \(0, inf\), but got 0",
    ),
    (
        lambda: sample_box(4, 4, -0.5, seeded()),
        ValueError,
        r"`lam` must lie in \[0, 1\], but got -0.5",
    ),
]


@pytest.mark.parametrize("call,error,message", FUNCTIONAL_ERRORS)
def test_functional_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def mixed_batch_of_four(targets=TARGETS):
    return make_mix(mix_prob=1.0)(IMAGES, targets)


LOSS_ERRORS = [
    (
        lambda: mixed_cross_entropy(torch.randn(3, 5), mixed_batch_of_four()),
        ValueError,
        r"`logits` must be a Tensor\[B, K\] with B = 4, but got shape \(3, 5\)",
    ),
    (
        lambda: mixed_cross_entropy(torch.zeros(4, 5, dtype=torch.long), mixed_batch_of_four()),
        TypeError,
        r"`logits` must have a floating-point dtype, but got torch.int64",
    ),
    (
        lambda: mixed_cross_entropy(torch.randn(4, 5), tuple(mixed_batch_of_four())),
        TypeError,
        r"`batch` must be a MixedBatch, but got tuple$",
    ),
    (
        lambda: mixed_cross_entropy(torch.randn(4, 5), mixed_batch_of_four(), 1.5),
        ValueError,
        r"`label_smoothing` must lie in \[0, 1\], but got 1.5",
    ),
    (
        lambda: mixed_cross_entropy(torch.randn(4, 5), mixed_batch_of_four(torch.ones(4, 3) / 3)),
        ValueError,
        r"`batch.targets_a` must be a Tensor\[B, K\] with B = 4, K = 5, but got shape \(4, 3\)",
    ),
]


@pytest.mark.parametrize("call,error,message", LOSS_ERRORS)
def test_loss_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_load_state_dict_errors():
    with pytest.raises(ValueError, match=r"`state_dict` must hold exactly the entries \['step', 'generator_state'\], but got missing \['generator_state'\]"):
        make_mix().load_state_dict({"step": 3})


@pytest.mark.parametrize("size", [2, 3])
def test_out_of_range_labels_are_refused_naming_the_side(size):
    targets = torch.arange(size)
    targets[-1] = 7
    batch = make_mix(mix_prob=1.0)(IMAGES[:size], targets)
    with pytest.raises(ValueError, match=r"`batch.targets_a` must hold indices in \[0, 4\], but got 7$"):
        mixed_cross_entropy(torch.randn(size, 5), batch)


def test_ignore_index_is_refused_on_either_side_of_a_pair():
    batch = make_mix(mix_prob=1.0)(IMAGES, torch.tensor([0, 1, -100, 2]))
    assert batch.op != "none" and bool((batch.targets_b == -100).any())
    with pytest.raises(ValueError, match=r"`batch.targets_a` must hold indices in \[0, 4\], but got -100 \(there is no ignore_index"):
        mixed_cross_entropy(torch.randn(4, 5), batch)
    only_b = batch._replace(targets_a=torch.tensor([0, 1, 3, 2]))
    with pytest.raises(ValueError, match=r"`batch.targets_b` must hold indices .* but got -100 \(there is no ignore_index"):
        mixed_cross_entropy(torch.randn(4, 5), only_b)


@pytest.mark.parametrize("soft", [False, True])
def test_empty_batch_loss_is_an_attached_zero(soft):
    targets = torch.zeros(0, 5) if soft else torch.zeros(0, dtype=torch.long)
    batch = make_mix(mix_prob=1.0)(IMAGES[:0], targets)
    logits = torch.zeros(0, 5, requires_grad=True)
    loss = mixed_cross_entropy(logits, batch, label_smoothing=0.1)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad.shape == (0, 5)


@pytest.mark.parametrize("shape", [(4, 0, 8, 8), (4, 3, 0, 8), (4, 3, 8, 0)])
def test_zero_size_images_are_refused_before_the_mixer_advances(shape):
    mix = make_mix(mix_prob=1.0)
    generator_state = mix.generator.get_state()
    message = re.escape(f"`images` must have C, H and W of at least 1 (B may be 0), but got shape {shape}")
    with pytest.raises(ValueError, match=message):
        mix(torch.zeros(shape), TARGETS)
    assert mix.step == 0 and torch.equal(mix.generator.get_state(), generator_state)
