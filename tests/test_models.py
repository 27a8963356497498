import math

import pytest
import torch
import torch.nn.functional as F

from mkfkit.models import BasicBlock, BranchOutput, MultiBranchResNet, ResNet


@pytest.mark.parametrize("size, in_channels", [(8, 1), (28, 1), (32, 3)])
def test_resnet_shapes(device, size, in_channels):
    model = ResNet(num_classes=7, in_channels=in_channels, blocks=(2, 1, 2), widths=(4, 8, 16))
    model = model.to(device)
    assert model(torch.randn(3, in_channels, size, size, device=device)).shape == (3, 7)


def test_resnet_gradients_reach_every_parameter():
    model = ResNet(num_classes=5, in_channels=1, blocks=(2, 2), widths=(4, 8))
    model(torch.randn(4, 1, 8, 8)).logsumexp(1).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_resnet_identity_blocks_are_exactly_the_shape_keeping_ones():
    model = ResNet(num_classes=5, in_channels=3, blocks=(3, 2, 2), widths=(4, 8, 16))
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    identity = [b.downsample is None for b in blocks]
    # stage 1 keeps the stem's width: all identity; later stages start with a projection.
    assert identity == [True, True, True, False, True, False, True]
    x = torch.randn(2, 4, 8, 8)
    assert blocks[0](x).shape == x.shape


def test_resnet_float64_gradcheck_of_a_block():
    block = BasicBlock(2, 2).double().eval()  # eval: BN uses running stats, a smooth function
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    # ReLU kinks are measure-zero; a random input avoids them.
    assert torch.autograd.gradcheck(block, (x,))


def test_multibranch_output_structure(device):
    model = MultiBranchResNet(6, 1, blocks=(1, 2, 3), widths=(4, 8, 16), num_branches=3).to(device)
    out = model(torch.randn(5, 1, 28, 28, device=device))
    assert isinstance(out, BranchOutput)
    assert len(out.logits) == len(out.features) == 3
    for logits, features in zip(out.logits, out.features):
        assert logits.shape == (5, 6)
        assert [tuple(f.shape) for f in features] == [(5, 16, 7, 7)] * 3
    assert model.feature_channels == 16


def test_multibranch_branches_are_independent_but_share_lower_layers():
    model = MultiBranchResNet(4, 1, blocks=(1, 2), widths=(4, 8))
    out = model(torch.randn(3, 1, 8, 8))
    out.logits[0].sum().backward()
    assert model.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in model.branches[0].parameters())
    assert all(p.grad is None for p in model.branches[1].parameters())
    assert all(p.grad is None for p in model.fcs[1].parameters())


def test_multibranch_without_shared_stages_copies_the_whole_network():
    model = MultiBranchResNet(3, 1, blocks=(1, 1), widths=(4, 8), shared_stages=0)
    out = model(torch.randn(2, 1, 8, 8))
    assert [tuple(f.shape) for f in out.features[0]] == [(2, 4, 8, 8), (2, 8, 4, 4)]
    assert len(model.shared) == 0


@pytest.mark.parametrize("shared_stages", [0, 1, 2])
@pytest.mark.parametrize("training", [True, False])
def test_branch_alone_is_the_resnet_it_computes(device, shared_stages, training):
    model = MultiBranchResNet(5, 2, blocks=(1, 2, 2), widths=(4, 6, 8), num_branches=3,
                              shared_stages=shared_stages).to(device)
    with torch.no_grad():  # BatchNorm statistics that differ between branches
        for buffer_name, buffer in model.named_buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    model.train(training)
    x = torch.randn(4, 2, 12, 12, device=device)
    out = model(x)
    assert out.shared.shape[1] == model.shared_channels
    for index in range(3):
        single = model.branch(index)
        assert isinstance(single, ResNet) and single.training == training
        assert next(single.parameters()).device == x.device
        torch.testing.assert_close(single(x), out.logits[index], rtol=0, atol=0)
        # The architecture of the baseline network: what is deployed costs what a ResNet costs.
        reference = ResNet(5, 2, blocks=(1, 2, 2), widths=(4, 6, 8))
        assert [p.shape for p in single.parameters()] == [p.shape for p in reference.parameters()]


def test_branch_is_a_copy_and_leaves_the_random_state():
    model = MultiBranchResNet(3, 1, blocks=(1, 1), widths=(4, 8))
    state = torch.get_rng_state()
    single = model.branch(1)
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():
        single.fc.weight.add_(1.0)
    assert not torch.equal(single.fc.weight, model.fcs[1].weight)
    assert model.branch(1).fc.weight.data_ptr() != model.fcs[1].weight.data_ptr()


def test_branch_index_errors():
    model = MultiBranchResNet(3, 1, blocks=(1, 1), widths=(4, 8))
    with pytest.raises(ValueError, match=r"`index` must be an int in \[0, 1\], but got 2"):
        model.branch(2)
    with pytest.raises(ValueError, match=r"`index` must be an int >= 0, but got -1"):
        model.branch(-1)
    with pytest.raises(TypeError, match="`index` must be an int"):
        model.branch(0.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="`blocks` and `widths` must be non-empty and of equal"):
        ResNet(blocks=(1, 1), widths=(4,))
    with pytest.raises(ValueError, match=r"`blocks\[1\]` must be an int >= 1, but got 0"):
        ResNet(blocks=(1, 0), widths=(4, 8))
    with pytest.raises(ValueError, match=r"`shared_stages` must be an int in \[0, 1\], but got 2"):
        MultiBranchResNet(blocks=(1, 1), widths=(4, 8), shared_stages=2)
    with pytest.raises(TypeError, match="`num_classes` must be an int"):
        ResNet(num_classes=2.0)


# --------------------------------------------------------------------------------------------
# The architecture against a written-out reference (torchvision's names, He et al.'s block)
# --------------------------------------------------------------------------------------------


def norm(name, c):
    return {f"{name}.weight": (c,), f"{name}.bias": (c,), f"{name}.running_mean": (c,),
            f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ()}


def block_shapes(prefix, cin, cout, stride):
    """{state_dict key: shape} of a basic block: 3x3 convolutions without bias, BatchNorms, and a
    1x1 projection (convolution without bias, BatchNorm) when the shape changes."""
    shapes = {f"{prefix}conv1.weight": (cout, cin, 3, 3), **norm(f"{prefix}bn1", cout),
              f"{prefix}conv2.weight": (cout, cout, 3, 3), **norm(f"{prefix}bn2", cout)}
    if stride != 1 or cin != cout:
        shapes.update({f"{prefix}downsample.0.weight": (cout, cin, 1, 1),
                       **norm(f"{prefix}downsample.1", cout)})
    return shapes


def reference_block(state, prefix, x, stride):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)) from the tensors alone (eval mode)."""
    def bn(h, name):
        return F.batch_norm(h, state[f"{name}.running_mean"], state[f"{name}.running_var"],
                            state[f"{name}.weight"], state[f"{name}.bias"], False, 0.0, 1e-5)

    h = F.relu(bn(F.conv2d(x, state[f"{prefix}conv1.weight"], stride=stride, padding=1), f"{prefix}bn1"))
    h = bn(F.conv2d(h, state[f"{prefix}conv2.weight"], padding=1), f"{prefix}bn2")
    if f"{prefix}downsample.0.weight" in state:
        x = bn(F.conv2d(x, state[f"{prefix}downsample.0.weight"], stride=stride), f"{prefix}downsample.1")
    return F.relu(h + x)


def randomise_norms(model):
    """BatchNorm statistics and affine parameters away from their initial 0 and 1."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                for tensor in (module.weight, module.bias, module.running_mean, module.running_var):
                    tensor.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("cin, cout, stride", [(4, 4, 1), (4, 6, 1), (4, 4, 2), (4, 6, 2)])
def test_basic_block_is_the_written_out_block(cin, cout, stride):
    torch.manual_seed(0)
    block = randomise_norms(BasicBlock(cin, cout, stride))
    state = block.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == block_shapes("", cin, cout, stride)
    assert block.stride == stride  # torchvision's attribute, read by is_residual_block
    x = torch.randn(2, cin, 7, 7, dtype=torch.float32)
    with torch.no_grad():
        out = block(x)
        torch.testing.assert_close(out, reference_block(state, "", x, stride))
    assert out.shape == (2, cout, math.ceil(7 / stride), math.ceil(7 / stride))


def test_resnet_is_the_written_out_network():
    torch.manual_seed(0)
    model = randomise_norms(ResNet(num_classes=5, in_channels=2, blocks=(2, 1, 2), widths=(4, 6, 8)))
    state = model.state_dict()
    expected = {"conv1.weight": (4, 2, 3, 3), **norm("bn1", 4)}  # stem: 3x3, no bias
    cin = 4
    for stage, (n, width) in enumerate(zip((2, 1, 2), (4, 6, 8))):
        for b in range(n):
            stride = 2 if stage and b == 0 else 1
            expected.update(block_shapes(f"layer{stage + 1}.{b}.", cin, width, stride))
            cin = width
    expected.update({"fc.weight": (5, 8), "fc.bias": (5,)})
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    x = torch.randn(3, 2, 9, 9)
    with torch.no_grad():
        h = F.batch_norm(F.conv2d(x, state["conv1.weight"], padding=1), state["bn1.running_mean"],
                         state["bn1.running_var"], state["bn1.weight"], state["bn1.bias"], False)
        h = F.relu(h)
        for stage, n in enumerate((2, 1, 2)):
            for b in range(n):
                h = reference_block(state, f"layer{stage + 1}.{b}.", h, 2 if stage and b == 0 else 1)
        logits = F.linear(h.mean((2, 3)), state["fc.weight"], state["fc.bias"])
        torch.testing.assert_close(model(x), logits)


def test_convolutions_start_from_he_fan_out_init():
    # kaiming_normal_(mode="fan_out", nonlinearity="relu"): std sqrt(2 / (out * kh * kw)).
    # With 576 or more weights per convolution the sample std lies within 3 % (one standard
    # error, 1 / sqrt(2 n)) of it; 12 % is four standard errors, and fan_in would be off by a
    # factor sqrt(2) or more for every convolution that changes the width (here 1 -> 64 -> 128).
    torch.manual_seed(0)
    model = ResNet(num_classes=3, in_channels=1, blocks=(1, 1), widths=(64, 128))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 6
    for conv in convs:
        out, _, kh, kw = conv.weight.shape
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (out * kh * kw)), rel=0.12)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and not bn.bias.any()


def test_default_arguments():
    model = ResNet()  # ResNet-20 for 10 classes of RGB images
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 10)
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == 9
    multi = MultiBranchResNet()
    out = multi(torch.randn(1, 3, 8, 8))
    assert len(out.logits) == 2 and out.logits[0].shape == (1, 10) and multi.num_classes == 10
    assert MultiBranchResNet(6, 1, blocks=(1, 1), widths=(4, 8)).num_classes == 6


def test_branch_keeps_the_dtype_and_the_device():
    model = MultiBranchResNet(3, 1, blocks=(1, 1), widths=(4, 8)).double().eval()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    single = model.branch(1)
    assert next(single.parameters()).dtype == torch.float64
    torch.testing.assert_close(single(x), model(x).logits[1], rtol=0, atol=0)
    on_meta = MultiBranchResNet(3, 1, blocks=(1, 1), widths=(4, 8)).to("meta").branch(0)
    assert all(t.device.type == "meta" for t in on_meta.state_dict().values())
