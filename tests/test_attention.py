import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from mkfkit.attention import AttentionTransferLoss, attention_map, attention_transfer_loss

# ---------------------------------------------------------------- hand-written references


def ref_energy(features, p):
    """list[b][h][w] of sum_c |F|^p, by loops."""
    B, C, H, W = features.shape
    return [
        [[sum(abs(float(features[b, c, h, w])) ** p for c in range(C)) for w in range(W)] for h in range(H)]
        for b in range(B)
    ]


def ref_pool(grid, out_h, out_w):
    """Adaptive average pooling of one 2-D list (PyTorch's window rule)."""
    H, W = len(grid), len(grid[0])
    out = []
    for i in range(out_h):
        h0, h1 = (i * H) // out_h, -((-(i + 1) * H) // out_h)
        row = []
        for j in range(out_w):
            w0, w1 = (j * W) // out_w, -((-(j + 1) * W) // out_w)
            cells = [grid[h][w] for h in range(h0, h1) for w in range(w0, w1)]
            row.append(sum(cells) / len(cells))
        out.append(row)
    return out


def ref_bilinear(grid, out_h, out_w):
    """Bilinear resize, align_corners=False (half-pixel centres, clamped at the border)."""
    H, W = len(grid), len(grid[0])

    def source(dst, n_in, n_out):
        s = max((dst + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(s)), n_in - 1)
        return i0, min(i0 + 1, n_in - 1), s - i0

    out = []
    for i in range(out_h):
        h0, h1, dh = source(i, H, out_h)
        row = []
        for j in range(out_w):
            w0, w1, dw = source(j, W, out_w)
            top = (1 - dw) * grid[h0][w0] + dw * grid[h0][w1]
            bottom = (1 - dw) * grid[h1][w0] + dw * grid[h1][w1]
            row.append((1 - dh) * top + dh * bottom)
        out.append(row)
    return out


def ref_normalise(grid):
    flat = [v for row in grid for v in row]
    norm = math.sqrt(sum(v * v for v in flat))
    return [v / max(norm, 1e-12) for v in flat]


def ref_at_loss(features, p=2.0, resize="pool", reduction="mean", distance="l2", pairs=None):
    energies = [ref_energy(f, p) for f in features]
    pairs = pairs or [(m, m + 1) for m in range(len(features) - 1)]
    pair_losses = []
    for i, j in pairs:
        (hi, wi), (hj, wj) = features[i].shape[-2:], features[j].shape[-2:]
        size = (min(hi, hj), min(wi, wj)) if resize == "pool" else (max(hi, hj), max(wi, wj))
        per_sample = []
        for b in range(features[i].shape[0]):
            maps = []
            for k, (h, w) in ((i, (hi, wi)), (j, (hj, wj))):
                grid = energies[k][b]
                if (h, w) != size:
                    grid = (ref_pool if resize == "pool" else ref_bilinear)(grid, *size)
                maps.append(ref_normalise(grid))
            sq = [(x - y) ** 2 for x, y in zip(*maps)]
            per_sample.append(math.sqrt(sum(sq)) if distance == "l2" else sum(sq) / len(sq))
        pair_losses.append(sum(per_sample) / len(per_sample))
    return sum(pair_losses) / (len(pair_losses) if reduction == "mean" else 1)


# ---------------------------------------------------------------- attention_map


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [1, 2.0, 3.0, 2.5])
def test_attention_map_matches_loop(device, dtype, p):
    features = torch.randn(2, 3, 4, 5, dtype=dtype, device=device)  # signed, non-square
    got = attention_map(features, p)
    expected = torch.tensor([ref_normalise(grid) for grid in ref_energy(features.cpu(), p)], dtype=dtype)
    assert got.shape == (2, 20) and got.dtype == dtype
    torch.testing.assert_close(got.cpu(), expected)


def test_attention_map_channel_mean_equals_sum():
    features = torch.randn(3, 7, 4, 4)
    by_mean = F.normalize(features.pow(2).mean(1).flatten(1), dim=1)  # the AT paper's definition
    torch.testing.assert_close(attention_map(features), by_mean)


def test_attention_map_zero_features_are_safe():
    features = torch.zeros(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    out = attention_map(features)
    assert torch.equal(out, torch.zeros(2, 16, dtype=torch.float64))
    out.sum().backward()
    assert torch.isfinite(features.grad).all()


@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 4),
    height=st.integers(1, 6),
    width=st.integers(1, 6),
    p=st.sampled_from([1.0, 2.0, 4.0]),
    scale=st.floats(1e-2, 1e2),
    seed=st.integers(0, 2**16),
)
# One entry |F| = 1.1e-3 at p = 4: its map's norm 1.3e-12 falls below eps = 1e-12 once scaled by
# 1/2 (found once).
@example(batch=1, channels=1, height=1, width=1, p=4.0, scale=0.5, seed=4109)
def test_property_attention_map_unit_norm_and_scale_invariant(batch, channels, height, width, p, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, channels, height, width, generator=gen, dtype=torch.float64)

    def energy(x):  # the docstring's Q, flattened
        return x.abs().pow(p).sum(1).flatten(1)

    out, scaled = attention_map(features, p), attention_map(features * scale, p)
    assert (out >= 0).all()
    for x, got in ((features, out), (features * scale, scaled)):
        q = energy(x)
        torch.testing.assert_close(got, q / q.norm(dim=1, keepdim=True).clamp_min(1e-12))
    # Unit norm and scale-invariant wherever the norms stay above eps; below it a map is divided
    # by eps instead, as documented.
    large = (energy(features).norm(dim=1) > 2e-12) & (energy(features * scale).norm(dim=1) > 2e-12)
    torch.testing.assert_close(out[large].norm(dim=1), torch.ones_like(out[large, 0]))
    torch.testing.assert_close(scaled[large], out[large])


# ---------------------------------------------------------------- the CL loss


SHAPES = [(2, 3, 8, 6), (2, 4, 4, 3), (2, 5, 2, 3)]  # 8x6 -> 4x3 -> 2x3: non-square, per-dim sizes


@pytest.mark.parametrize("resize", ["pool", "interpolate"])
@pytest.mark.parametrize("distance", ["l2", "mean_squared"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cl_loss_matches_loop(device, resize, distance, reduction):
    features = [torch.randn(*s, dtype=torch.float64, device=device) for s in SHAPES]
    got = attention_transfer_loss(features, resize=resize, distance=distance, reduction=reduction)
    expected = ref_at_loss([f.cpu() for f in features], resize=resize, reduction=reduction, distance=distance)
    assert got.dtype == torch.float64
    assert math.isclose(got.item(), expected, rel_tol=1e-10)


def test_transposed_sizes_pool_both_maps():
    features = [torch.randn(2, 3, 8, 4, dtype=torch.float64), torch.randn(2, 3, 4, 8, dtype=torch.float64)]
    for resize in ("pool", "interpolate"):
        expected = ref_at_loss(features, resize=resize)
        assert math.isclose(attention_transfer_loss(features, resize=resize).item(), expected, rel_tol=1e-10)


def test_mean_squared_is_the_at_reference_code_and_the_conversion_holds():
    x, y = torch.randn(4, 8, 16, 16), torch.randn(4, 16, 16, 16)

    def at(f):  # szagoruyko/attention-transfer utils.at
        return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))

    reference_code = (at(x) - at(y)).pow(2).mean()
    torch.testing.assert_close(attention_transfer_loss([x, y], distance="mean_squared"), reference_code)
    # That code's `beta / 2 * sum(at_loss per group)`, beta = 1e3, as documented.
    groups_s, groups_t = [x, x[:, :, ::2, ::2]], [y, y[:, :, ::2, ::2]]
    ported = AttentionTransferLoss(loss_weight=1e3 / 2, reduction="sum", distance="mean_squared")
    expected = 1e3 / 2 * sum((at(a) - at(b)).pow(2).mean() for a, b in zip(groups_s, groups_t))
    torch.testing.assert_close(ported(groups_s, groups_t), expected)
    # Per sample, mean_squared = l2^2 / (H W): the ~1e3 gap of the issue for 32x32 maps.
    for b in range(4):
        l2 = attention_transfer_loss([x[b : b + 1], y[b : b + 1]]).item()
        ms = attention_transfer_loss([x[b : b + 1], y[b : b + 1]], distance="mean_squared").item()
        assert math.isclose(ms, l2**2 / 256, rel_tol=1e-5)


@pytest.mark.parametrize(
    "sizes", [((8, 8), (2, 2)), ((2, 2), (8, 8)), ((7, 5), (3, 2)), ((3, 2), (7, 5))]
)
def test_pool_averages_whole_windows_at_any_ratio_on_either_side(sizes):
    # At a factor of 2 a bilinear downsample samples each 2x2 window at its centre, which is its
    # mean, so only a factor of 4 or an uneven ratio tells pooling from interpolation; the
    # larger map is the first of the pair or the second, and a teacher list of one entry works.
    gen = torch.Generator().manual_seed(3)
    first = torch.randn(2, 3, *sizes[0], generator=gen, dtype=torch.float64)
    second = torch.randn(2, 5, *sizes[1], generator=gen, dtype=torch.float64)
    expected = ref_at_loss([first, second], resize="pool")
    assert math.isclose(attention_transfer_loss([first, second]).item(), expected, rel_tol=1e-10)
    assert math.isclose(attention_transfer_loss([first], [second]).item(), expected, rel_tol=1e-10)


def test_identical_maps_give_zero_and_finite_gradients():
    features = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = attention_transfer_loss([features, features * 3])
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(features.grad).all()


def _pair_grads(mode):
    gen = torch.Generator().manual_seed(7)  # the same pair for every mode
    shallow = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64).requires_grad_()
    deep = torch.randn(2, 6, 4, 4, generator=gen, dtype=torch.float64).requires_grad_()
    loss = attention_transfer_loss([shallow, deep], mode=mode)
    loss.backward()
    return loss, shallow, deep


def test_modes_route_gradients():
    plain, shallow_ref, deep_ref = _pair_grads("mutual")
    # Reference without any detach: d(x, y) with gradients to both sides.
    x = shallow_ref.detach().clone().requires_grad_()
    y = deep_ref.detach().clone().requires_grad_()
    xm = F.normalize(F.adaptive_avg_pool2d(x.pow(2).sum(1, keepdim=True), (4, 4)).flatten(1), dim=1)
    ym = F.normalize(y.pow(2).sum(1).flatten(1), dim=1)
    joint = (xm - ym).norm(dim=1).mean()
    joint.backward()
    torch.testing.assert_close(plain, joint)
    # mutual: the two detached directions summed and halved -> half the joint gradient each.
    torch.testing.assert_close(shallow_ref.grad, 0.5 * x.grad)
    torch.testing.assert_close(deep_ref.grad, 0.5 * y.grad)

    loss, shallow, deep = _pair_grads("deep_teaches_shallow")
    torch.testing.assert_close(loss, joint)
    assert deep.grad is None
    torch.testing.assert_close(shallow.grad, x.grad)

    loss, shallow, deep = _pair_grads("shallow_teaches_deep")
    assert shallow.grad is None
    torch.testing.assert_close(deep.grad, y.grad)


def test_teacher_student_pairs():
    student = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 8, 4, 4, requires_grad=True)]
    teacher = [torch.randn(2, 16, 8, 8, requires_grad=True), torch.randn(2, 32, 2, 2, requires_grad=True)]
    loss = attention_transfer_loss(student, teacher, resize="interpolate")
    expected = ref_at_loss(
        [f.detach() for f in student + teacher], resize="interpolate", pairs=[(0, 2), (1, 3)]
    )
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    loss.backward()
    assert all(t.grad is None for t in teacher)
    assert all(s.grad.abs().sum() > 0 for s in student)


@pytest.mark.parametrize("resize", ["pool", "interpolate"])
@pytest.mark.parametrize("mode", ["deep_teaches_shallow", "shallow_teaches_deep", "teacher"])
def test_gradcheck(resize, mode):
    # A detached direction makes the analytic gradient differ from the numerical one on
    # purpose, so check the block whose gradient is a true gradient: the shallowest (taught by
    # pair 0 only), the deepest, or the students of classic AT. "mutual" is half the detach-free
    # gradient (test_modes_route_gradients).
    shapes = [(2, 2, 4, 3), (2, 3, 2, 3), (2, 2, 1, 2)]
    features = [torch.randn(*s, dtype=torch.float64) for s in shapes]
    if mode == "teacher":
        teacher = [torch.randn(2, 5, 3, 3, dtype=torch.float64) for _ in shapes]
        students = [f.clone().requires_grad_() for f in features]
        assert torch.autograd.gradcheck(
            lambda *s: attention_transfer_loss(list(s), teacher, resize=resize, p=3.0), students
        )
        return
    end = -1 if mode == "shallow_teaches_deep" else 0

    def loss(block):
        blocks = list(features)
        blocks[end] = block
        return attention_transfer_loss(blocks, resize=resize, mode=mode, p=3.0)

    assert torch.autograd.gradcheck(loss, (features[end].clone().requires_grad_(),))


def test_autocast_bf16_on_cpu():
    conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
    conv2 = torch.nn.Conv2d(4, 8, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f1 = conv1(x)
        f2 = conv2(f1)
        assert f1.dtype == torch.bfloat16
        loss = attention_transfer_loss([f1, f2])
        maps = attention_map(f1)
    assert loss.dtype == torch.float32 and maps.dtype == torch.float32
    torch.testing.assert_close(loss, attention_transfer_loss([f1.float(), f2.float()]))
    loss.backward()
    assert torch.isfinite(conv1.weight.grad).all()


# ---------------------------------------------------------------- the module


def test_module_equals_functional_and_weight():
    features = [torch.randn(*s) for s in SHAPES]
    for kwargs in (dict(), dict(resize="interpolate", reduction="sum", distance="mean_squared", p=4.0)):
        module = AttentionTransferLoss(**kwargs)
        torch.testing.assert_close(module(features), attention_transfer_loss(features, **kwargs))
    weighted = AttentionTransferLoss(loss_weight=250.0)
    torch.testing.assert_close(weighted(features), 250.0 * attention_transfer_loss(features))
    assert "loss_weight=250" in repr(weighted)


@pytest.mark.parametrize("mode", ["mutual", "deep_teaches_shallow", "shallow_teaches_deep"])
@pytest.mark.parametrize("loss_weight", [0.5, 0.0])
def test_module_routes_gradients_by_its_mode_and_weight(mode, loss_weight):
    # The value is d(x, y) in every mode: only the gradients tell the module's mode apart.
    gen = torch.Generator().manual_seed(5)
    shapes = [(2, 3, 8, 8), (2, 6, 4, 4)]
    features = [torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]
    twins = [f.detach().clone().requires_grad_() for f in features]
    AttentionTransferLoss(mode=mode, loss_weight=loss_weight)(features).backward()
    (loss_weight * attention_transfer_loss(twins, mode=mode)).backward()
    for got, expected in zip(features, twins):
        if expected.grad is None:
            assert got.grad is None
        else:
            torch.testing.assert_close(got.grad, expected.grad, rtol=1e-12, atol=0.0)


def test_warmup_ramp_advances_once_per_backward_and_round_trips_exactly():
    features = [torch.randn(*s, requires_grad=True) for s in SHAPES]
    full = attention_transfer_loss(features).detach()
    module = AttentionTransferLoss(warmup_steps=4)
    ramps = []
    for _ in range(6):
        ramps.append(module.ramp)
        first = module(features)
        torch.testing.assert_close(first.detach(), full * module.ramp)
        second = module(features)  # several calls per step (one per branch) count once
        (first + second).backward()
    assert ramps == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0] and module.num_steps == 6
    # Neither evaluation passes nor losses that are never backpropagated advance it.
    with torch.no_grad():
        module(features)
    module(features)
    module.eval()
    module(features).backward()
    assert module.num_steps == 7  # the backward in eval mode still was a backward pass
    module.train()
    state = module.state_dict()
    restored = AttentionTransferLoss(warmup_steps=4)
    restored.load_state_dict(state)
    assert restored.num_steps == module.num_steps == 7 and restored.ramp == 1.0
    half_way = AttentionTransferLoss(warmup_steps=4)
    for _ in range(2):
        half_way(features).backward()
    restored.load_state_dict(half_way.state_dict())
    assert restored.ramp == 0.5
    # A state saved between a backward and the next forward resumes exactly.
    resumed = AttentionTransferLoss(warmup_steps=4)
    resumed.load_state_dict(half_way.state_dict())
    for loss_fn in (half_way, resumed):
        loss_fn(features).backward()
    assert half_way.num_steps == resumed.num_steps == 3
    assert AttentionTransferLoss().ramp == 1.0


def test_separate_backwards_each_count_and_retained_graphs_count_once():
    features = [torch.randn(*s, requires_grad=True) for s in SHAPES]
    module = AttentionTransferLoss(warmup_steps=10)
    loss = module(features)
    loss.backward(retain_graph=True)
    loss.backward()  # the same loss again: one count per forward generation
    assert module.num_steps == 1
    for _ in range(3):  # gradient accumulation: one count per micro-batch backward
        module(features).backward()
    assert module.num_steps == 4


# ---------------------------------------------------------------- errors


def test_errors():
    f = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="`features` must hold at least 2 feature maps, but got 0"):
        attention_transfer_loss([])
    with pytest.raises(ValueError, match="`features` must hold at least 2 feature maps, but got 1"):
        attention_transfer_loss([f])
    with pytest.raises(TypeError, match=r"`features` must be a sequence of Tensor\[B, C, H, W\]"):
        attention_transfer_loss(f)
    with pytest.raises(ValueError, match=r"`features\[1\]` must be a Tensor\[B, C, H, W\], but got shape \(2, 3\)"):
        attention_transfer_loss([f, torch.randn(2, 3)])
    with pytest.raises(ValueError, match=r"`features\[1\]` must have the batch size of `features\[0\]` \(2\), but got 3"):
        attention_transfer_loss([f, torch.randn(3, 3, 4, 4)])
    with pytest.raises(TypeError, match=r"`features\[0\]` must have a floating-point dtype"):
        attention_transfer_loss([f.long(), f])
    with pytest.raises(ValueError, match=r"`features\[1\]` must have the spatial size of `features\[0\]` \(4x4\) when resize='none', but got 2x2"):
        attention_transfer_loss([f, torch.randn(2, 3, 2, 2)], resize="none")
    with pytest.raises(ValueError, match=r"`teacher_features` must hold one map per entry of `features` \(1\), but got 2"):
        attention_transfer_loss([f], [f, f])
    with pytest.raises(ValueError, match=r"`teacher_features\[0\]` must have the batch size of `features\[0\]` \(2\), but got 3"):
        attention_transfer_loss([f], [torch.randn(3, 3, 4, 4)])
    with pytest.raises(ValueError, match=r"`p` must lie in \[1, inf\), but got 0.5"):
        attention_map(f, 0.5)
    with pytest.raises(ValueError, match=r"`features` must be a Tensor\[B, C, H, W\], but got shape \(3, 4, 4\)"):
        attention_map(f[0])
    with pytest.raises(ValueError, match="`mode` must be one of 'mutual', 'deep_teaches_shallow', 'shallow_teaches_deep'"):
        AttentionTransferLoss(mode="deep")
    with pytest.raises(ValueError, match="`resize` must be one of 'pool', 'interpolate', 'none', but got 'area'"):
        attention_transfer_loss([f, f], resize="area")
    with pytest.raises(ValueError, match=r"`warmup_steps` must be an int >= 0, but got -1"):
        AttentionTransferLoss(warmup_steps=-1)
    with pytest.raises(ValueError, match=r"`features\[1\]` must have C, H and W of at least 1 \(B may be 0\), but got shape \(2, 3, 0, 4\)"):
        attention_transfer_loss([f, torch.randn(2, 3, 0, 4)])


@pytest.mark.parametrize("state, error, message", [
    ({"num_steps": -1}, ValueError, r"`state\['num_steps'\]` must be an int >= 0, but got -1"),
    ({"num_steps": 2.5}, TypeError, r"`state\['num_steps'\]` must be an int, but got 2.5 \(float\)"),
    ({}, ValueError, r"`state` must hold exactly the entries \['num_steps'\], but got missing \['num_steps'\]"),
])
def test_corrupt_warmup_state_is_refused_and_changes_nothing(state, error, message):
    module = AttentionTransferLoss(warmup_steps=4)
    module.num_steps = 3
    with pytest.raises(error, match=message):
        module.load_state_dict({"_extra_state": state})
    assert module.num_steps == 3
