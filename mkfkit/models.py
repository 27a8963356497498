"""Small CIFAR-style residual networks for the demonstrations and tests.

Two models, both built from the same :class:`BasicBlock` (He et al., 2016, CIFAR variant):

* :class:`ResNet`: a stem convolution, ``len(blocks)`` stages of basic blocks and a linear
  classifier. Inside a stage every block keeps the shape of its input and has an identity
  shortcut, so it can be skipped (``y = f(x) + x`` with ``f`` dropped is ``y = x``): these are the
  blocks MKF's depth sub-networks drop. The first block of every stage after the first halves
  the resolution and widens the channels through a 1x1 projection shortcut; it can never be
  skipped. The attribute names follow torchvision (``conv1``, ``bn1``, ``layer1``, ...,
  ``downsample``, ``fc``) so tools written for torchvision ResNets find their way around.
* :class:`MultiBranchResNet`: the KD-ATFF layout. A shared stem and lower stage(s), then
  ``num_branches`` copies of the remaining stages, each with its own classifier. Its forward
  returns every branch's logits and the output of every block of every branch, the inputs of
  :class:`~mkfkit.attention.AttentionTransferLoss` and
  :class:`~mkfkit.fusion.FeatureFusionTeacher`.

Both work for any input of at least ``2 ** (len(blocks) - 1)`` pixels per side (8x8 digits,
28x28 Fashion-MNIST, 32x32 CIFAR): the classifier sits behind a global average pool.
"""

from __future__ import annotations

from typing import List, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from mkfkit._checks import check_positive_int

__all__ = ["BasicBlock", "ResNet", "MultiBranchResNet", "BranchOutput"]


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))`` with two 3x3 convolutions.

    The shortcut is the identity when the block keeps the shape (``downsample is None``), else a
    strided 1x1 convolution followed by batch norm.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: stride of the first convolution (2 halves the resolution).

    Shape:
        Tensor[B, in_channels, H, W] -> Tensor[B, out_channels, ceil(H / stride), ceil(W / stride)]
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


def _stage(in_channels: int, out_channels: int, num_blocks: int, stride: int) -> nn.Sequential:
    """One stage: a (possibly downsampling) first block, then identity-shortcut blocks."""
    blocks = [BasicBlock(in_channels, out_channels, stride)]
    blocks += [BasicBlock(out_channels, out_channels) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def _check_architecture(
    num_classes: int, in_channels: int, blocks: Sequence[int], widths: Sequence[int]
) -> None:
    check_positive_int(num_classes, "num_classes")
    check_positive_int(in_channels, "in_channels")
    if len(blocks) != len(widths) or len(blocks) == 0:
        raise ValueError(
            "`blocks` and `widths` must be non-empty and of equal length (one entry per stage), "
            f"but got {len(blocks)} and {len(widths)} entries"
        )
    for i, (num_blocks, width) in enumerate(zip(blocks, widths)):
        check_positive_int(num_blocks, f"blocks[{i}]")
        check_positive_int(width, f"widths[{i}]")


def _add_stem(model: nn.Module, in_channels: int, width: int) -> None:
    """The 3x3 convolution, BatchNorm and ReLU before the first stage (torchvision's names)."""
    model.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.relu = nn.ReLU(inplace=True)


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class ResNet(nn.Module):
    """A CIFAR-style residual network (ResNet-20 with the defaults ``blocks=(3, 3, 3)``).

    Stage ``i`` has ``blocks[i]`` basic blocks of ``widths[i]`` channels; every stage after the
    first starts at half the resolution. Depth (counting convolutions and the classifier) is
    ``2 * sum(blocks) + 2``.

    Args:
        num_classes: outputs of the classifier.
        in_channels: channels of the input images (1 for grey-scale, 3 for RGB).
        blocks: basic blocks per stage.
        widths: channels per stage.

    Shape:
        Tensor[B, in_channels, H, W] -> Tensor[B, num_classes]

    Example:
        >>> model = ResNet(num_classes=10, in_channels=1, blocks=(2, 2), widths=(8, 16))
        >>> model(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        blocks: Sequence[int] = (3, 3, 3),
        widths: Sequence[int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        _check_architecture(num_classes, in_channels, blocks, widths)
        _add_stem(self, in_channels, widths[0])
        channels = widths[0]
        for i, (num_blocks, width) in enumerate(zip(blocks, widths)):
            stage = _stage(channels, width, num_blocks, stride=1 if i == 0 else 2)
            self.add_module(f"layer{i + 1}", stage)
            channels = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.num_stages = len(blocks)
        _init_weights(self)

    def layers(self) -> List[nn.Sequential]:
        """The stages in order (``layer1``, ``layer2``, ...)."""
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for stage in self.layers():
            x = stage(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class BranchOutput(NamedTuple):
    """What :class:`MultiBranchResNet` returns.

    Attributes:
        logits: one Tensor[B, num_classes] per branch.
        features: per branch, the output Tensor[B, C_m, H_m, W_m] of each of its blocks in
            order; ``features[a][-1]`` is branch ``a``'s last-block feature map.
        shared: the output Tensor[B, C, H, W] of the shared layers (the stem and the shared
            stages), which every branch starts from: what ONE's gate
            (:class:`~mkfkit.fusion.BranchGate`) weighs the branches by.
    """

    logits: List[Tensor]
    features: List[List[Tensor]]
    shared: Tensor


class MultiBranchResNet(nn.Module):
    """The KD-ATFF network: shared lower stages, then ``num_branches`` independent upper stages.

    The stem and the first ``shared_stages`` stages are shared; each branch owns a copy of the
    remaining stages and a classifier, so every branch on its own is a :class:`ResNet` with the
    same ``blocks`` and ``widths``.

    Args:
        num_classes: outputs of each branch's classifier.
        in_channels: channels of the input images.
        blocks: basic blocks per stage.
        widths: channels per stage.
        num_branches: number of branches (the paper uses 2).
        shared_stages: how many of the lower stages the branches share (at least 0, fewer
            than ``len(blocks)``); the default shares all but the last.

    Shape:
        Tensor[B, in_channels, H, W] -> :class:`BranchOutput`

    Example:
        >>> model = MultiBranchResNet(10, 1, blocks=(1, 2), widths=(8, 16))
        >>> out = model(torch.randn(4, 1, 8, 8))
        >>> len(out.logits), out.logits[0].shape, out.features[1][-1].shape
        (2, torch.Size([4, 10]), torch.Size([4, 16, 4, 4]))
        >>> out.shared.shape[1] == model.shared_channels  # what ONE's gate weighs by
        True
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        blocks: Sequence[int] = (3, 3, 3),
        widths: Sequence[int] = (16, 32, 64),
        num_branches: int = 2,
        shared_stages: int | None = None,
    ) -> None:
        super().__init__()
        _check_architecture(num_classes, in_channels, blocks, widths)
        check_positive_int(num_branches, "num_branches")
        if shared_stages is None:
            shared_stages = len(blocks) - 1
        shared_stages = check_positive_int(shared_stages, "shared_stages", minimum=0)
        if shared_stages >= len(blocks):
            raise ValueError(
                f"`shared_stages` must be an int in [0, {len(blocks) - 1}], "
                f"but got {shared_stages!r}"
            )
        _add_stem(self, in_channels, widths[0])
        shared = []
        channels = widths[0]
        for i in range(shared_stages):
            shared.append(_stage(channels, widths[i], blocks[i], stride=1 if i == 0 else 2))
            channels = widths[i]
        self.shared = nn.Sequential(*shared)
        self.branches = nn.ModuleList()
        for _ in range(num_branches):
            branch = []
            branch_channels = channels
            for i in range(shared_stages, len(blocks)):
                branch += list(_stage(branch_channels, widths[i], blocks[i], 1 if i == 0 else 2))
                branch_channels = widths[i]
            self.branches.append(nn.Sequential(*branch))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fcs = nn.ModuleList(nn.Linear(widths[-1], num_classes) for _ in range(num_branches))
        self.num_branches = num_branches
        self.feature_channels = widths[-1]
        self.shared_channels = channels
        self.num_classes = num_classes
        self.architecture = (num_classes, in_channels, tuple(blocks), tuple(widths))
        self.shared_stages = shared_stages
        _init_weights(self)

    def forward(self, x: Tensor) -> BranchOutput:
        shared = self.shared(self.relu(self.bn1(self.conv1(x))))
        logits, features = [], []
        for branch, fc in zip(self.branches, self.fcs):
            block_outputs = []
            out = shared
            for block in branch:
                out = block(out)
                block_outputs.append(out)
            features.append(block_outputs)
            logits.append(fc(torch.flatten(self.avgpool(out), 1)))
        return BranchOutput(logits, features, shared)

    def branch(self, index: int) -> ResNet:
        """Branch ``index`` on its own, as the :class:`ResNet` it is: what is deployed after
        online distillation.

        The result is a copy (the shared layers, the branch's own stages and its classifier,
        parameters and BatchNorm statistics alike) on this model's device and dtype, in this
        model's training mode; ``branch(a)(x)`` equals ``self(x).logits[a]``. Later training of
        either does not change the other, and the global random state is left as it was.

        Example:
            >>> model = MultiBranchResNet(10, 1, blocks=(1, 2), widths=(8, 16)).eval()
            >>> x = torch.randn(4, 1, 8, 8)
            >>> torch.allclose(model.branch(1)(x), model(x).logits[1])
            True
        """
        index = check_positive_int(index, "index", minimum=0)
        if index >= self.num_branches:
            raise ValueError(
                f"`index` must be an int in [0, {self.num_branches - 1}], but got {index}"
            )
        num_classes, in_channels, blocks, widths = self.architecture
        with torch.random.fork_rng(devices=[]):  # its initial weights are overwritten below
            single = ResNet(num_classes, in_channels, blocks, widths)
        # Where each of the branch's blocks sits in the single network: (stage, block).
        places = [(stage, block) for stage in range(self.shared_stages, len(blocks))
                  for block in range(blocks[stage])]
        renamed = {}
        for name, value in self.state_dict().items():
            head, _, rest = name.partition(".")
            if head in ("conv1", "bn1"):
                renamed[name] = value
            elif head == "shared":
                stage, _, rest = rest.partition(".")
                renamed[f"layer{int(stage) + 1}.{rest}"] = value
            elif head in ("branches", "fcs"):
                owner, _, rest = rest.partition(".")
                if int(owner) != index:
                    continue
                if head == "fcs":
                    renamed[f"fc.{rest}"] = value
                else:
                    position, _, rest = rest.partition(".")
                    stage, block = places[int(position)]
                    renamed[f"layer{stage + 1}.{block}.{rest}"] = value
        parameter = self.conv1.weight
        single = single.to(device=parameter.device, dtype=parameter.dtype)
        single.load_state_dict(renamed)  # strict: every tensor of the single network is set
        return single.train(self.training)
