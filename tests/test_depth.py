import copy
import io
import itertools
import math
from collections import defaultdict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _gloo import leave_process_group
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from mkfkit.depth import (
    DepthSampler,
    SubNetwork,
    find_residual_blocks,
    is_residual_block,
    recalibrate_batchnorm,
)
from mkfkit.models import ResNet

# --------------------------------------------------------------------------------------------
# The test-suite's own models
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """CIFAR basic block with a ``shortcut`` attribute (empty ``nn.Sequential`` = identity)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.calls = 0

    def residual(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))

    def forward(self, x):
        self.calls += 1
        return torch.relu(self.residual(x) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, blocks=(3, 2), widths=(8, 16), num_classes=5):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages, cin = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stages.append(
                nn.Sequential(
                    *[
                        BasicBlock(cin if j == 0 else w, w, 2 if (i and j == 0) else 1)
                        for j in range(n)
                    ]
                )
            )
            cin = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)
        )

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


class SelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


class PreNormBlock(nn.Module):
    """Hand-written pre-norm Transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    def __init__(self, depth=4, dim=16):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.blocks = nn.Sequential(*[PreNormBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))


def identity_blocks(model):
    return [m for m in model.modules() if isinstance(m, BasicBlock) and len(m.shortcut) == 0]


def hand_built_forward(model, active):
    """The sub-network built by hand: the stages keep only the active blocks."""
    keep = dict(zip(map(id, identity_blocks(model)), active))
    stages = [nn.Sequential(*[b for b in stage if keep.get(id(b), True)]) for stage in model.stages]
    return nn.Sequential(model.stem, *stages, model.head)


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def test_find_blocks_small_resnet():
    model = SmallResNet(blocks=(3, 2))
    found = find_residual_blocks(model)
    assert found == [model.stages[0][0], model.stages[0][1], model.stages[0][2], model.stages[1][1]]
    assert model.stages[1][0] not in found  # downsampling block


def test_find_blocks_mkfkit_resnet():
    model = ResNet(blocks=(3, 3, 3))
    found = find_residual_blocks(model)
    expected = [b for layer in model.layers() for b in layer if b.downsample is None]
    assert found == expected and len(found) == 7


def test_find_blocks_transformers():
    model = TinyTransformer(depth=4)
    assert find_residual_blocks(model) == list(model.blocks)
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 3, enable_nested_tensor=False
    )
    assert find_residual_blocks(encoder) == list(encoder.layers)


class PlainBlock(nn.Module):  # conv-bn-relu, no shortcut
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class WideningBlock(BasicBlock):  # claims an identity shortcut but changes the channels
    def __init__(self):
        super().__init__(8, 8)
        self.conv2 = nn.Conv2d(8, 12, 3, 1, 1)


class TwoInputBlock(BasicBlock):  # forward needs two inputs: the identity cannot stand in
    def forward(self, x, context):
        return super().forward(x) + context


class BlockGroup(nn.Module):  # a stage with downsample=None holding residual blocks
    def __init__(self):
        super().__init__()
        self.downsample = None
        self.body = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))

    def forward(self, x):
        return self.body(x)


class NotABlock(nn.Module):  # attention + mlp but no norms: not a recognised Transformer block
    def __init__(self):
        super().__init__()
        self.attn = SelfAttention(8, 2)
        self.mlp = nn.Linear(8, 8)

    def forward(self, x):
        return self.mlp(self.attn(x))


def test_find_blocks_never_selects_non_residual_modules():
    group = BlockGroup()
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        PlainBlock(8),
        BasicBlock(8, 16, stride=2),  # projection shortcut and stride 2
        BasicBlock(16, 16, stride=2),  # stride 2 with (wrongly) empty shortcut: shape changes
        WideningBlock(),
        TwoInputBlock(8, 8),
        group,
        NotABlock(),
        nn.Linear(8, 8),
    )
    assert find_residual_blocks(model) == list(group.body)
    for module in (model[1], model[2], model[3], model[4], model[5], group, model[7], model[8]):
        assert not is_residual_block(module)


@pytest.mark.parametrize(
    "module, extra_types, error, message",
    [
        ("not a module", (), TypeError, r"`module` must be a torch.nn.Module, but got 'not a module' \(str\)$"),
        (PlainBlock, (), TypeError, r"`module` must be a torch.nn.Module, but got <class '.*PlainBlock'> \(type\)$"),
        (PlainBlock(4), (int,), TypeError, r"`extra_types` must be a tuple of torch.nn.Module subclasses, but got \(<class 'int'>,\) \(tuple\)$"),
    ],
)
def test_is_residual_block_refuses_what_is_not_a_module(module, extra_types, error, message):
    with pytest.raises(error, match=message):
        is_residual_block(module, extra_types)


def test_find_blocks_extra_types():
    model = nn.Sequential(PlainBlock(4), PlainBlock(4))
    assert find_residual_blocks(model) == []
    assert find_residual_blocks(model, extra_types=(PlainBlock,)) == list(model)
    with pytest.raises(TypeError, match=r"`extra_types` must be a tuple of torch.nn.Module subclasses, but got <class '.*PlainBlock'> \(type\)"):
        find_residual_blocks(model, extra_types=PlainBlock)
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module, but got \[PlainBlock"):
        find_residual_blocks([PlainBlock(4)])
    with pytest.raises(ValueError, match="`model` must contain residual blocks"):
        DepthSampler.from_model(model)


def test_torchvision_models():
    models = pytest.importorskip("torchvision.models")
    from torchvision.models.resnet import BasicBlock as TvBasic, Bottleneck as TvBottleneck

    resnet26 = lambda num_classes: models.ResNet(
        TvBottleneck, [2, 2, 2, 2], num_classes=num_classes
    )  # noqa: E731
    for build, count in ((models.resnet18, 5), (resnet26, 4)):
        model = build(num_classes=4)
        expected = [
            m
            for m in model.modules()
            if isinstance(m, (TvBasic, TvBottleneck)) and m.downsample is None
        ]
        found = find_residual_blocks(model)
        assert found == expected and len(found) == count
    # the sub-network of resnet18 equals the network with the dropped blocks removed
    model = models.resnet18(num_classes=4).eval()
    sampler = DepthSampler.from_model(model, seed=3)
    sampler.draw()
    subnet = sampler.draw()
    x = torch.randn(2, 3, 32, 32)
    keep = dict(zip(map(id, sampler.blocks), subnet.active))
    layers = [
        nn.Sequential(*[b for b in getattr(model, f"layer{i}") if keep.get(id(b), True)])
        for i in range(1, 5)
    ]
    reference = nn.Sequential(
        model.conv1,
        model.bn1,
        model.relu,
        model.maxpool,
        *layers,
        model.avgpool,
        nn.Flatten(),
        model.fc,
    )
    with sampler.apply(subnet), torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    vit = models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    assert find_residual_blocks(vit) == list(vit.encoder.layers)


def test_timm_models():
    timm = pytest.importorskip("timm")
    from timm.models.resnet import BasicBlock as TimmBasic, Bottleneck as TimmBottleneck
    from timm.models.vision_transformer import VisionTransformer

    for name in ("resnet18", "resnet50"):
        model = timm.create_model(name, pretrained=False, num_classes=4)
        expected = [
            m
            for m in model.modules()
            if isinstance(m, (TimmBasic, TimmBottleneck)) and m.downsample is None
        ]
        assert find_residual_blocks(model) == expected and len(expected) > 0
    vit = VisionTransformer(
        img_size=16, patch_size=8, embed_dim=16, depth=4, num_heads=2, num_classes=3
    ).eval()
    assert find_residual_blocks(vit) == list(vit.blocks)
    mask = (True, False, True, False)
    reference = copy.deepcopy(vit)
    reference.blocks = nn.Sequential(*[b for b, keep in zip(reference.blocks, mask) if keep])
    sampler = DepthSampler.from_model(vit, seed=0)
    x = torch.randn(2, 3, 16, 16)
    with sampler.apply(mask), torch.no_grad():
        torch.testing.assert_close(vit(x), reference(x))


# --------------------------------------------------------------------------------------------
# The drop schedule
# --------------------------------------------------------------------------------------------


@given(
    num_blocks=st.integers(1, 40),
    num_groups=st.integers(1, 6),
    drop_rate=st.floats(0.01, 1.0),
    growth=st.floats(1.0, 50.0),
    max_drop_fraction=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**31),
)
def test_every_draw_is_strictly_nested(
    num_blocks, num_groups, drop_rate, growth, max_drop_fraction, seed
):
    max_dropped = math.floor(max_drop_fraction * num_blocks)
    blocks = [nn.Identity() for _ in range(num_blocks)]
    kwargs = dict(
        drop_rate=drop_rate, growth=growth, max_drop_fraction=max_drop_fraction, seed=seed
    )
    if num_groups - 1 > max_dropped:
        with pytest.raises(ValueError, match="`num_groups` must be at most"):
            DepthSampler(blocks, num_groups, **kwargs)
        return
    sampler = DepthSampler(blocks, num_groups, **kwargs)
    assert sampler.max_dropped == max_dropped
    previous = None
    for step in range(3 * num_groups):
        subnet = sampler.draw()
        assert subnet.group == step % num_groups
        if subnet.group == 0:
            assert all(subnet.active)
        else:
            assert all(p or not a for p, a in zip(previous.active, subnet.active))  # subset
            assert subnet.num_active < previous.num_active  # strictly smaller
        assert num_blocks - subnet.num_active <= max_dropped
        previous = subnet


def test_include_full_false_cycles_over_sub_networks():
    sampler = DepthSampler([nn.Identity() for _ in range(12)], num_groups=4, seed=1)
    groups, previous = [], None
    for _ in range(9):
        subnet = sampler.draw(include_full=False)
        groups.append(subnet.group)
        if subnet.group > 1:
            assert subnet.num_active < previous.num_active and all(
                p or not a for p, a in zip(previous.active, subnet.active)
            )
        previous = subnet
    assert groups == [1, 2, 3] * 3
    with pytest.raises(ValueError, match="`include_full=False` needs `num_groups` >= 2"):
        DepthSampler([nn.Identity()], num_groups=1, seed=0).draw(include_full=False)


def exact_step(p, parent, budget):
    """{dropped blocks: probability} of one step of the chain from the active blocks ``parent``,
    by enumerating the sampler's documented procedure (Bernoulli draws, then the repairs)."""
    still = [i for i, keep in enumerate(parent) if keep]
    outcomes = defaultdict(float)
    for hits in itertools.product([False, True], repeat=len(still)):
        prob = math.prod(p[i] if h else 1 - p[i] for i, h in zip(still, hits))
        chosen = [i for i, h in zip(still, hits) if h]
        if not chosen:  # one block, proportional to p
            for i in still:
                outcomes[frozenset([i])] += prob * p[i] / sum(p[j] for j in still)
        elif len(chosen) <= budget:
            outcomes[frozenset(chosen)] += prob
        else:  # weighted draws without replacement, in order
            for order in itertools.permutations(chosen, budget):
                q, left = prob, sum(p[i] for i in chosen)
                for i in order:
                    q *= p[i] / left
                    left -= p[i]
                outcomes[frozenset(order)] += q
    return outcomes


def assert_law(outcomes, exact):
    """The frequency of every outcome (the sets of dropped blocks drawn) within 4.5 standard
    deviations (plus one count) of its exact probability; no outcome outside the law."""
    counts, draws = defaultdict(int), len(outcomes)
    for dropped in outcomes:
        counts[dropped] += 1
    assert set(counts) <= set(exact)
    for dropped, prob in exact.items():
        tolerance = 4.5 * math.sqrt(prob * (1 - prob) / draws) + 1 / draws
        assert abs(counts[dropped] / draws - prob) < tolerance, (sorted(dropped), counts[dropped] / draws, prob)


def dropped_blocks(subnet):
    return frozenset(i for i, keep in enumerate(subnet.active) if not keep)


def exact_first_step_marginals(p, budget):
    """P(block i is dropped in group 1)."""
    marginal = [0.0] * len(p)
    for dropped, prob in exact_step(p, [True] * len(p), budget).items():
        for i in dropped:
            marginal[i] += prob
    return marginal


def test_later_blocks_are_dropped_more_often():
    n, draws = 6, 6000
    sampler = DepthSampler(
        [nn.Identity() for _ in range(n)],
        num_groups=2,
        drop_rate=0.6,
        growth=4.0,
        max_drop_fraction=0.34,
        seed=0,
    )
    p = sampler.drop_probabilities.tolist()
    assert p == pytest.approx([0.6 * 4.0 ** (i / (n - 1) - 1) for i in range(n)], rel=1e-12)
    counts = torch.zeros(n)
    for _ in range(draws):
        counts += ~sampler.draw(include_full=False).active_mask()
    frequency = counts / draws
    exact = torch.tensor(exact_first_step_marginals(p, budget=2), dtype=torch.float32)
    assert torch.all(exact[1:] > exact[:-1])
    tolerance = 4.5 * torch.sqrt(exact * (1 - exact) / draws)
    assert torch.all((frequency - exact).abs() < tolerance), (frequency, exact)
    assert frequency[-1] > 2 * frequency[0]


def test_every_group_of_the_chain_has_its_exact_frequencies():
    # Group 2 is drawn from group 1 with the probabilities of the blocks group 1 kept, the budget
    # left after group 1 and no reserve (the last group): its law is the sum over group 1's
    # outcomes, each enumerated as the module docstring describes the step.
    n, groups, cycles = 5, 3, 6000
    sampler = DepthSampler(
        [nn.Identity() for _ in range(n)], groups, drop_rate=0.5, growth=4.0, max_drop_fraction=0.8, seed=0
    )
    p = sampler.drop_probabilities.tolist()
    exact = defaultdict(float)  # {blocks dropped by group 2: probability}
    for first, q in exact_step(p, [True] * n, budget=sampler.max_dropped - 1).items():
        parent = [i not in first for i in range(n)]
        for more, r in exact_step(p, parent, budget=sampler.max_dropped - len(first)).items():
            exact[first | more] += q * r
    outcomes = []
    for _ in range(cycles):
        sampler.draw(), sampler.draw()
        subnet = sampler.draw()
        assert subnet.group == 2
        outcomes.append(dropped_blocks(subnet))
    assert_law(outcomes, exact)


def test_defaults_do_not_hollow_out_a_shallow_net():
    sampler = DepthSampler([nn.Identity() for _ in range(7)], seed=0)  # a ResNet-20's blocks
    assert sampler.max_dropped == 3
    for _ in range(300):
        assert sampler.draw().num_active >= 4
    with pytest.raises(
        ValueError,
        match=r"`num_groups` must be at most 1 \+ floor\(max_drop_fraction \* len\(blocks\)\) = 2",
    ):
        DepthSampler([nn.Identity() for _ in range(3)])


# --------------------------------------------------------------------------------------------
# Running sub-networks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_subnet_equals_hand_built_model(device, dtype):
    model = SmallResNet().to(device, dtype).eval()
    sampler = DepthSampler.from_model(model, seed=5)
    x = torch.randn(3, 3, 8, 8, device=device, dtype=dtype)
    exact = dict(rtol=0, atol=0) if device == "cpu" else {}  # same kernels: bit for bit on CPU
    with torch.no_grad():
        full = model(x)
        for _ in range(6):
            with sampler.sample() as subnet:
                out = model(x)
            assert out.dtype == dtype and out.device == x.device
            torch.testing.assert_close(out, hand_built_forward(model, subnet.active)(x), **exact)
        torch.testing.assert_close(model(x), full, **exact)


def test_transformer_subnet_equals_hand_built_model(device):
    model = TinyTransformer(depth=4).to(device).eval()
    sampler = DepthSampler.from_model(model, seed=0)
    x = torch.randn(2, 5, 6, device=device)
    mask = torch.tensor([True, False, False, True])
    with sampler.apply(mask) as subnet, torch.no_grad():
        out = model(x)
    assert subnet.group == -1 and subnet.active == (True, False, False, True)
    reference = nn.Sequential(model.embed, model.blocks[0], model.blocks[3], model.norm)
    torch.testing.assert_close(out, model.head(reference(x).mean(1)))


def test_skipped_block_forward_is_not_called():
    model = SmallResNet()
    sampler = DepthSampler.from_model(model, seed=0)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(6):
        before = [b.calls for b in sampler.blocks]
        with sampler.sample() as subnet:
            model(x)
        after = [b.calls for b in sampler.blocks]
        assert [a - b for a, b in zip(after, before)] == [int(k) for k in subnet.active]


def test_full_model_restored_also_after_exception():
    model = SmallResNet().eval()
    sampler = DepthSampler.from_model(model, seed=0)
    patched = sampler.blocks[2]
    user_forward = patched.forward  # a user's own instance-level patch must survive
    patched.forward = lambda x: user_forward(x)

    def state(block):  # everything but the call counter
        return {k: v for k, v in block.__dict__.items() if k != "calls"}

    snapshot = [state(b) for b in sampler.blocks]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        full = model(x)
        with pytest.raises(KeyError):
            with sampler.apply([False] * len(sampler.blocks)):
                assert model(x).shape == full.shape
                raise KeyError("boom")
        assert [state(b) for b in sampler.blocks] == snapshot
        assert (
            "forward" not in sampler.blocks[0].__dict__ and BasicBlock.forward.__name__ == "forward"
        )
        torch.testing.assert_close(model(x), full, rtol=0, atol=0)
        with sampler.sample():  # the sampler is usable again
            pass


def test_full_apply_and_nesting_rules():
    model = SmallResNet()
    sampler = DepthSampler.from_model(model, seed=0)
    with sampler.full() as subnet:
        assert subnet.group == 0 and all(subnet.active)
    assert sampler.next_group == 0  # full() does not advance the cycle
    subnet = sampler.draw()
    assert sampler.next_group == 1
    with sampler.apply(subnet) as applied:
        assert applied is subnet
        with pytest.raises(RuntimeError, match="cannot be nested"):
            with sampler.full():
                pass
    with pytest.raises(ValueError, match="`subnet` must be a SubNetwork or a mask of 4 bools"):
        with sampler.apply([True, False]):
            pass
    with pytest.raises(TypeError, match="`subnet` must be a SubNetwork or a bool Tensor"):
        with sampler.apply(torch.ones(4)):
            pass
    other = DepthSampler.from_model(SmallResNet(), seed=0)
    with pytest.raises(ValueError, match="`subnet` must come from this sampler"):
        with sampler.apply(other.draw()):
            pass


def test_subnetwork_helpers():
    model = SmallResNet()
    sampler = DepthSampler.from_model(model, seed=0)
    subnet = sampler.apply([True, False, True, False])
    with subnet as applied:
        assert isinstance(applied, SubNetwork)
    assert applied.num_active == 2 and applied.active_fraction == 0.5
    assert applied.active_mask().tolist() == [True, False, True, False]
    skipped = {id(p) for b in (sampler.blocks[1], sampler.blocks[3]) for p in b.parameters()}
    assert {id(p) for p in applied.skipped_parameters()} == skipped
    loss = torch.tensor(2.5, requires_grad=True)
    with sampler.full() as full:
        assert full.zero_touch(loss) is loss  # nothing skipped: nothing to touch


def test_constructor_validation():
    blocks = [nn.Identity() for _ in range(8)]
    with pytest.raises(ValueError, match="`blocks` must hold at least one"):
        DepthSampler([])
    with pytest.raises(TypeError, match=r"`blocks\[1\]` must be a torch.nn.Module, but got 3 \(int\)"):
        DepthSampler([nn.Identity(), 3])
    with pytest.raises(ValueError, match="must not contain the same module twice"):
        DepthSampler([blocks[0]] * 2, num_groups=1)
    with pytest.raises(TypeError, match="DepthSampler.from_model\\(model\\) finds them"):
        DepthSampler(SmallResNet())
    with pytest.raises(ValueError, match=r"`drop_rate` must lie in \(0, 1\], but got 0"):
        DepthSampler(blocks, drop_rate=0.0)
    with pytest.raises(ValueError, match=r"`growth` must lie in \[1, inf\), but got 0.5"):
        DepthSampler(blocks, growth=0.5)
    with pytest.raises(ValueError, match=r"`max_drop_fraction` must lie in \(0, 1\], but got 1.5"):
        DepthSampler(blocks, max_drop_fraction=1.5)
    with pytest.raises(ValueError, match="`num_groups` must be an int >= 1, but got 0"):
        DepthSampler(blocks, num_groups=0)
    with pytest.raises(ValueError, match="either `generator` or `seed`"):
        DepthSampler(blocks, seed=1, generator=torch.Generator())
    with pytest.raises(TypeError, match="`generator` must be a CPU torch.Generator"):
        DepthSampler(blocks, generator=3)


def test_state_dict_round_trip():
    def run(sampler, k):
        return [(s.group, s.active) for s in (sampler.draw() for _ in range(k))]

    sampler = DepthSampler([nn.Identity() for _ in range(20)], num_groups=4, seed=7)
    run(sampler, 6)
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    expected = run(sampler, 10)
    resumed = DepthSampler([nn.Identity() for _ in range(20)], num_groups=4, seed=999)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.next_group == 2
    assert run(resumed, 10) == expected
    with pytest.raises(ValueError, match="`state\\['chain'\\]` must have 20 entries"):
        resumed.load_state_dict({**sampler.state_dict(), "chain": torch.ones(3, dtype=torch.bool)})


def test_default_seed_follows_torch_manual_seed():
    blocks = [nn.Identity() for _ in range(16)]

    def draws(sampler):
        return [sampler.draw().active for _ in range(9)]

    torch.manual_seed(11)
    first = draws(DepthSampler(blocks))
    later = draws(DepthSampler(blocks))
    torch.manual_seed(11)
    assert draws(DepthSampler(blocks)) == first != later


def test_autocast_bfloat16_cpu():
    model = SmallResNet().eval()
    sampler = DepthSampler.from_model(model, seed=0)
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        sampler.draw()
        with sampler.sample() as subnet:
            out = model(x)
        reference = hand_built_forward(model, subnet.active)(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Gradients of skipped blocks, optimiser effects, DDP
# --------------------------------------------------------------------------------------------


def _sub_network_step(model, sampler, subnet, optimizer, touch):
    x = torch.randn(4, 3, 8, 8)
    optimizer.zero_grad()  # set_to_none=True
    with sampler.apply(subnet) as applied:
        loss = model(x).square().mean()
        if touch:
            touched = applied.zero_touch(loss)
            assert torch.equal(touched, loss)
            loss = touched
        loss.backward()
    optimizer.step()


@pytest.mark.parametrize("touch", [False, True])
def test_skipped_parameters_gradients_and_optimizer(touch):
    model = SmallResNet()
    sampler = DepthSampler.from_model(model, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    full = sampler.draw()
    _sub_network_step(model, sampler, full, optimizer, touch)  # fills every momentum buffer
    subnet = sampler.draw()
    skipped = subnet.skipped_parameters()
    assert skipped and len(skipped) == sum(
        len(list(b.parameters())) for b, a in zip(sampler.blocks, subnet.active) if not a
    )
    before = [p.detach().clone() for p in skipped]
    _sub_network_step(model, sampler, subnet, optimizer, touch)
    if touch:  # zero gradients: SGD still applies weight decay and momentum
        assert all(p.grad is not None and not p.grad.any() for p in skipped)
        assert all(not torch.equal(p, q) for p, q in zip(skipped, before))
    else:  # no gradients: SGD leaves them exactly where they were
        assert all(p.grad is None for p in skipped)
        assert all(torch.equal(p, q) for p, q in zip(skipped, before))


def _ddp_worker(rank, world_size, folder):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)  # two processes share the CI machine's two cores
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size
    )
    torch.manual_seed(100 + rank)  # different global RNG on every rank
    model = SmallResNet()
    sampler = DepthSampler.from_model(model)  # seed drawn on rank 0, broadcast
    draws = [sampler.draw() for _ in range(30)]
    results = {"draws": [d.active for d in draws], "global": torch.rand(4)}
    for find_unused in (True, False):
        net = copy.deepcopy(model)
        ddp_sampler = DepthSampler.from_model(net, seed=1)
        ddp = DDP(net, find_unused_parameters=find_unused)
        flags = []
        for _ in range(2):  # DDP complains on the second iteration if the first was wrong
            subnet = ddp_sampler.draw(include_full=False)
            net.zero_grad()
            with ddp_sampler.apply(subnet):
                loss = ddp(torch.randn(2, 3, 8, 8)).square().mean()
                if not find_unused:
                    loss = subnet.zero_touch(loss)
                loss.backward()
            skipped = subnet.skipped_parameters()
            flags.append(
                [
                    "none" if p.grad is None else ("zero" if not p.grad.any() else "value")
                    for p in skipped
                ]
            )
        results[f"find_unused={find_unused}"] = flags
        results[f"grads={find_unused}"] = [
            None if p.grad is None else p.grad.clone() for p in net.parameters()
        ]
    torch.save(results, f"{folder}/rank{rank}.pt")
    leave_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")
def test_ddp_shared_draws_two_gloo_processes(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert not torch.equal(r0["global"], r1["global"])  # the ranks' global RNGs differ ...
    assert r0["draws"] == r1["draws"]  # ... yet the sampler's draws agree
    assert len(set(r0["draws"])) > 3
    assert all(flag == "none" for step in r0["find_unused=True"] for flag in step)
    assert all(flag == "zero" for step in r0["find_unused=False"] for flag in step)
    for key in ("grads=True", "grads=False"):  # averaged gradients agree across ranks
        for g0, g1 in zip(r0[key], r1[key]):
            assert (g0 is None and g1 is None) or torch.allclose(g0, g1)


# --------------------------------------------------------------------------------------------
# torch.compile (pytorch#95425): the compiled model must follow the sampled depth
# --------------------------------------------------------------------------------------------


def test_compiled_model_runs_the_sampled_depth(device):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    torch._dynamo.reset()
    model = TinyTransformer(depth=4).to(device).eval()
    backend = "inductor" if device == "cuda" else "eager"  # eager: dynamo guards, no C compiler
    compiled = torch.compile(model, backend=backend)
    sampler = DepthSampler.from_model(model, seed=0)
    x = torch.randn(2, 5, 6, device=device)
    outputs = []
    with torch.no_grad():
        for _ in range(6):
            with sampler.sample() as subnet:
                out = compiled(x)
                reference = model(x)
            torch.testing.assert_close(out, reference)
            outputs.append((subnet.active, out))
        torch.testing.assert_close(compiled(x), model(x))
    distinct = {active: out for active, out in outputs}
    assert len(distinct) >= 3  # several depths ran, with different outputs
    values = list(distinct.values())
    assert all(not torch.allclose(a, b) for a, b in itertools.combinations(values, 2))


# --------------------------------------------------------------------------------------------
# BatchNorm recalibration
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recalibrate_batchnorm_matches_direct_statistics(device, dtype):
    model = nn.Sequential(
        nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
    )
    model = model.to(device, dtype)
    model[0].momentum = 0.3
    model.eval()
    model[2].train()  # an individual training flag must survive too
    for _ in range(3):  # pollute the running statistics
        model[0].train(), model[2].train()
        model(torch.randn(4, 3, 5, 5, device=device, dtype=dtype) * 5 + 2)
    model.eval()
    model[2].train()
    sizes = [5, 7, 6]
    batches = [
        (torch.randn(b, 3, 5, 5, device=device, dtype=dtype) * 2 + 1, torch.zeros(b)) for b in sizes
    ]
    assert recalibrate_batchnorm(model, batches, num_samples=15) == 15

    used = [batches[0][0], batches[1][0], batches[2][0][:3]]
    weights = torch.tensor([5.0, 7.0, 3.0], dtype=torch.float64) / 15

    def reference(inputs):
        means = torch.stack([x.double().mean((0, 2, 3)) for x in inputs])
        variances = torch.stack([x.double().var((0, 2, 3), unbiased=True) for x in inputs])
        return weights @ means.cpu(), weights @ variances.cpu()

    mean0, var0 = reference(used)
    with torch.no_grad():
        second = [
            model[1](nn.functional.batch_norm(x, None, None, model[0].weight, model[0].bias, True))
            for x in used
        ]
    mean2, var2 = reference(second)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for bn, mean, var in ((model[0], mean0, var0), (model[2], mean2, var2)):
        torch.testing.assert_close(bn.running_mean.cpu().double(), mean, **tol)
        torch.testing.assert_close(bn.running_var.cpu().double(), var, **tol)
    assert model[0].momentum == 0.3 and model[2].momentum == 0.1
    assert [m.training for m in model] == [False, False, True, False] and not model.training
    assert recalibrate_batchnorm(model, (x for x, _ in batches), num_samples=None) == 18
    with pytest.raises(ValueError, match="`num_samples` must be an int >= 1, but got 0"):
        recalibrate_batchnorm(model, batches, num_samples=0)
    with pytest.raises(TypeError, match="`batches` must yield tensors"):
        recalibrate_batchnorm(model, [["a"]])
    assert model[0].momentum == 0.3  # restored after the error too


def test_recalibrate_batchnorm_repairs_sub_network_pollution():
    model = SmallResNet()
    sampler = DepthSampler.from_model(model, seed=0)
    data = [torch.randn(16, 3, 8, 8) for _ in range(4)]
    recalibrate_batchnorm(model, data)
    clean = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    for x in data:  # sub-network passes in train mode shift the statistics
        with sampler.sample():
            model(x)
    polluted = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert any(not torch.allclose(clean[k], polluted[k]) for k in clean)
    recalibrate_batchnorm(model, data)
    for k, v in model.state_dict().items():
        if "running" in k:
            torch.testing.assert_close(v, clean[k])


def test_draw_trailing_drops_a_uniform_number_of_trailing_blocks_per_stage():
    """Stimulative Training's sub-network: each stage keeps its first block and a prefix of
    the others, every prefix length equally likely; the cycle does not advance."""
    model = ResNet(num_classes=10, in_channels=1, blocks=(3, 2), widths=(8, 16))
    sampler = DepthSampler.from_model(model, num_groups=2, seed=0)
    stages = [list(stage) for stage in model.layers()]
    index = {id(block): i for i, block in enumerate(sampler.blocks)}
    state = sampler.state_dict()
    kept = torch.zeros(3, 2)
    draws = 3000
    for _ in range(draws):
        subnet = sampler.draw_trailing(stages)
        assert subnet.group == -1
        for s, stage in enumerate(stages):
            active = [subnet.active[index[id(b)]] if id(b) in index else True for b in stage]
            length = sum(active)
            assert active == [True] * length + [False] * (len(stage) - length)  # a prefix
            kept[length - 1, s] += 1
    assert sampler.next_group == state["position"]
    expected = torch.tensor([[1 / 3, 1 / 2], [1 / 3, 1 / 2], [1 / 3, 0.0]])
    torch.testing.assert_close(kept / draws, expected, atol=0.04, rtol=0)


def test_draw_trailing_refuses_blocks_the_sampler_does_not_own():
    model = ResNet(num_classes=10, in_channels=1, blocks=(2, 2), widths=(8, 16))
    sampler = DepthSampler.from_model(model, num_groups=2, seed=0)
    with pytest.raises(ValueError, match=r"`stages\[0\]` must hold, after its first block"):
        sampler.draw_trailing([[nn.Identity(), nn.Identity()]])
    with pytest.raises(ValueError, match=r"`stages\[1\]` must hold at least one block"):
        sampler.draw_trailing([list(model.layer1), []])


class Wobble(nn.Module):  # a residual block of the user's own, under a name no rule knows
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.act = nn.ReLU()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.act(self.body(x) + x)


class AddsBias(nn.Module):  # x + a learned offset: not a function of x, not a residual block
    def __init__(self, c):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x):
        return x + self.offset


class AddsNoise(nn.Module):  # x + noise(x) without anything learned
    def forward(self, x):
        return x + torch.randn_like(x)


class Projected(nn.Module):  # projection shortcut: the input is not added as it is
    def __init__(self, c):
        super().__init__()
        self.body, self.project = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.body(x) + self.project(x)


class DataDependent(nn.Module):  # control flow on values: cannot be traced, not guessed
    def __init__(self, c):
        super().__init__()
        self.body = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.body(x) if x.sum() > 0 else x


def test_find_blocks_recognises_a_user_block_by_what_it_does():
    wrapped = Wobble(4)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), Wobble(4), AddsBias(4), AddsNoise(), Projected(4), DataDependent(4),
        nn.Sequential(wrapped), Wobble(4), PreNormBlockRenamed(),
    )
    found = find_residual_blocks(model)
    assert found == [model[1], wrapped, model[7], model[8]]  # registration order, every run
    assert find_residual_blocks(model) == found
    assert all(m.calls == 0 for m in (model[1], wrapped, model[7]))  # tracing did not run them
    for module in (model[2], model[3], model[4], model[5], model[6]):
        assert not is_residual_block(module)
    assert find_residual_blocks(model, extra_types=(DataDependent,))[1] is model[5]
    sampler = DepthSampler.from_model(model[:8], num_groups=2, seed=0)
    assert sampler.blocks == (model[1], wrapped, model[7])
    x = torch.randn(2, 3, 6, 6)
    with sampler.apply([False, True, False]):
        torch.testing.assert_close(model[:2](x), model[0](x))  # dropped: the identity


class PreNormBlockRenamed(nn.Module):  # x + f(x) + g(x + f(x)) without the known child names
    def __init__(self, dim=4):
        super().__init__()
        self.mix = nn.Conv2d(dim, dim, 1)
        self.feed = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU())

    def forward(self, x):
        x = x + self.mix(x)
        return x + self.feed(x)


# --------------------------------------------------------------------------------------------
# Discovery rules one by one (blocks torch.fx cannot trace: only the name rules decide)
# --------------------------------------------------------------------------------------------


class Checked(nn.Module):
    """A block whose forward checks its input's rank with Python control flow on a traced
    value, so ``torch.fx`` cannot trace it and only the name rules of ``is_residual_block``
    can recognise it. Subclassed under the class names the tests need."""

    def __init__(self, convs="basic", shortcut=("downsample", None), stride=None, c=8):
        super().__init__()
        layers = {
            "basic": [nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1)],
            "bottleneck": [nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c // 4, 3, 1, 1), nn.Conv2d(c // 4, c, 1)],
            "single": [nn.Conv2d(c, c, 3, 1, 1)],
        }[convs]
        self.body = nn.Sequential(*layers)
        setattr(self, shortcut[0], shortcut[1])
        if stride is not None:  # declared, as torchvision's blocks do; the convs keep stride 1
            self.stride = stride
        self.pool = nn.AvgPool2d(stride) if stride not in (None, 1) else nn.Identity()

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError("expected a batch of images")
        return torch.relu(self.pool(self.body(x)) + self.pool(x))


def checked(name, **kwargs):
    return type(name, (Checked,), {})(**kwargs)


def same_width_projection(c=8):
    return nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("CheckedBlock", dict(shortcut=("downsample", None)), True),
        ("CheckedBlock", dict(shortcut=("shortcut", nn.Identity())), True),
        ("CheckedBlock", dict(shortcut=("shortcut", nn.Sequential())), True),
        ("CheckedBlock", dict(shortcut=("downsample", same_width_projection())), False),  # projection
        ("CheckedBlock", dict(shortcut=("shortcut", same_width_projection())), False),
        ("CheckedBottleneck", dict(convs="bottleneck"), True),  # narrowing convs, 8 -> 2 -> 8
        ("CheckedBottleneck", dict(convs="single"), True),
        ("CheckedUnit", dict(), False),  # neither "block" nor "bottleneck" in the name
        ("CheckedBlock", dict(stride=1), True),
        ("CheckedBlock", dict(stride=(1, 1)), True),
        ("CheckedBlock", dict(stride=2), False),  # downsamples by pooling: never a block
        ("CheckedBlock", dict(stride=(2, 2)), False),
    ],
)
def test_is_residual_block_name_rule_for_resnet_blocks(name, kwargs, expected):
    block = checked(name, **kwargs)
    with pytest.raises(torch.fx.proxy.TraceError):  # the name rule alone decides
        torch.fx.symbolic_trace(block)
    assert is_residual_block(block) is expected
    model = nn.Sequential(block, nn.Conv2d(8, 8, 1))
    assert find_residual_blocks(model) == ([block] if expected else [])


class CheckedTransformer(nn.Module):
    """Children under the given names; a forward ``torch.fx`` cannot trace (see Checked)."""

    def __init__(self, names):
        super().__init__()
        for name in names:
            self.add_module(name, nn.LayerNorm(8) if name.startswith(("norm", "ln_")) else nn.Linear(8, 8))

    def forward(self, x):
        if x.dim() != 3:
            raise ValueError("expected a batch of sequences")
        for child in self.children():
            x = x + child(x)
        return x


@pytest.mark.parametrize(
    "names, expected",
    [
        (("norm1", "attn", "norm2", "mlp"), True),  # timm's ViT Block
        (("ln_1", "self_attention", "ln_2", "mlp"), True),  # torchvision's EncoderBlock
        (("norm1", "norm2", "mlp"), False),  # no attention
        (("norm1", "attn", "norm2"), False),  # no mlp
        (("norm1", "attn", "mlp"), False),  # one norm
        (("norm1", "attn", "ln_2", "mlp"), False),  # the norms of two different pairs
    ],
)
def test_is_residual_block_name_rule_for_transformer_blocks(names, expected):
    block = CheckedTransformer(names)
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(block)
    assert is_residual_block(block) is expected


class BlockWithHead(nn.Module):  # a "Block" whose first submodule is a residual block
    def __init__(self):
        super().__init__()
        self.downsample = None
        self.block = BasicBlock(8, 8)
        self.head = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.head(self.block(x))


def test_a_block_holding_a_block_is_a_container():
    outer = BlockWithHead()
    assert not is_residual_block(outer)
    assert find_residual_blocks(nn.Sequential(outer)) == [outer.block]


def test_find_blocks_reports_a_shared_block_once():
    shared, first, second = BasicBlock(8, 8), BasicBlock(8, 8), BasicBlock(8, 8)
    model = nn.Sequential(nn.Sequential(shared, first), nn.Sequential(shared, second))
    assert find_residual_blocks(model) == [shared, first, second]
    assert DepthSampler.from_model(model, num_groups=2, seed=0).blocks == (shared, first, second)


class ByBehaviour(nn.Module):
    """Submodules for the forwards below (the class name matches no name rule)."""

    def __init__(self, c=4):
        super().__init__()
        self.body = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.BatchNorm2d(c)
        self.act = nn.ReLU()
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.1))
        self.pos = nn.Embedding(c, 1)
        self.register_buffer("index", torch.arange(c))


def pos_embedding(self, x):
    return x + self.pos(self.index).view(1, -1, 1, 1)


def squared_gate(self, x):
    t = torch.sigmoid(x)
    return x + self.body(x) * t * t


@pytest.mark.parametrize(
    "forward, expected",
    [
        (lambda self, x: torch.nn.functional.relu(x + self.body(x)), True),
        (lambda self, x: torch.relu(x + self.body(x)), True),
        (lambda self, x: (x + self.body(x)).relu(), True),
        (lambda self, x: self.act(x + self.body(x)), True),
        (lambda self, x: x.add(self.body(x)), True),
        (lambda self, x: self.body(x).add_(x), True),
        (lambda self, x: x + self.gamma * self.body(x), True),  # LayerScale
        (lambda self, x: x + self.body(self.act(x)), True),  # pre-activation branch
        (squared_gate, True),  # the branch reaches a node twice before its conv
        (lambda self, x: self.norm(x + self.body(x)), False),  # post-norm: not x when dropped
        (lambda self, x: (x + self.body(x)) * 0.5, False),
        (lambda self, x: torch.sigmoid(x + self.body(x)), False),
        (lambda self, x: (x + self.body(x), x), False),  # a tuple
        (lambda self, x: x + 1.0, False),
        (pos_embedding, False),  # learned, but not a function of x
    ],
)
def test_is_residual_block_by_behaviour_forms(forward, expected):
    block = type("Custom", (ByBehaviour,), {"forward": forward})()
    block(torch.randn(2, 4, 5, 5))  # a working forward
    assert is_residual_block(block) is expected


# --------------------------------------------------------------------------------------------
# The sampler's documented defaults, seeding and state
# --------------------------------------------------------------------------------------------


def test_sampler_defaults_are_the_documented_ones():
    sampler = DepthSampler([nn.Identity() for _ in range(5)], seed=0)
    # drop_rate 0.25 * growth 4 ** (u - 1), u = i / 4
    expected = [0.25 / 4, 0.25 / 4**0.75, 0.25 / 4**0.5, 0.25 / 4**0.25, 0.25]
    assert sampler.drop_probabilities.tolist() == pytest.approx(expected, rel=1e-12)
    assert (sampler.num_groups, sampler.max_dropped) == (3, 2)
    assert repr(sampler) == "DepthSampler(5 blocks, num_groups=3, max_dropped=2, next_group=0)"
    groups = []
    for _ in range(4):
        with sampler.sample() as subnet:
            groups.append(subnet.group)
            assert all(subnet.active) == (subnet.group == 0)
    assert groups == [0, 1, 2, 0]
    with sampler.sample(include_full=True) as subnet:
        assert subnet.group == 1


@pytest.mark.parametrize(
    "n, expected", [(1, [0.5]), (2, [0.5 / 8, 0.5]), (3, [0.5 / 8, 0.5 / 8**0.5, 0.5])]
)
def test_drop_probabilities_of_short_chains(n, expected):
    # u_i = i / (N - 1), and u = 1 for N = 1: the only block is the deepest one.
    sampler = DepthSampler(
        [nn.Identity() for _ in range(n)], 2, drop_rate=0.5, growth=8.0, max_drop_fraction=1.0, seed=0
    )
    assert sampler.drop_probabilities.tolist() == pytest.approx(expected, rel=1e-12)
    sampler.draw()
    assert 1 <= n - sampler.draw().num_active <= n


@pytest.mark.parametrize("drop_rate", [0.02, 1.0])  # mostly the no-hit repair / over the budget
def test_seed_fixes_the_draws_and_the_global_rng_is_never_used(drop_rate):
    blocks = [nn.Identity() for _ in range(10)]
    stages = [blocks[:4], blocks[4:]]

    def run(sampler):
        state = torch.get_rng_state()
        draws = [sampler.draw().active for _ in range(16)]
        draws += [sampler.draw_trailing(stages).active for _ in range(8)]
        assert torch.equal(torch.get_rng_state(), state)  # only the sampler's generator drew
        return draws

    torch.manual_seed(1)
    first = run(DepthSampler(blocks, 4, drop_rate=drop_rate, seed=5))
    torch.manual_seed(2)
    generator = torch.Generator().manual_seed(5)
    sampler = DepthSampler(blocks, 4, drop_rate=drop_rate, generator=generator)
    assert sampler.generator is generator
    assert run(sampler) == first and len(set(first)) > 4


@pytest.mark.parametrize("steps", [0, 1, 2, 3])
def test_state_dict_round_trip_at_the_budget_bounds(steps):
    # drop_rate = 1 with growth = 1 hits every block: each group drops all its budget allows,
    # so the saved chains sit at the upper bound load_state_dict accepts (8 blocks, T = 3).
    def make(seed):
        return DepthSampler([nn.Identity() for _ in range(8)], 3, drop_rate=1.0, growth=1.0, seed=seed)

    sampler = make(0)
    for _ in range(steps):
        sampler.draw()
    state = sampler.state_dict()
    assert 8 - int(state["chain"].sum()) == [0, 0, 3, 4][steps]
    resumed = make(99)
    resumed.load_state_dict(state)
    assert [resumed.draw().active for _ in range(5)] == [sampler.draw().active for _ in range(5)]


def test_draw_trailing_sub_network_runs_as_the_hand_built_model():
    model = ResNet(num_classes=4, in_channels=1, blocks=(3, 3), widths=(4, 8)).eval()
    sampler = DepthSampler.from_model(model, num_groups=2, seed=0)
    stages = model.layers()
    x = torch.randn(2, 1, 8, 8)
    seen = set()
    for _ in range(6):
        subnet = sampler.draw_trailing(stages)
        keep = dict(zip(map(id, subnet.blocks), subnet.active))
        reference = nn.Sequential(
            model.conv1, model.bn1, model.relu,
            *[nn.Sequential(*[b for b in stage if keep.get(id(b), True)]) for stage in stages],
            model.avgpool, nn.Flatten(), model.fc,
        )
        with sampler.apply(subnet), torch.no_grad():
            torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
        seen.add(subnet.active)
    assert len(seen) > 2


@pytest.mark.parametrize("position", [1, 2])
def test_draw_trailing_names_the_foreign_block(position):
    model = ResNet(num_classes=4, in_channels=1, blocks=(3,), widths=(4,))
    sampler = DepthSampler.from_model(model, num_groups=2, seed=0)
    stage = list(model.layer1)
    stage[position] = nn.Identity()
    message = rf"but its block {position} is not one of them$"
    with pytest.raises(ValueError, match=message):
        sampler.draw_trailing([stage])


def test_from_model_passes_extra_types_on():
    model = nn.Sequential(PlainBlock(4), PlainBlock(4))
    sampler = DepthSampler.from_model(model, num_groups=2, extra_types=(PlainBlock,), seed=0)
    assert sampler.blocks == tuple(model)


def test_active_mask_on_the_given_device():
    subnet = SubNetwork(1, (True, False, True), ())
    mask = subnet.active_mask("meta")  # no data: a device any machine has
    assert mask.device.type == "meta" and mask.dtype == torch.bool and mask.shape == (3,)


@pytest.mark.parametrize("loss_dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("zero_weights", [False, True])  # skipped parameters summing to 0
def test_zero_touch_keeps_the_loss_and_gives_zero_gradients(loss_dtype, zero_weights):
    blocks = [nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False)]
    if zero_weights:
        nn.init.zeros_(blocks[1].weight)  # e.g. a zero-initialised adapter
    sampler = DepthSampler(blocks, 2, seed=0)
    with sampler.apply([True, False]) as subnet:
        loss = blocks[0](torch.randn(2, 3)).square().mean().to(loss_dtype)
        touched = subnet.zero_touch(loss)
        assert touched.dtype == loss_dtype and torch.equal(touched, loss)
        touched.backward()
    assert blocks[0].weight.grad.abs().sum() > 0
    assert torch.equal(blocks[1].weight.grad, torch.zeros(3, 3))


def test_zero_touch_of_a_half_parameter_whose_sum_overflows_float16():
    # 70,000 ones sum past float16's largest number (65,504): summed in float16 the touch is inf,
    # and 0 * inf would make a finite loss NaN.
    blocks = [nn.Linear(4, 4).half(), nn.LayerNorm(70_000).half()]
    sampler = DepthSampler(blocks, 2, seed=0)
    with sampler.apply([True, False]) as subnet:
        loss = blocks[0](torch.randn(2, 4).half()).float().square().mean()
        touched = subnet.zero_touch(loss)
        assert torch.equal(touched, loss)
        touched.backward()
    assert blocks[1].weight.grad.dtype == torch.float16 and not blocks[1].weight.grad.any()
