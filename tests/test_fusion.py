import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mkfkit.attention import AttentionTransferLoss
from mkfkit.distill import kd_loss
from mkfkit.features import FeatureCollector
from mkfkit.fusion import (
    BranchGate,
    FeatureFusionTeacher,
    branch_disagreement,
    online_distillation_loss,
)


def branch_inputs(n=2, batch=4, channels=3, size=(5, 3), classes=6, dtype=torch.float32, device="cpu"):
    features = [torch.randn(batch, channels, *size, dtype=dtype, device=device, requires_grad=True) for _ in range(n)]
    logits = [torch.randn(batch, classes, dtype=dtype, device=device, requires_grad=True) for _ in range(n)]
    return features, logits


# ---------------------------------------------------------------- FeatureFusionTeacher


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [2, 3])
def test_weights_sum_to_one_and_teacher_is_weighted_sum(device, dtype, n):
    fusion = FeatureFusionTeacher(3, n).to(device, dtype)
    features, logits = branch_inputs(n, dtype=dtype, device=device)
    teacher, weights = fusion(features, logits)
    assert teacher.shape == (4, 6) and weights.shape == (4, n)
    assert teacher.dtype == weights.dtype == dtype
    torch.testing.assert_close(weights.sum(1), torch.ones(4, dtype=dtype, device=device))
    assert (weights > 0).all()
    for b in range(4):  # loop reference of z_e = sum_a w_a z_a
        expected = sum(weights[b, a] * logits[a][b] for a in range(n))
        torch.testing.assert_close(teacher[b], expected)
    # The weights are the softmax of the central block's scores.
    fused = torch.cat(features, 1)
    scores = fusion.scores(fusion.pool(fusion.central(fused)).flatten(1))
    torch.testing.assert_close(weights, scores.softmax(1))


@pytest.mark.parametrize("training", [True, False])
def test_central_block_is_conv_bn_relu_then_average_pool_and_linear(training):
    # KD-ATFF 1.2, written with functional ops on the module's parameters: each layer a
    # same-padded convolution, BatchNorm (batch statistics in training, running ones in eval),
    # ReLU; then the spatial mean, one linear score per branch and a softmax over branches.
    fusion = FeatureFusionTeacher((3, 2, 3), 3, num_layers=2, hidden_channels=4, kernel_size=3).double()
    with torch.no_grad():
        for norm in (fusion.central[1], fusion.central[4]):
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
            norm.weight.uniform_(0.5, 2)
            norm.bias.uniform_(-1, 1)
    fusion.train(training)
    features = [torch.randn(5, c, 6, 4, dtype=torch.float64) for c in (3, 2, 3)]
    logits = [torch.randn(5, 7, dtype=torch.float64) for _ in range(3)]
    x = torch.cat(features, 1)
    for conv, norm in ((fusion.central[0], fusion.central[1]), (fusion.central[3], fusion.central[4])):
        x = F.conv2d(x, conv.weight, padding=1)
        x = F.batch_norm(x, norm.running_mean.clone(), norm.running_var.clone(), norm.weight, norm.bias,
                         training=training, eps=norm.eps)
        x = F.relu(x)
    weights = F.linear(x.mean((2, 3)), fusion.scores.weight, fusion.scores.bias).softmax(1)
    teacher, got_weights = fusion(features, logits)
    torch.testing.assert_close(got_weights, weights, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(teacher, torch.einsum("bn,nbk->bk", weights, torch.stack(logits)))


def test_fusion_weights_are_exposed_and_define_the_teacher():
    # USER-REPORTS (OKDDip#7): the user can read the fusion weights (forward returns them, per
    # sample and branch) and set them (the `scores` layer), and the teacher is the documented
    # z_e = sum_a w_a z_a of exactly those weights.
    fusion = FeatureFusionTeacher(3, 3)
    with torch.no_grad():  # scores independent of the features: w = softmax(bias)
        fusion.scores.weight.zero_()
        fusion.scores.bias.copy_(torch.tensor([0.5, 0.3, 0.2]).log())
    features, logits = branch_inputs(3)
    teacher, weights = fusion(features, logits)
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.3, 0.2]]).expand(4, 3))
    torch.testing.assert_close(teacher, 0.5 * logits[0] + 0.3 * logits[1] + 0.2 * logits[2])
    # The weights are a differentiable output: a term on them (here their entropy, to keep
    # them from collapsing onto one branch) trains the fusion block.
    entropy = -(weights * weights.log()).sum(1).mean()
    entropy.backward()
    assert fusion.scores.bias.grad.abs().min() > 0
    # Identical branches give that branch as the teacher, whatever the weights, and a
    # disagreement of 0: the figure to watch alongside the weights.
    teacher, weights = fusion(features, [logits[0]] * 3)
    torch.testing.assert_close(teacher, logits[0])
    assert branch_disagreement([logits[0]] * 3).kl.item() == 0.0


def test_any_spatial_size_and_per_branch_channels():
    fusion = FeatureFusionTeacher([4, 6], 2, num_layers=3, hidden_channels=5, kernel_size=1)
    for size in [(8, 8), (7, 3), (1, 1)]:
        features = [torch.randn(2, 4, *size), torch.randn(2, 6, *size)]
        teacher, weights = fusion(features, [torch.randn(2, 3), torch.randn(2, 3)])
        assert teacher.shape == (2, 3) and weights.shape == (2, 2)
    convs = [m for m in fusion.central if isinstance(m, nn.Conv2d)]
    assert [c.in_channels for c in convs] == [10, 5, 5] and fusion.scores.in_features == 5
    assert fusion.in_channels == (4, 6)
    assert FeatureFusionTeacher(8, 2).central[0].out_channels == 8  # default: one branch's width
    assert len(FeatureFusionTeacher(8, 2, num_layers=0).central) == 0


def test_gradients_reach_central_block_and_branches():
    fusion = FeatureFusionTeacher(3, 2)
    features, logits = branch_inputs()
    teacher, _ = fusion(features, logits)
    F.cross_entropy(teacher, torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion.parameters())
    assert all(f.grad.abs().sum() > 0 for f in features)
    assert all(z.grad.abs().sum() > 0 for z in logits)


@pytest.mark.parametrize("detach_features", [False, True])
@pytest.mark.parametrize("detach_logits", [False, True])
def test_detach_choices(detach_features, detach_logits):
    fusion = FeatureFusionTeacher(3, 2, detach_features=detach_features, detach_logits=detach_logits)
    features, logits = branch_inputs()
    teacher, _ = fusion(features, logits)
    F.cross_entropy(teacher, torch.tensor([0, 1, 2, 3])).backward()
    assert all((f.grad is None) == detach_features for f in features)
    assert all((z.grad is None) == detach_logits for z in logits)
    assert fusion.central[0].weight.grad.abs().sum() > 0  # the fusion block always learns
    assert f"detach_features={detach_features}" in repr(fusion)


def test_gradcheck():
    fusion = FeatureFusionTeacher(2, 2, num_layers=1).double()
    features, logits = branch_inputs(channels=2, batch=3, size=(2, 3), classes=3, dtype=torch.float64)

    def run(f0, f1, z0, z1):
        teacher, weights = fusion([f0, f1], [z0, z1])
        return teacher, weights

    assert torch.autograd.gradcheck(run, (*features, *logits), fast_mode=True)


def test_autocast_bf16_on_cpu():
    fusion = FeatureFusionTeacher(3, 2)
    features, logits = branch_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        teacher, weights = fusion(features, [z.to(torch.bfloat16) for z in logits])
    assert teacher.dtype == weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(1), torch.ones(4))
    teacher.sum().backward()
    assert torch.isfinite(fusion.central[0].weight.grad).all()


def test_fusion_errors():
    fusion = FeatureFusionTeacher(3, 2)
    features, logits = branch_inputs()
    with pytest.raises(ValueError, match=r"`features` must hold one tensor per branch \(2\), but got 3"):
        fusion(features + features[:1], logits)
    with pytest.raises(ValueError, match=r"`features` must hold one tensor per branch \(2\), but got 0"):
        fusion([], logits)
    with pytest.raises(ValueError, match=r"`logits` must hold one tensor per branch \(2\), but got 1"):
        fusion(features, logits[:1])
    with pytest.raises(ValueError, match=r"`features\[1\]` must be a Tensor\[B, 3, H, W\], but got shape \(4, 5, 5, 3\)"):
        fusion([features[0], torch.randn(4, 5, 5, 3)], logits)
    with pytest.raises(ValueError, match=r"`features\[0\]` must be a Tensor\[B, 3, H, W\], but got shape \(4, 3, 5\)"):
        fusion([torch.randn(4, 3, 5), features[1]], logits)
    with pytest.raises(ValueError, match=r"`features\[1\]` must have the batch size and spatial size of `features\[0\]` \(B=4, 5x3\), but got B=4, 3x5"):
        fusion([features[0], torch.randn(4, 3, 3, 5)], logits)
    with pytest.raises(ValueError, match=r"`features\[1\]` must have the batch size .* but got B=2, 5x3"):
        fusion([features[0], torch.randn(2, 3, 5, 3)], logits)
    with pytest.raises(ValueError, match=r"`logits\[1\]` must have the shape of `logits\[0\]` \(4, 6\), but got \(4, 7\)"):
        fusion(features, [logits[0], torch.randn(4, 7)])
    with pytest.raises(ValueError, match=r"`logits` must have the batch size of `features` \(4\), but got 2"):
        fusion(features, [torch.randn(2, 6), torch.randn(2, 6)])
    with pytest.raises(TypeError, match="`features` must be a list or tuple of tensors"):
        fusion(torch.stack(features), logits)
    with pytest.raises(ValueError, match="`num_branches` must be an int >= 2, but got 1"):
        FeatureFusionTeacher(3, 1)
    with pytest.raises(ValueError, match=r"`in_channels` must be an int or a sequence of 2 ints \(one per branch\)"):
        FeatureFusionTeacher([3, 3, 3], 2)
    with pytest.raises(ValueError, match="`kernel_size` must be odd"):
        FeatureFusionTeacher(3, 2, kernel_size=2)


# ---------------------------------------------------------------- branch_disagreement


def test_branch_disagreement_matches_loop():
    logits = [torch.randn(5, 4) * 3 for _ in range(3)]
    kls, differ = [], []
    for a, b in itertools.permutations(range(3), 2):
        p, log_q = logits[a].softmax(1), logits[b].log_softmax(1)
        kls.append((p * (p.log() - log_q)).sum(1).mean())
        differ.append((logits[a].argmax(1) != logits[b].argmax(1)).float().mean())
    result = branch_disagreement(logits)
    torch.testing.assert_close(result.kl, torch.stack(kls).mean())
    torch.testing.assert_close(result.top1, torch.stack(differ).mean())
    same = branch_disagreement([logits[0], logits[0].clone()])
    assert same.kl.item() == 0.0 and same.top1.item() == 0.0
    with pytest.raises(ValueError, match="`logits` must hold at least 2 branches, but got 1"):
        branch_disagreement(logits[:1])


# ---------------------------------------------------------------- online_distillation_loss


def test_online_loss_parts_match_hand_computation():
    branches = [torch.randn(6, 5, requires_grad=True) for _ in range(3)]
    teacher = torch.randn(6, 5, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    attention = torch.tensor(0.7, requires_grad=True)
    parts = online_distillation_loss(branches, teacher, targets, 3.0, theta=0.5, beta=2.0, attention_loss=attention)
    ce = torch.stack([F.cross_entropy(z, targets) for z in branches])
    kd = torch.stack([kd_loss(z, teacher, 3.0, teacher_kind="logits") for z in branches])
    torch.testing.assert_close(parts.branch_ce, ce)
    torch.testing.assert_close(parts.teacher_ce, F.cross_entropy(teacher, targets))
    torch.testing.assert_close(parts.kd, kd)
    # kd_loss is T^2 * KL(softmax(teacher / T) || softmax(z / T)), by a loop.
    for a, z in enumerate(branches):
        p, log_q = (teacher / 3).softmax(1), (z / 3).log_softmax(1)
        manual = sum(float((p[b] * (p[b].log() - log_q[b])).sum().detach()) for b in range(6)) / 6 * 9
        assert math.isclose(parts.kd[a].item(), manual, rel_tol=1e-5)
    expected_total = ce.sum() + parts.teacher_ce + 0.5 * kd.sum() + 2.0 * 0.7
    torch.testing.assert_close(parts.total, expected_total)
    # The KL terms see a detached teacher; only the teacher's CE trains it.
    parts.kd.sum().backward(retain_graph=True)
    assert teacher.grad is None
    parts.total.backward()
    torch.testing.assert_close(teacher.grad, torch.autograd.grad(F.cross_entropy(teacher, targets), teacher)[0])
    assert attention.grad.item() == 2.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_online_loss_takes_probability_targets(dtype):
    # One-hot rows give the index loss; mixed rows give the mixed cross-entropy
    # lam * CE(a) + (1 - lam) * CE(b), by linearity of the cross-entropy in its target.
    branches = [torch.randn(5, 4, dtype=dtype) for _ in range(2)]
    teacher = torch.randn(5, 4, dtype=dtype)
    labels_a, labels_b = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([1, 1, 0, 2, 3])
    one_hot = F.one_hot(labels_a, 4).to(dtype)
    by_index = online_distillation_loss(branches, teacher, labels_a, theta=0.5)
    by_rows = online_distillation_loss(branches, teacher, one_hot, theta=0.5)
    for name in by_index._fields:
        torch.testing.assert_close(getattr(by_rows, name), getattr(by_index, name))
    lam = torch.tensor([1.0, 0.7, 0.5, 0.2, 0.0], dtype=dtype).unsqueeze(1)
    mixed = lam * one_hot + (1 - lam) * F.one_hot(labels_b, 4).to(dtype)
    parts = online_distillation_loss(branches, teacher, mixed)
    b_side = online_distillation_loss(branches, teacher, labels_b)
    for z, ce in zip(branches + [teacher], list(parts.branch_ce) + [parts.teacher_ce]):
        per_sample = [lam[i, 0] * F.cross_entropy(z[i : i + 1], labels_a[i : i + 1])
                      + (1 - lam[i, 0]) * F.cross_entropy(z[i : i + 1], labels_b[i : i + 1])
                      for i in range(5)]
        torch.testing.assert_close(ce, torch.stack(per_sample).mean())
    torch.testing.assert_close(parts.kd, b_side.kd)  # the KL terms do not read the targets
    assert parts.total.dtype == dtype


def test_online_loss_defaults_and_precision():
    branches = [torch.randn(4, 3, dtype=torch.bfloat16) for _ in range(2)]
    teacher = torch.randn(4, 3, dtype=torch.bfloat16)
    targets = torch.tensor([0, 1, 2, 0])
    parts = online_distillation_loss(branches, teacher, targets)
    assert parts.total.dtype == torch.float32 and parts.attention.item() == 0.0
    full = online_distillation_loss([z.float() for z in branches], teacher.float(), targets)
    torch.testing.assert_close(parts.total, full.total)
    torch.testing.assert_close(parts.total, parts.branch_ce.sum() + parts.teacher_ce + parts.kd.sum())


def test_online_loss_errors():
    branches, teacher, targets = [torch.randn(4, 3)] * 2, torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="`branch_logits` must hold at least one tensor, but got 0"):
        online_distillation_loss([], teacher, targets)
    with pytest.raises(ValueError, match=r"`teacher_logits` must be a Tensor\[B, K\] = \(4, 3\), but got shape \(4, 5\)"):
        online_distillation_loss(branches, torch.randn(4, 5), targets)
    with pytest.raises(ValueError, match=r"`targets` must be a Tensor\[B\] with B = 4, but got shape \(3,\)"):
        online_distillation_loss(branches, teacher, targets[:3])
    with pytest.raises(ValueError, match=r"`targets` must hold indices in \[0, 2\], but got 3"):
        online_distillation_loss(branches, teacher, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"`branch_logits\[1\]` must have the shape of `branch_logits\[0\]` \(4, 3\), but got \(2, 3\)"):
        online_distillation_loss([branches[0], torch.randn(2, 3)], teacher, targets)
    with pytest.raises(ValueError, match=r"`attention_loss` must be a 0-d tensor, but got shape \(2,\)"):
        online_distillation_loss(branches, teacher, targets, attention_loss=torch.ones(2))
    with pytest.raises(ValueError, match=r"`theta` must lie in \[0, inf\), but got -1"):
        online_distillation_loss(branches, teacher, targets, theta=-1.0)
    with pytest.raises(ValueError, match=r"`targets` must be a Tensor\[B\] of class indices or Tensor\[B, K\] = \(4, 3\) of probabilities, but got shape \(4, 2\)"):
        online_distillation_loss(branches, teacher, torch.full((4, 2), 0.5))
    with pytest.raises(ValueError, match=r"`targets` must hold probability rows \(each summing to 1 within 0.001\), but got a row summing to 1.5"):
        online_distillation_loss(branches, teacher, torch.full((4, 3), 0.5))


# ---------------------------------------------------------------- BranchGate (ONE's gate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [2, 3])
def test_gate_is_ones_gate(device, dtype, n):
    # Reference from torch's functional ops, not from the gate's own submodules: global average
    # pooling, the linear layer, BatchNorm over the batch (training mode), ReLU, softmax over
    # the branches, then the weighted sum of the branch logits, by a loop.
    gate = BranchGate(3, n).to(device, dtype)
    shared = torch.randn(6, 3, 5, 4, dtype=dtype, device=device)
    logits = [torch.randn(6, 7, dtype=dtype, device=device) for _ in range(n)]
    teacher, weights = gate(shared, logits)
    pooled = shared.mean((2, 3))
    scores = pooled @ gate.scores.weight.T + gate.scores.bias
    normalised = (scores - scores.mean(0)) / torch.sqrt(scores.var(0, unbiased=False) + 1e-5)
    expected = F.relu(normalised * gate.norm.weight + gate.norm.bias).softmax(1)
    torch.testing.assert_close(weights, expected)
    for b in range(6):
        torch.testing.assert_close(teacher[b], sum(weights[b, a] * logits[a][b] for a in range(n)))
    assert teacher.dtype == weights.dtype == dtype


def test_gate_gradients_reach_gate_shared_features_and_logits():
    gate = BranchGate(3, 2)
    shared = torch.randn(4, 3, 2, 2, requires_grad=True)
    logits = [torch.randn(4, 5, requires_grad=True) for _ in range(2)]
    teacher, _ = gate(shared, logits)
    F.cross_entropy(teacher, torch.tensor([0, 1, 2, 3])).backward()
    for tensor in [shared, *logits, *gate.parameters()]:
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_gate_gradcheck():
    gate = BranchGate(2, 2).double().eval()  # eval: BatchNorm is a fixed affine map
    with torch.no_grad():
        gate.norm.bias.fill_(1.0)  # keep the ReLU away from its kink
    shared = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    logits = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradcheck(lambda s, a, b: gate(s, [a, b])[0], (shared, *logits))


def test_gate_errors_change_nothing():
    gate = BranchGate(3, 2)
    before = {name: value.clone() for name, value in gate.state_dict().items()}
    logits = [torch.randn(4, 5)] * 2
    with pytest.raises(ValueError, match=r"`shared` must be a Tensor\[B, 3, H, W\], but got shape \(4, 2, 2, 2\)"):
        gate(torch.randn(4, 2, 2, 2), logits)
    with pytest.raises(ValueError, match=r"`logits` must have the batch size of `shared` \(5\), but got 4"):
        gate(torch.randn(5, 3, 2, 2), logits)
    with pytest.raises(ValueError, match=r"`logits` must hold one tensor per branch \(2\), but got 1"):
        gate(torch.randn(4, 3, 2, 2), logits[:1])
    with pytest.raises(TypeError, match="`shared` must have a floating-point dtype, but got torch.int64"):
        gate(torch.ones(4, 3, 2, 2, dtype=torch.int64), logits)
    with pytest.raises(ValueError, match="`num_branches` must be an int >= 2, but got 1"):
        BranchGate(3, 1)
    for name, value in gate.state_dict().items():  # BatchNorm statistics untouched
        assert torch.equal(value, before[name]), name


# ---------------------------------------------------------------- a two-branch toy model trains


class Block(nn.Module):
    def __init__(self, channels_in, channels_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut = (
            nn.Sequential()
            if stride == 1 and channels_in == channels_out
            else nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out))
        )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TwoBranchNet(nn.Module):
    """Shared stem, two branches of three residual blocks (8x8 -> 4x4 -> 2x2), one head each."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.branches = nn.ModuleList(
            nn.Sequential(Block(6, 6, 1), Block(6, 8, 2), Block(8, 12, 2)) for _ in range(2)
        )
        self.heads = nn.ModuleList(nn.Linear(12, classes) for _ in range(2))

    def forward(self, x):
        shared = self.stem(x)
        return [head(branch(shared).mean((2, 3))) for branch, head in zip(self.branches, self.heads)]


@pytest.fixture
def one_thread():
    # Tiny convolutions: intra-op threads only add synchronisation, and on a busy 2-core CI
    # machine OpenMP spinning makes this test ~7x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_two_branch_residual_model_trains_with_all_three_losses(one_thread):
    torch.manual_seed(0)
    model = TwoBranchNet()
    fusion = FeatureFusionTeacher(12, 2, num_layers=1)
    at_loss = AttentionTransferLoss(warmup_steps=5)
    optimizer = torch.optim.SGD([*model.parameters(), *fusion.parameters()], lr=0.05, momentum=0.9)
    images, targets = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    names = [[f"branches.{a}.{m}" for m in range(3)] for a in range(2)]
    collector = FeatureCollector(model, names[0] + names[1])
    totals, weights_seen = [], []
    with collector:
        for _ in range(30):
            collector.clear()
            branch_logits = model(images)
            blocks = [[collector[name] for name in branch] for branch in names]
            teacher_logits, weights = fusion([b[-1] for b in blocks], branch_logits)
            attention = sum(at_loss(b) for b in blocks)
            parts = online_distillation_loss(branch_logits, teacher_logits, targets, attention_loss=attention)
            optimizer.zero_grad()
            parts.total.backward()
            optimizer.step()
            totals.append(parts.total.item())
            weights_seen.append(weights.detach())
    assert all(math.isfinite(t) for t in totals)
    assert sum(totals[-3:]) / 3 < 0.5 * sum(totals[:3]) / 3
    assert at_loss.num_steps == 30  # the warm-up advanced once per backward by itself
    assert parts.attention.item() > 0 and parts.kd.sum().item() > 0
    assert not torch.equal(weights_seen[0], weights_seen[-1])  # the fusion block learned
    assert all(p.grad is not None for p in fusion.parameters())
    watch = branch_disagreement(branch_logits)
    assert 0.0 <= watch.top1.item() <= 1.0 and watch.kl.item() >= 0.0


# ---------------------------------------------------------------- dtypes, defaults, construction


def _eval_scores(module, *inputs):
    if isinstance(module, BranchGate):
        (shared,) = inputs
        return F.relu(module.norm(module.scores(module.pool(shared).flatten(1))))
    return module.scores(module.pool(module.central(torch.cat(inputs[0], 1))).flatten(1))


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("module_dtype, logits_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_either_float64_side_makes_the_ensemble_float64(gate, module_dtype, logits_dtype):
    # The softmax and the weighted sum run in float64 when the scores (a float64 module) or the
    # branch logits are float64, whichever it is.
    gen = torch.Generator().manual_seed(4)
    logits = [torch.randn(3, 5, generator=gen, dtype=torch.float64).to(logits_dtype) for _ in range(2)]
    if gate:
        module = BranchGate(4, 2).to(module_dtype).eval()
        inputs = (torch.randn(3, 4, 2, 2, generator=gen, dtype=torch.float64).to(module_dtype),)
    else:
        module = FeatureFusionTeacher(4, 2, num_layers=1).to(module_dtype).eval()
        inputs = ([torch.randn(3, 4, 2, 2, generator=gen, dtype=torch.float64).to(module_dtype) for _ in range(2)],)
    teacher, weights = module(*inputs, logits)
    assert teacher.dtype == weights.dtype == torch.float64
    with torch.no_grad():
        expected_weights = _eval_scores(module, *inputs).double().softmax(1)
    expected = sum(expected_weights[:, a : a + 1] * logits[a].double() for a in range(2))
    torch.testing.assert_close(weights, expected_weights, rtol=1e-15, atol=0.0)
    torch.testing.assert_close(teacher, expected, rtol=1e-14, atol=1e-15)


def test_fusion_block_defaults_and_sizes():
    def convs(module):
        return [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in module.central if isinstance(c, nn.Conv2d)]

    # Defaults: two 3x3 layers, one branch's width sum(in_channels) // n (1 here: never raised to 2).
    assert convs(FeatureFusionTeacher((1, 1), 2)) == [(2, 1, (3, 3), None), (1, 1, (3, 3), None)]
    assert convs(FeatureFusionTeacher((3, 5, 1), 3, num_layers=1)) == [(9, 3, (3, 3), None)]
    assert convs(FeatureFusionTeacher((3, 5, 1), 3, num_layers=1, hidden_channels=7)) == [(9, 7, (3, 3), None)]
    # Any odd kernel keeps H and W (padding kernel_size // 2).
    for kernel in (1, 5, 7):
        fusion = FeatureFusionTeacher(2, 2, num_layers=2, kernel_size=kernel)
        assert fusion.central(torch.randn(2, 4, 3, 5)).shape == (2, 2, 3, 5)


def test_online_loss_defaults_are_t3_theta1_beta1_and_beta_weighs_attention():
    gen = torch.Generator().manual_seed(8)
    branches = [torch.randn(4, 5, generator=gen) * 3 for _ in range(2)]
    teacher = torch.randn(4, 5, generator=gen) * 3
    targets = torch.tensor([0, 4, 2, 1])
    attention = torch.tensor(0.7)
    ce = sum(F.cross_entropy(z, targets) for z in branches) + F.cross_entropy(teacher, targets)
    kd = sum(kd_loss(z, teacher, 3.0, teacher_kind="logits") for z in branches)
    parts = online_distillation_loss(branches, teacher, targets, attention_loss=attention)
    torch.testing.assert_close(parts.total, ce + kd + 0.7)
    half = online_distillation_loss(branches, teacher, targets, 3.0, 1.0, 0.5, attention_loss=attention)
    torch.testing.assert_close(half.total, ce + kd + 0.35)


@pytest.mark.parametrize("branch_dtype, teacher_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_online_loss_is_float64_when_either_logits_are(branch_dtype, teacher_dtype):
    gen = torch.Generator().manual_seed(9)
    branches = [torch.randn(4, 5, generator=gen, dtype=torch.float64).to(branch_dtype) for _ in range(2)]
    teacher = torch.randn(4, 5, generator=gen, dtype=torch.float64).to(teacher_dtype)
    targets = torch.tensor([0, 4, 2, 1])
    parts = online_distillation_loss(branches, teacher, targets, 2.0)
    full = online_distillation_loss([z.double() for z in branches], teacher.double(), targets, 2.0)
    for got, expected in zip(parts, full):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("target_dtype", [torch.bfloat16, torch.float64])
def test_online_loss_casts_soft_targets_and_attention_to_the_logits_dtype(target_dtype):
    # bf16 or float64 mixed target rows and a float64 attention term with float32 logits:
    # every part is float32, the value of float32 targets and attention.
    gen = torch.Generator().manual_seed(10)
    branches = [torch.randn(4, 3, generator=gen) for _ in range(2)]
    teacher = torch.randn(4, 3, generator=gen)
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.25, 0.0, 0.75], [0.0, 0.0, 1.0]])
    attention = torch.tensor(0.3, dtype=torch.float64)
    parts = online_distillation_loss(branches, teacher, targets.to(target_dtype), attention_loss=attention)
    full = online_distillation_loss(branches, teacher, targets, attention_loss=attention.float())
    for got, expected in zip(parts, full):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected)
