r"""Attention maps and attention transfer (AT), including KD-ATFF's CL module.

A block's feature map :math:`F \in \mathbb{R}^{B \times C \times H \times W}` becomes a spatial
attention map (Zagoruyko & Komodakis, "Paying More Attention to Attention", 2017)

.. math::
    Q = \sum_{c=1}^{C} |F_c|^p, \qquad \alpha = \frac{\mathrm{vec}(Q)}{\lVert \mathrm{vec}(Q) \rVert_2},

and two maps are compared by the L2 distance :math:`\lVert \alpha_x - \alpha_y \rVert_2`
(KD-ATFF eq. 7 and the AT paper; the AT *code* uses a different scale, see
:func:`attention_transfer_loss`).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mkfkit._checks import (
    check_choice,
    check_floating,
    check_image_dims,
    check_in_range,
    check_number,
    check_positive_int,
    check_same_device,
    check_shape,
    check_state_keys,
    check_tensor_list,
)
from mkfkit._dtypes import compute_dtype
from mkfkit.distill import batch_mean

__all__ = ["attention_map", "attention_transfer_loss", "AttentionTransferLoss"]

RESIZES = ("pool", "interpolate", "none")
MODES = ("mutual", "deep_teaches_shallow", "shallow_teaches_deep")
REDUCTIONS = ("mean", "sum")
DISTANCES = ("l2", "mean_squared")
_EPS = 1e-12


def _check_feature_map(features: Tensor, name: str) -> Tensor:
    check_floating(features, name)
    check_shape(features, name, (None, None, None, None), "Tensor[B, C, H, W]")
    check_image_dims(features, name)
    return features


def _check_feature_list(features: Iterable[Tensor], name: str, minimum: int) -> list[Tensor]:
    checked = check_tensor_list(
        features, name, "Tensor[B, C, H, W]", 4, item="feature map", minimum=minimum, same="batch", any_iterable=True
    )
    for index, feature in enumerate(checked):
        check_image_dims(feature, f"{name}[{index}]")
    return checked


def _check_p(p: float) -> float:
    p = check_number(p, "p")
    check_in_range(p, "p", 1.0, float("inf"), high_open=True)
    return p


def _energy(features: Tensor, p: float, dtype: torch.dtype) -> Tensor:
    """Tensor[B, H, W]: the channel sum of |F|^p, before normalisation."""
    features = features.to(dtype)
    if p % 2 != 0:  # an even power needs no abs: one pass less over the largest tensor
        features = features.abs()
    return features.pow(p).sum(dim=1)


def _normalise(energy: Tensor) -> Tensor:
    """Tensor[B, H, W] -> Tensor[B, H*W] with unit L2 norm per row (zero rows stay zero)."""
    return F.normalize(energy.flatten(1), p=2.0, dim=1, eps=_EPS)


def _common_size(x: Tensor, y: Tensor, resize: str, names: tuple[str, str]) -> tuple[int, int]:
    (hx, wx), (hy, wy) = x.shape[-2:], y.shape[-2:]
    if resize == "pool":
        return min(hx, hy), min(wx, wy)
    if resize == "interpolate":
        return max(hx, hy), max(wx, wy)
    if (hx, wx) != (hy, wy):
        raise ValueError(
            f"`{names[1]}` must have the spatial size of `{names[0]}` ({hx}x{wx}) when "
            f"resize='none', but got {hy}x{wy}; pass resize='pool' or 'interpolate'"
        )
    return hx, wx


def _resize(energy: Tensor, size: tuple[int, int], resize: str) -> Tensor:
    if tuple(energy.shape[-2:]) == size:
        return energy
    if resize == "pool":
        return F.adaptive_avg_pool2d(energy.unsqueeze(1), size).squeeze(1)
    return F.interpolate(energy.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def _distance(x: Tensor, y: Tensor, distance: str) -> Tensor:
    """Tensor[B] distance between two batches of normalised maps Tensor[B, N]."""
    if distance == "l2":
        return torch.linalg.vector_norm(x - y, dim=1)
    return (x - y).pow(2).mean(dim=1)


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    r"""Spatial attention map: channel sum of ``|F|^p``, flattened, L2-normalised per sample.

    .. math::
        \alpha_b = \frac{\mathrm{vec}(Q_b)}{\max(\lVert \mathrm{vec}(Q_b) \rVert_2, \epsilon)},
        \qquad Q_{bhw} = \sum_c |F_{bchw}|^p, \quad \epsilon = 10^{-12}.

    The absolute value matters for signed (pre-activation) features and for odd ``p``. The AT
    paper writes the mean over channels and this is the sum: the two differ by the factor
    ``1/C``, which the normalisation removes (they agree except for maps of norm below
    :math:`\epsilon`, which stay at 0 either way).

    Computed in float32 (float64 for float64 input) with autocast off.

    Args:
        features: Tensor[B, C, H, W] feature map (any layout of ``H`` and ``W``, not only square).
        p: exponent ``>= 1`` (float allowed; AT uses 2). Below 1 the gradient at 0 is infinite.

    Returns:
        Tensor[B, H*W] with unit L2 norm per row (a row of an all-zero map stays 0).

    Example:
        >>> features = torch.tensor([[[[3.0, 0.0]], [[-4.0, 0.0]]]])  # B=1, C=2, H=1, W=2
        >>> attention_map(features)
        tensor([[1., 0.]])
    """
    _check_feature_map(features, "features")
    p = _check_p(p)
    dtype = compute_dtype(features)
    with torch.autocast(features.device.type, enabled=False):
        return _normalise(_energy(features, p, dtype))


def attention_transfer_loss(
    features: Sequence[Tensor],
    teacher_features: Optional[Sequence[Tensor]] = None,
    *,
    p: float = 2.0,
    resize: str = "pool",
    mode: str = "mutual",
    reduction: str = "mean",
    distance: str = "l2",
) -> Tensor:
    r"""Attention-transfer loss over consecutive blocks (KD-ATFF's CL module) or explicit pairs.

    **Pairs.** Called with one list ``features = [F_1, ..., F_M]`` (shallow to deep), the pairs
    are consecutive blocks ``(F_m, F_{m+1})``. Called with ``teacher_features`` too (classic AT
    between two networks), the pairs are ``(features[i], teacher_features[i])``.

    **Resizing.** Each pair's maps are brought to one spatial size before normalising:
    ``"pool"`` (default) adaptive-average-pools the energy :math:`Q` of the larger map to the
    smaller size (per dimension, so 32x16 vs 16x32 both go to 16x16), ``"interpolate"``
    upsamples the smaller bilinearly (``align_corners=False``) to the larger size, ``"none"``
    requires equal sizes. Resizing acts on :math:`Q` before the L2 normalisation, so every
    compared map has unit norm.

    **Direction (which side learns).** With :math:`d(x, y)` the per-sample distance and
    :math:`\mathrm{sg}` stop-gradient, for the pair (shallow :math:`x`, deep :math:`y`):

    * ``"mutual"`` (KD-ATFF): :math:`\tfrac12 [d(x, \mathrm{sg}\,y) + d(\mathrm{sg}\,x, y)]`:
      each block learns from the other's map, the two directions summed and halved. The value
      is :math:`d(x, y)`; each side gets half of its gradient.
    * ``"deep_teaches_shallow"``: :math:`d(x, \mathrm{sg}\,y)` (deeper attention flows back to
      shallower blocks, as the paper's introduction motivates).
    * ``"shallow_teaches_deep"``: :math:`d(\mathrm{sg}\,x, y)`.

    With ``teacher_features`` the teacher map is always detached (the student learns, the
    teacher does not) and ``mode`` is not used.

    **Scale, and porting a weight.** ``distance="l2"`` (default) is the paper's norm
    :math:`d = \lVert \alpha_x - \alpha_y \rVert_2 \in [0, 2]` of unit maps, averaged over the
    batch: a weight written for the KD-ATFF or AT *paper* formula applies as is.
    ``distance="mean_squared"`` is the AT reference code's ``(at(x) - at(y)).pow(2).mean()``:
    :math:`d^2 / (HW)` per sample, about :math:`10^3` times smaller for 32x32 maps. That code's
    ``beta / 2 * sum(at_losses)`` (``beta = 1e3``) is ``loss_weight=beta / 2``,
    ``reduction="sum"``, ``distance="mean_squared"`` here. To convert a weight by hand at a
    typical distance :math:`d`, the gradients match when :math:`w_{l2} = w_{ms} \cdot 2d/(HW)`.

    Pairs are combined by ``reduction``: ``"mean"`` (default, a weight is per pair, independent
    of the number of blocks) or ``"sum"`` (the paper's sum over blocks ``m``).

    Args:
        features: sequence of Tensor[B, C_m, H_m, W_m] (channels and sizes may differ).
        teacher_features: optional sequence of the same length, Tensor[B, C'_i, H'_i, W'_i].
        p: attention exponent ``>= 1``.
        resize: ``"pool"``, ``"interpolate"`` or ``"none"``.
        mode: ``"mutual"``, ``"deep_teaches_shallow"`` or ``"shallow_teaches_deep"``.
        reduction: ``"mean"`` or ``"sum"`` over pairs (always the mean over the batch).
        distance: ``"l2"`` (paper) or ``"mean_squared"`` (AT reference code).

    An empty batch (``B = 0``) gives 0 with a zero gradient (docs/METHOD.md, "Conventions").

    Returns:
        0-d tensor, float32 (float64 for float64 input), computed with autocast off.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> blocks = [torch.randn(4, 16, 32, 32), torch.randn(4, 32, 16, 16), torch.randn(4, 64, 8, 8)]
        >>> loss = attention_transfer_loss(blocks)  # CL loss, mean over the 2 consecutive pairs
        >>> loss.shape, bool(0 <= loss <= 2)
        (torch.Size([]), True)
    """
    p = _check_p(p)
    check_choice(resize, "resize", RESIZES)
    check_choice(mode, "mode", MODES)
    check_choice(reduction, "reduction", REDUCTIONS)
    check_choice(distance, "distance", DISTANCES)
    if teacher_features is None:
        features = _check_feature_list(features, "features", 2)
        pairs = [(m, m + 1) for m in range(len(features) - 1)]
        names = [f"features[{m}]" for m in range(len(features))]
    else:
        features = _check_feature_list(features, "features", 1)
        teacher_features = _check_feature_list(teacher_features, "teacher_features", 1)
        if len(teacher_features) != len(features):
            raise ValueError(
                f"`teacher_features` must hold one map per entry of `features` ({len(features)}), "
                f"but got {len(teacher_features)}"
            )
        if teacher_features[0].shape[0] != features[0].shape[0]:
            raise ValueError(
                f"`teacher_features[0]` must have the batch size of `features[0]` "
                f"({features[0].shape[0]}), but got {teacher_features[0].shape[0]}"
            )
        check_same_device(teacher_features[0], "teacher_features[0]", features[0], "features[0]")
        count = len(features)
        pairs = [(i, count + i) for i in range(count)]
        names = [f"features[{i}]" for i in range(count)] + [f"teacher_features[{i}]" for i in range(count)]
        features = features + [t.detach() for t in teacher_features]
        mode = "deep_teaches_shallow"  # the second map of each pair is the (detached) teacher

    dtype = compute_dtype(*features)
    with torch.autocast(features[0].device.type, enabled=False):
        energies = [_energy(f, p, dtype) for f in features]
        losses = []
        for i, j in pairs:
            size = _common_size(energies[i], energies[j], resize, (names[i], names[j]))
            x = _normalise(_resize(energies[i], size, resize))
            y = _normalise(_resize(energies[j], size, resize))
            if mode == "mutual":
                per_sample = 0.5 * (_distance(x, y.detach(), distance) + _distance(x.detach(), y, distance))
            elif mode == "deep_teaches_shallow":
                per_sample = _distance(x, y.detach(), distance)
            else:
                per_sample = _distance(x.detach(), y, distance)
            losses.append(batch_mean(per_sample))
        total = torch.stack(losses)
        return total.mean() if reduction == "mean" else total.sum()


class AttentionTransferLoss(nn.Module):
    r"""Module twin of :func:`attention_transfer_loss` with a loss weight and a warm-up ramp.

    ``forward`` returns ``loss_weight * ramp * attention_transfer_loss(...)``. The ramp is linear,
    ``min(1, num_steps / warmup_steps)`` (1 when ``warmup_steps == 0``), and starts at 0:
    attention losses can destabilise the first iterations.

    The ramp advances by itself: ``num_steps`` counts the backward passes that went through
    the loss, once per backward however many times the loss was called before it (e.g. once
    per branch), so with one backward per optimiser step it counts training steps. There is
    nothing to call and nothing to forget; evaluation passes and losses that are never
    backpropagated do not count. With gradient accumulation it counts micro-batches: scale
    ``warmup_steps`` by the accumulation factor. The counter is a Python int (no device
    synchronisation) saved exactly in ``state_dict()`` as extra state.

    Args:
        p, resize, mode, reduction, distance: as in :func:`attention_transfer_loss`.
        loss_weight: multiplier of the loss; it refers to the scale chosen by ``distance``
            (named so that model-init loops probing ``module.weight`` do not trip on it).
        warmup_steps: length of the linear ramp in backward passes (0: no ramp).

    Example:
        >>> loss_fn = AttentionTransferLoss(warmup_steps=2)
        >>> blocks = [torch.rand(2, 8, 8, 8, requires_grad=True), torch.rand(2, 16, 4, 4)]
        >>> loss = loss_fn(blocks)
        >>> float(loss)  # ramp = 0 at step 0
        0.0
        >>> loss.backward(); loss_fn.num_steps, loss_fn.ramp
        (1, 0.5)
    """

    def __init__(
        self,
        p: float = 2.0,
        *,
        resize: str = "pool",
        mode: str = "mutual",
        reduction: str = "mean",
        distance: str = "l2",
        loss_weight: float = 1.0,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        self.p = _check_p(p)
        check_choice(resize, "resize", RESIZES)
        check_choice(mode, "mode", MODES)
        check_choice(reduction, "reduction", REDUCTIONS)
        check_choice(distance, "distance", DISTANCES)
        check_in_range(loss_weight, "loss_weight", 0.0, float("inf"), high_open=True)
        self.warmup_steps = check_positive_int(warmup_steps, "warmup_steps", minimum=0)
        self.resize, self.mode, self.reduction, self.distance = resize, mode, reduction, distance
        self.loss_weight = float(loss_weight)
        self.num_steps = 0

    @property
    def ramp(self) -> float:
        """The current warm-up factor in [0, 1]."""
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, self.num_steps / self.warmup_steps)

    def forward(
        self, features: Sequence[Tensor], teacher_features: Optional[Sequence[Tensor]] = None
    ) -> Tensor:
        loss = attention_transfer_loss(
            features,
            teacher_features,
            p=self.p,
            resize=self.resize,
            mode=self.mode,
            reduction=self.reduction,
            distance=self.distance,
        )
        loss = loss * (self.loss_weight * self.ramp)
        if loss.requires_grad:
            loss.register_hook(self._count_backward(self.num_steps))
        return loss

    def _count_backward(self, step: int):
        """A gradient hook that advances the ramp once per backward: every loss made at
        ``step`` carries it, the first one to receive its gradient advances the count and
        the others of the same backward find the count moved on."""

        def hook(grad: Tensor) -> None:
            if self.num_steps == step:
                self.num_steps += 1

        return hook

    def get_extra_state(self) -> dict:
        return {"num_steps": self.num_steps}

    def set_extra_state(self, state: dict) -> None:
        check_state_keys(state, "state", ("num_steps",))
        self.num_steps = check_positive_int(state["num_steps"], "state['num_steps']", minimum=0)

    def extra_repr(self) -> str:
        return (
            f"p={self.p:g}, resize={self.resize!r}, mode={self.mode!r}, reduction={self.reduction!r}, "
            f"distance={self.distance!r}, loss_weight={self.loss_weight:g}, warmup_steps={self.warmup_steps}"
        )
