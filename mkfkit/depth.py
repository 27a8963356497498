"""Depth sub-networks of a residual network: inheritance sampling, block discovery, BN repair.

A residual block computes ``y = act(x + f(x))`` (``act`` often the identity); dropping ``f``
leaves ``y = x`` (up to the activation), so a residual network unrolls into an implicit ensemble
of shallower sub-networks that share its weights. MKF trains such sub-networks in *groups*:

* group 0 is the full network;
* group ``t`` is drawn from group ``t - 1`` by dropping further blocks, so the sub-networks of
  one cycle are strictly nested, ``active_0 > active_1 > ... > active_{T-1}``, and a larger group
  id always means a smaller network;
* after ``T = num_groups`` groups the cycle restarts at the full network.

Drop schedule (the paper says only "exponential in depth"; docs/METHOD.md, "Open points"). Block
``i`` of ``N`` sits at relative depth ``u_i = i / (N - 1)`` (``u = 1`` for ``N = 1``). In every
step of the chain each still-active block is dropped independently with probability

.. math::

    p_i = \\text{drop\\_rate} \\cdot \\text{growth}^{\\,u_i - 1},

so the deepest block is dropped with probability ``drop_rate``, the first with
``drop_rate / growth``, exponential in between. Two repairs keep the chain well defined: if the
Bernoulli draws drop nothing, one active block is dropped, chosen with probability proportional
to ``p_i``; if they drop more than the remaining budget allows, a subset of the drawn blocks of
the allowed size is kept, again chosen proportionally to ``p_i`` (without replacement). The
budget: one sub-network loses at most ``floor(max_drop_fraction * N)`` blocks, and every later
group of the cycle keeps at least one block in reserve to drop, so the nesting is always strict.
The defaults (``drop_rate=0.25``, ``growth=4``, ``max_drop_fraction=0.5``) drop about a sixth of
the blocks per step and never more than half of them, whatever the depth.

Two training loops use it:

*MKF* (one sampled sub-network per step, the group id cycling ``0, 1, ..., T - 1``)::

    sampler = DepthSampler.from_model(model, num_groups=3)
    for images, targets in loader:
        with sampler.sample() as subnet:          # subnet.group: the knowledge group id
            logits = model(images)
            loss = criterion(logits, targets)     # + KD from group subnet.group - 1
            loss.backward()
        optimizer.step(); optimizer.zero_grad()

*Stimulative Training* (the full network every step, then one sampled sub-network distilled
from its detached output; both gradients are summed)::

    for images, targets in loader:
        full_logits = model(images)               # or: with sampler.full(): ...
        loss = F.cross_entropy(full_logits, targets)
        with sampler.sample(include_full=False) as subnet:   # groups 1 .. T-1, nested per cycle
            sub_logits = model(images)
        loss = loss + kd_loss(sub_logits, full_logits, teacher_kind="logits")
        loss.backward()
        optimizer.step(); optimizer.zero_grad()

Hazards and what this module does about them:

* **Skipped blocks are not computed.** Inside the context a dropped block's ``forward`` is
  replaced, on that instance only, by the identity; its class is not touched, no rescaling is
  applied, and on exit (also after an exception) the instance is exactly as before. Forward
  hooks registered on a dropped block still fire, with the identity's output. With activation
  checkpointing, call ``backward`` inside the context: recomputation runs ``forward`` again.
* **Parameters of skipped blocks get no gradient** (``grad`` stays ``None`` after
  ``optimizer.zero_grad()``, the default ``set_to_none=True``), and ``torch.optim`` optimisers
  skip such parameters entirely: no weight decay, no momentum step. With
  ``zero_grad(set_to_none=False)`` or :meth:`SubNetwork.zero_touch` they get *zero* gradients
  instead, and SGD then still moves them by weight decay and by its momentum buffer.
* **DDP.** Every rank must drop the same blocks: without a ``generator`` or ``seed`` the
  sampler draws its seed on rank 0 and broadcasts it once when ``torch.distributed`` is
  initialised (with an explicit ``seed``/``generator`` use the same one on every rank). Then
  either wrap the model with ``DistributedDataParallel(model, find_unused_parameters=True)``
  (the skipped parameters are unused on every rank and keep ``grad = None``), or keep the
  faster ``find_unused_parameters=False`` and add ``loss = subnet.zero_touch(loss)``, which
  gives every skipped parameter a zero gradient (and with it the weight-decay/momentum effect
  above). In the Stimulative-Training loop the full pass uses every parameter, so neither is
  needed there.
* **torch.compile** traces Python control flow once (pytorch#95425), but here the skip decision
  is not inside the traced code: replacing ``forward`` on a block instance fails a Dynamo guard,
  so a compiled model recompiles for a new sub-network and always runs the right depth. Each
  distinct sub-network is a separate graph; past ``torch._dynamo.config.recompile_limit`` Dynamo
  falls back to eager for the whole model. Compile the blocks one by one instead
  (``for block in sampler.blocks: block.compile()``): each then has just two variants.
* **BatchNorm statistics** are shifted by sub-network passes in train mode; re-estimate them
  with :func:`recalibrate_batchnorm` before evaluating the full network.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import operator
from typing import Any, Dict, Iterable, Iterator, Optional, Sequence, Tuple, Type, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mkfkit._checks import (
    check_generator_state,
    check_module,
    check_module_types,
    check_in_range,
    check_positive_int,
    check_state_keys,
    describe,
)
from mkfkit.distributed import shared_seed

__all__ = [
    "DepthSampler",
    "SubNetwork",
    "find_residual_blocks",
    "is_residual_block",
    "recalibrate_batchnorm",
]


# --------------------------------------------------------------------------------------------
# Residual-block discovery
# --------------------------------------------------------------------------------------------

_SHORTCUT_NAMES = ("downsample", "shortcut")
_ATTENTION_NAMES = ("attn", "self_attention")
_NORM_PAIRS = (("norm1", "norm2"), ("ln_1", "ln_2"))


def _is_identity_module(module: object) -> bool:
    return (
        module is None
        or isinstance(module, nn.Identity)
        or (isinstance(module, nn.Sequential) and len(module) == 0)
    )


def _takes_one_input(module: nn.Module) -> bool:
    """Whether ``forward`` has exactly one required positional argument (the identity's input)."""
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in positional and p.default is inspect.Parameter.empty]
    return len(required) == 1


def _is_unit_stride(stride: object) -> bool:
    return all(s == 1 for s in stride) if isinstance(stride, (tuple, list)) else stride == 1


def _is_conv_residual_block(module: nn.Module) -> bool:
    """ResNet-style block with an identity shortcut (see :func:`is_residual_block`)."""
    name = type(module).__name__.lower()
    if "block" not in name and "bottleneck" not in name:
        return False
    if not any(
        hasattr(module, attr) and _is_identity_module(getattr(module, attr))
        for attr in _SHORTCUT_NAMES
    ):
        return False
    if not _is_unit_stride(getattr(module, "stride", 1)):
        return False
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if not (
        convs
        and all(_is_unit_stride(conv.stride) for conv in convs)
        and convs[0].in_channels == convs[-1].out_channels
    ):
        return False
    # A stage or container that holds residual blocks is not itself a block.
    inner = list(module.modules())[1:]
    return not any(_is_conv_residual_block(m) or _is_transformer_block(m) for m in inner)


def _is_transformer_block(module: nn.Module) -> bool:
    """Pre-norm (or post-norm) Transformer block with two residual branches."""
    if isinstance(module, nn.TransformerEncoderLayer):
        return True
    children = dict(module.named_children())
    return (
        any(name in children for name in _ATTENTION_NAMES)
        and "mlp" in children
        and any(a in children and b in children for a, b in _NORM_PAIRS)
    )


# What a residual block's own forward may do to its sum before returning it: an elementwise
# activation leaves "skipping the block is (up to the activation) the identity" intact.
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__iadd__"}
_ACTIVATIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu, torch.relu, torch.relu_,
    "relu", "relu_",
}
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU)


class _OwnCodeTracer(torch.fx.Tracer):
    """Traces only a module's own ``forward``: every submodule call stays one opaque node."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return True


def _adds_its_input(module: nn.Module) -> bool:
    """Whether ``module``'s own forward returns ``act(x + f_1(x) + ... + f_k(x))`` for its input x.

    Read from a symbolic trace of a shallow copy (a forward that counts its calls is not
    counted), with every submodule opaque: a stage calling blocks, a wrapper around a block or
    a projection shortcut ``downsample(x) + f(x)`` do not match. Each added branch ``f_i`` must
    pass through a submodule that has parameters (a learned function of ``x``): ``x + bias``
    or ``x + noise`` are no residual blocks. Modules that cannot be traced do not match.
    """
    try:
        graph = _OwnCodeTracer().trace(copy.copy(module))
    except Exception:  # control flow on values, unsupported calls: not recognisable by behaviour
        return False
    inputs = [node for node in graph.nodes if node.op == "placeholder"]
    outputs = [node for node in graph.nodes if node.op == "output"]
    if len(outputs) != 1 or not inputs or not isinstance(outputs[0].args[0], torch.fx.Node):
        return False
    source, result = inputs[0], outputs[0].args[0]
    if _is_activation(result, module):
        result = result.args[0]
    return _is_add(result) and _is_residual_sum(result, source, module)


def _is_add(node: object) -> bool:
    return isinstance(node, torch.fx.Node) and node.op in ("call_function", "call_method") and (
        node.target in _ADDS
    ) and len(node.args) == 2 and not node.kwargs


def _is_activation(node: torch.fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), _ACTIVATION_MODULES) and len(node.args) == 1
    return node.op in ("call_function", "call_method") and node.target in _ACTIVATIONS


def _is_residual_sum(node: object, source: torch.fx.Node, root: nn.Module) -> bool:
    """``node`` is ``source`` itself, or a sum ``s + f(source)`` whose ``s`` is one again."""
    if node is source:
        return True
    if not _is_add(node):
        return False
    first, second = node.args
    return any(
        _is_residual_sum(shortcut, source, root) and _is_learned_branch(branch, source, root)
        for shortcut, branch in ((first, second), (second, first))
    )


def _is_learned_branch(node: object, source: torch.fx.Node, root: nn.Module) -> bool:
    """``node`` depends on ``source`` through at least one submodule with parameters."""
    if not isinstance(node, torch.fx.Node):
        return False
    learned, depends, stack, seen = False, False, [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        depends |= current is source
        if current.op == "call_module":
            learned |= any(True for _ in root.get_submodule(current.target).parameters())
        stack.extend(current.all_input_nodes)
    return learned and depends


def is_residual_block(module: nn.Module, extra_types: Tuple[Type[nn.Module], ...] = ()) -> bool:
    """Whether ``module`` is a shape-preserving residual block that may be replaced by the identity.

    A module qualifies when its ``forward`` takes exactly one required positional argument (the
    identity returns it) and one of these holds:

    * it is an instance of one of ``extra_types`` (your own block classes);
    * *ResNet block* (torchvision/timm ``BasicBlock``/``Bottleneck``, CIFAR ResNets): the class
      name contains ``Block`` or ``Bottleneck``; an attribute ``downsample`` or ``shortcut`` is the
      identity (``None``, ``nn.Identity`` or an empty ``nn.Sequential``); a ``stride`` attribute,
      if any, is 1; it holds at least one ``nn.Conv2d``, all with stride 1, and the first
      convolution's input channels equal the last one's output channels; it contains no other
      residual block (so a stage is never taken for a block). Downsampling blocks (projection
      shortcut or stride 2) never qualify;
    * *Transformer block*: ``nn.TransformerEncoderLayer``, or a module with an attention child
      (``attn`` or ``self_attention``), an ``mlp`` child and two norms (``norm1``/``norm2`` or
      ``ln_1``/``ln_2``): timm's ViT ``Block`` and ``ResPostBlock``, torchvision's ViT
      ``EncoderBlock``;
    * *by what it does*, for a block of your own under any class name: its own ``forward``
      (read by a ``torch.fx`` trace in which every submodule stays opaque) returns its input
      plus one or more learned branches, ``x + f(x)`` or ``act(x + f(x))`` with ``act`` an
      elementwise activation (ReLU, GELU, SiLU, ...), or a chain ``x + f(x) + g(x + f(x))``
      as in a pre-norm Transformer block. Each branch must pass through a submodule with
      parameters. A projection shortcut (``downsample(x) + f(x)``), a stage or wrapper that
      only calls blocks, ``x + bias``, or a forward that ``torch.fx`` cannot trace (control
      flow on tensor values) do not match; pass such classes in ``extra_types``.

    Args:
        module: the candidate.
        extra_types: further classes to accept as residual blocks.

    Returns:
        ``True`` if the module may be dropped.
    """
    check_module(module, "module")
    check_module_types(extra_types, "extra_types")
    if not _takes_one_input(module):
        return False
    if extra_types and isinstance(module, extra_types):
        return True
    if _is_conv_residual_block(module) or _is_transformer_block(module):
        return True
    # torch's own modules are known; only user code is read for what it computes.
    return not type(module).__module__.startswith("torch.") and _adds_its_input(module)


def find_residual_blocks(model: nn.Module, extra_types: Tuple[Type[nn.Module], ...] = ()) -> list:
    """The residual blocks of ``model`` that a depth sub-network may drop, in registration order.

    Walks the module tree depth-first in registration order (the execution order of
    ``nn.Sequential`` stages) and collects every module for which :func:`is_residual_block`
    holds, without descending into a block once found. Stems, stages, downsampling blocks,
    classifiers and any module without an identity shortcut are never selected.

    Args:
        model: the network.
        extra_types: further block classes to accept (see :func:`is_residual_block`).

    Returns:
        ``list[nn.Module]``: the blocks, each once.

    Example:
        >>> from mkfkit.models import ResNet
        >>> len(find_residual_blocks(ResNet(blocks=(3, 3, 3))))  # 9 blocks, 2 downsample
        7
    """
    check_module(model, "model")
    check_module_types(extra_types, "extra_types")
    found: list = []
    seen: set = set()

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            if is_residual_block(child, extra_types):
                found.append(child)
            else:
                visit(child)

    visit(model)
    return found


# --------------------------------------------------------------------------------------------
# Sub-networks
# --------------------------------------------------------------------------------------------


def _skip(x: Any, *args: Any, **kwargs: Any) -> Any:
    """Forward of a dropped residual block: the identity on its input."""
    return x


@dataclasses.dataclass(frozen=True)
class SubNetwork:
    """One depth sub-network: which blocks run.

    Attributes:
        group: the group id (0 = full network; larger = smaller, nested in the smaller ids of
            the same cycle).
        active: ``tuple[bool, ...]``, one entry per block of the sampler: ``True`` if it runs.
        blocks: the sampler's blocks, in the same order.
    """

    group: int
    active: Tuple[bool, ...]
    blocks: Tuple[nn.Module, ...] = dataclasses.field(repr=False, compare=False)

    @property
    def num_active(self) -> int:
        return sum(self.active)

    @property
    def active_fraction(self) -> float:
        return self.num_active / len(self.active)

    def active_mask(self, device: Union[str, torch.device, None] = None) -> Tensor:
        """``active`` as a bool ``Tensor[N]``."""
        return torch.tensor(self.active, dtype=torch.bool, device=device)

    def skipped_parameters(self) -> list:
        """The trainable parameters of the dropped blocks (each once)."""
        params: Dict[int, nn.Parameter] = {}
        for block, keep in zip(self.blocks, self.active):
            if not keep:
                params.update((id(p), p) for p in block.parameters() if p.requires_grad)
        return list(params.values())

    def zero_touch(self, loss: Tensor) -> Tensor:
        """``loss + 0 * sum(skipped parameters)``: same value, every parameter gets a gradient.

        The skipped parameters then receive *zero* gradients instead of none, which is what
        ``DistributedDataParallel(find_unused_parameters=False)`` needs. Note that optimisers do
        act on zero gradients: SGD applies weight decay and its momentum buffer to them.
        """
        params = self.skipped_parameters()
        if not params:
            return loss
        # Summed in float32 (a float16 parameter's own sum can overflow, and 0 * inf is NaN); the
        # product is 0 before it meets the loss's dtype.
        touch = torch.stack([p.sum(dtype=torch.float32) for p in params]).sum()
        return loss + (0.0 * touch).to(loss.dtype)


class DepthSampler:
    """Inheritance depth sampling: nested sub-networks of a residual network, in cycles.

    Group 0 is the full network; group ``t`` drops further blocks from group ``t - 1``, with a
    drop probability exponential in depth (see the module docstring for the exact schedule);
    after ``num_groups`` groups the cycle restarts. Inside ``with sampler.sample()`` the dropped
    blocks are the identity and cost nothing; outside, the model is exactly the original.

    Every random draw comes from the sampler's own CPU ``torch.Generator``; the position in the
    cycle, the current chain and the generator state are in :meth:`state_dict`.

    Args:
        blocks: the ordered residual blocks that may be dropped (each must compute
            ``act(x + f(x))`` with output shape = input shape), e.g. from
            :func:`find_residual_blocks`. Use :meth:`from_model` to find them.
        num_groups: groups per cycle (``T``; the paper uses 3). Requires
            ``num_groups - 1 <= floor(max_drop_fraction * len(blocks))`` so that every group can
            drop at least one more block.
        drop_rate: per-step drop probability of the deepest block, in (0, 1].
        growth: ratio of the deepest to the first block's drop probability, >= 1 (1 = uniform).
        max_drop_fraction: at most ``floor(max_drop_fraction * len(blocks))`` blocks are dropped
            in any sub-network, in (0, 1].
        generator: a CPU ``torch.Generator`` for the draws (use the same seed on every rank).
        seed: alternatively a seed for a new generator. Without either, a seed is drawn from
            torch's global generator (on rank 0, broadcast to all ranks under
            ``torch.distributed``).

    Example:
        >>> from mkfkit.models import ResNet
        >>> model = ResNet(blocks=(3, 3, 3))
        >>> sampler = DepthSampler.from_model(model, num_groups=3, seed=0)
        >>> x = torch.randn(2, 3, 32, 32)
        >>> for _ in range(3):
        ...     with sampler.sample() as subnet:
        ...         logits = model(x)
        ...     print(subnet.group, subnet.num_active)
        0 7
        1 6
        2 5
    """

    def __init__(
        self,
        blocks: Iterable[nn.Module],
        num_groups: int = 3,
        *,
        drop_rate: float = 0.25,
        growth: float = 4.0,
        max_drop_fraction: float = 0.5,
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
    ) -> None:
        if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
            raise TypeError(
                "`blocks` must be a sequence of residual blocks (DepthSampler.from_model(model) "
                f"finds them), but got a single {type(blocks).__name__}"
            )
        blocks = tuple(blocks)
        if not blocks:
            raise ValueError("`blocks` must hold at least one residual block, but got none")
        for i, block in enumerate(blocks):
            check_module(block, f"blocks[{i}]")
        if len({id(b) for b in blocks}) != len(blocks):
            raise ValueError("`blocks` must not contain the same module twice")
        check_positive_int(num_groups, "num_groups")
        check_in_range(drop_rate, "drop_rate", 0.0, 1.0, low_open=True)
        check_in_range(growth, "growth", 1.0, math.inf, high_open=True)
        check_in_range(max_drop_fraction, "max_drop_fraction", 0.0, 1.0, low_open=True)
        max_dropped = math.floor(max_drop_fraction * len(blocks))
        if num_groups - 1 > max_dropped:
            raise ValueError(
                f"`num_groups` must be at most 1 + floor(max_drop_fraction * len(blocks)) = "
                f"{1 + max_dropped} (each group drops at least one more of the {len(blocks)} "
                f"blocks, and at most {max_dropped} may be dropped), but got {num_groups}"
            )
        if generator is not None and seed is not None:
            raise ValueError("pass either `generator` or `seed`, not both")
        if seed is not None:
            check_positive_int(seed, "seed", minimum=0)
        if generator is None:
            generator = torch.Generator().manual_seed(shared_seed() if seed is None else int(seed))
        elif not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise TypeError(
                f"`generator` must be a CPU torch.Generator, but got {describe(generator)}"
            )

        self.blocks: Tuple[nn.Module, ...] = blocks
        self.num_groups = num_groups
        self.max_dropped = max_dropped
        self.generator = generator
        n = len(blocks)
        depth = torch.arange(n, dtype=torch.float64) / (n - 1) if n > 1 else torch.ones(1).double()
        self.drop_probabilities: Tensor = float(drop_rate) * float(growth) ** (depth - 1)
        self._position = 0
        self._chain: Tuple[bool, ...] = (True,) * n
        self._applied = False

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        num_groups: int = 3,
        *,
        extra_types: Tuple[Type[nn.Module], ...] = (),
        **kwargs: Any,
    ) -> "DepthSampler":
        """A sampler over ``find_residual_blocks(model, extra_types)``; other arguments as above."""
        blocks = find_residual_blocks(model, extra_types)
        if not blocks:
            raise ValueError(
                f"`model` must contain residual blocks with an identity shortcut, but none were "
                f"found in {type(model).__name__}; pass them explicitly or via `extra_types`"
            )
        return cls(blocks, num_groups, **kwargs)

    @property
    def next_group(self) -> int:
        """The group id that the next :meth:`draw` with ``include_full=True`` returns."""
        return self._position

    def draw(self, include_full: bool = True) -> SubNetwork:
        """Advance the cycle and return the next sub-network (without applying it).

        Args:
            include_full: ``False`` skips group 0 (for loops that run the full network anyway):
                when the cycle would return the full network it restarts at group 1 instead.
        """
        if not include_full and self.num_groups == 1:
            raise ValueError("`include_full=False` needs `num_groups` >= 2, but got 1")
        if self._position == 0:
            self._chain = (True,) * len(self.blocks)
            if include_full:
                self._position = 1 % self.num_groups
                return SubNetwork(0, self._chain, self.blocks)
            self._position = 1
        group = self._position
        self._chain = self._drop_more(self._chain, group)
        self._position = (group + 1) % self.num_groups
        return SubNetwork(group, self._chain, self.blocks)

    def _drop_more(self, parent: Tuple[bool, ...], group: int) -> Tuple[bool, ...]:
        """Drop at least one more block of ``parent``, keeping one in reserve per later group."""
        still = torch.tensor([i for i, keep in enumerate(parent) if keep])
        budget = self.max_dropped - (len(parent) - len(still)) - (self.num_groups - 1 - group)
        p = self.drop_probabilities[still]
        hit = torch.rand(len(still), generator=self.generator, dtype=torch.float64) < p
        dropped = still[hit]
        if len(dropped) == 0:
            dropped = still[torch.multinomial(p, 1, generator=self.generator)]
        elif len(dropped) > budget:
            keep = torch.multinomial(p[hit], budget, replacement=False, generator=self.generator)
            dropped = dropped[keep]
        active = list(parent)
        for i in dropped.tolist():
            active[i] = False
        return tuple(active)

    def sample(self, include_full: bool = True) -> "contextlib.AbstractContextManager[SubNetwork]":
        """``apply(draw(include_full))``: run the next sub-network of the cycle in the context.

        Inside another context of this sampler it raises before the cycle advances.
        """
        self._check_not_applied()
        return self.apply(self.draw(include_full))

    def _check_not_applied(self) -> None:
        if self._applied:
            raise RuntimeError(
                "DepthSampler contexts cannot be nested: leave the current sub-network first"
            )

    def full(self) -> "contextlib.AbstractContextManager[SubNetwork]":
        """A context running the full network (group 0), without advancing the cycle."""
        return self.apply(SubNetwork(0, (True,) * len(self.blocks), self.blocks))

    def draw_trailing(self, stages: Sequence[Sequence[nn.Module]]) -> SubNetwork:
        """Stimulative Training's sub-network: per stage, drop a uniform number of trailing blocks.

        For a stage of ``n`` blocks, ``k`` is drawn uniformly from ``{0, ..., n - 1}`` and the last
        ``k`` blocks are dropped; the stage's first block always runs (the full network is one
        of the outcomes). The draw uses the sampler's generator; the cycle does not advance.

        Args:
            stages: the model's stages, each an ordered sequence of blocks (e.g. the
                ``nn.Sequential`` stages of a ResNet). Every block after a stage's first must be
                one of the sampler's blocks.

        Returns:
            A :class:`SubNetwork` with group ``-1`` (it belongs to no group), for :meth:`apply`.
        """
        index = {id(block): i for i, block in enumerate(self.blocks)}
        active = [True] * len(self.blocks)
        for s, stage in enumerate(stages):
            stage = list(stage)
            if not stage:
                raise ValueError(f"`stages[{s}]` must hold at least one block, but got none")
            missing = [i for i, block in enumerate(stage[1:], 1) if id(block) not in index]
            if missing:
                raise ValueError(
                    f"`stages[{s}]` must hold, after its first block, only blocks of this sampler, "
                    f"but its block {missing[0]} is not one of them"
                )
            dropped = int(torch.randint(0, len(stage), (), generator=self.generator))
            for block in stage[len(stage) - dropped :]:
                active[index[id(block)]] = False
        return SubNetwork(-1, tuple(active), self.blocks)

    @contextlib.contextmanager
    def apply(self, subnet: Union[SubNetwork, Sequence[bool], Tensor]) -> Iterator[SubNetwork]:
        """Run a given sub-network inside the context; the cycle does not advance.

        Args:
            subnet: a :class:`SubNetwork` (from :meth:`draw`), or an explicit mask: a sequence of
                bools or a bool ``Tensor[N]``, ``True`` for blocks that run (group reported as -1).

        Yields:
            The :class:`SubNetwork` applied.
        """
        if not isinstance(subnet, SubNetwork):
            subnet = SubNetwork(-1, self._as_mask(subnet), self.blocks)
        elif len(subnet.active) != len(self.blocks) or any(
            a is not b for a, b in zip(subnet.blocks, self.blocks)
        ):
            raise ValueError("`subnet` must come from this sampler (its blocks differ)")
        self._check_not_applied()
        dropped = [block for block, keep in zip(self.blocks, subnet.active) if not keep]
        saved = [block.__dict__.get("forward", _MISSING) for block in dropped]
        self._applied = True
        try:
            for block in dropped:
                block.forward = _skip
            yield subnet
        finally:
            for block, previous in zip(dropped, saved):
                if previous is _MISSING:
                    block.__dict__.pop("forward", None)
                else:
                    block.__dict__["forward"] = previous
            self._applied = False

    def _as_mask(self, active: Union[Sequence[bool], Tensor]) -> Tuple[bool, ...]:
        if isinstance(active, Tensor):
            if active.dtype != torch.bool or active.dim() != 1:
                raise TypeError(
                    f"`subnet` must be a SubNetwork or a bool Tensor[N] with N = "
                    f"{len(self.blocks)}, but got {describe(active)}"
                )
            active = active.tolist()
        mask = tuple(active)
        if len(mask) != len(self.blocks) or not all(isinstance(a, bool) for a in mask):
            raise ValueError(
                f"`subnet` must be a SubNetwork or a mask of {len(self.blocks)} bools, "
                f"but got {describe(active)}"
            )
        return mask

    def state_dict(self) -> Dict[str, Any]:
        """Position in the cycle, the current chain and the generator state."""
        return {
            "position": self._position,
            "chain": torch.tensor(self._chain, dtype=torch.bool),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the whole state is checked before any of it is set.

        The chain must be one this sampler can be at: a bool ``Tensor[N]`` that drops at most
        ``max_dropped`` blocks and, in mid-cycle, as many as the groups drawn so far need and
        few enough that every later group can still drop one more.
        """
        check_state_keys(state, "state", ("position", "chain", "generator"))
        position = check_positive_int(state["position"], "state['position']", minimum=0)
        if position >= self.num_groups:
            raise ValueError(
                f"`state['position']` must lie in [0, {self.num_groups - 1}], but got {position}"
            )
        chain = state["chain"]
        if not isinstance(chain, Tensor) or chain.dtype != torch.bool:
            raise TypeError(f"`state['chain']` must be a bool Tensor[N], but got {describe(chain)}")
        if tuple(chain.shape) != (len(self.blocks),):
            raise ValueError(
                f"`state['chain']` must have {len(self.blocks)} entries (one per block), "
                f"but got shape {tuple(chain.shape)}"
            )
        dropped = int((~chain).sum())
        # After group g the chain has dropped between g and max_dropped - (T - 1 - g) blocks;
        # at position 0 the next draw starts a new cycle from the full network.
        low, high = (0, self.max_dropped) if position == 0 else (
            position - 1, self.max_dropped - (self.num_groups - position)
        )
        if not low <= dropped <= high:
            raise ValueError(
                f"`state['chain']` must drop between {low} and {high} of the {len(self.blocks)} "
                f"blocks at position {position}, but got {dropped} dropped"
            )
        generator_state = check_generator_state(state["generator"], "state['generator']")
        self._position = position
        self._chain = tuple(chain.tolist())
        self.generator.set_state(generator_state)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self.blocks)} blocks, num_groups={self.num_groups}, "
            f"max_dropped={self.max_dropped}, next_group={self._position})"
        )


_MISSING = object()


# --------------------------------------------------------------------------------------------
# BatchNorm recalibration
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    num_samples: Optional[int] = 2000,
    device: Union[str, torch.device, None] = None,
) -> int:
    """Re-estimate every BatchNorm's running statistics from training data.

    Sub-network passes in train mode shift the running statistics away from what the full
    network sees (the Stimulative-Training code re-estimates them from about 2,000 training
    images before each evaluation). This resets them and forwards ``batches`` in train mode under
    ``no_grad``. Batch ``k`` of size ``b_k`` gets weight ``b_k / (b_1 + ... + b_k)``, so the final
    statistics are the sample-weighted averages of the per-batch statistics that train-mode BN
    uses (mean and unbiased variance; with equal batches this is ``momentum=None``'s cumulative
    average). Afterwards every module's ``momentum`` and ``training`` flag are restored. Run it on
    the full network (outside any :class:`DepthSampler` context), or inside one to calibrate that
    sub-network.

    Args:
        model: the network.
        batches: an iterable of image tensors or of tuples/lists whose first item is the images
            (a ``DataLoader`` of the training set, ideally without random augmentation).
        num_samples: use the first ``num_samples`` images (the last batch is cut); ``None`` for all.
            If ``batches`` holds fewer, all of them are used (the return value says how many).
        device: where to move the images; default: the device of the model's first parameter.

    Returns:
        The number of images used.

    Raises:
        ValueError: if ``batches`` yields no image at all (empty batches are skipped). Then, as
            after any error during the passes, the running statistics are put back as they were.

    Example:
        >>> from mkfkit.models import ResNet
        >>> model = ResNet(blocks=(1, 1), widths=(4, 8))
        >>> data = [(torch.randn(8, 3, 8, 8), torch.zeros(8)) for _ in range(4)]
        >>> recalibrate_batchnorm(model, data, num_samples=20)
        20
    """
    check_module(model, "model")
    if num_samples is not None:
        check_positive_int(num_samples, "num_samples")
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    if device is None:
        device = next(model.parameters(), norms[0].running_mean).device
    momenta = {m: m.momentum for m in norms}
    modes = {m: m.training for m in model.modules()}
    # The statistics as they were, to put back if no image arrives or a forward fails.
    saved = {m: [buffer.clone() for buffer in _statistics(m)] for m in norms}
    for m in norms:
        m.reset_running_stats()
    model.train()
    seen = 0
    try:
        for batch in batches:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(images, Tensor):
                raise TypeError(
                    f"`batches` must yield tensors or tuples starting with one, but got "
                    f"{describe(images)}"
                )
            if num_samples is not None:
                images = images[: num_samples - seen]
            size = images.shape[0]
            if size == 0:
                continue
            for m in norms:
                m.momentum = size / (seen + size)
            model(images.to(device))
            seen += size
            if num_samples is not None and seen >= num_samples:
                break
        if seen == 0:
            raise ValueError(
                "`batches` must yield at least one image, but got none (the BatchNorm "
                "statistics were left as they were)"
            )
    except BaseException:
        for m, buffers in saved.items():
            for buffer, value in zip(_statistics(m), buffers):
                buffer.copy_(value)
        raise
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    return seen


def _statistics(norm: _BatchNorm) -> list:
    """The running-statistics buffers of a BatchNorm that recalibration overwrites."""
    return [norm.running_mean, norm.running_var, norm.num_batches_tracked]
