import pytest
import torch

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
