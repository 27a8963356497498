"""Compound Mixup/CutMix that says what it did (MKF, docs/METHOD.md, section 1, step 1).

:class:`CompoundMix` mixes a batch with a random permutation of itself and returns a
:class:`MixedBatch`: the mixed images together with both targets, both dataset indices, the
per-sample weight ``lam``, the partner of each sample, the operation that ran and the CutMix box.
Unmixed batches come back in the same type with ``lam = 1``, so a training loop has one path.
:func:`mixed_cross_entropy` is the matching loss,

.. math::

    \\ell = \\frac{1}{B} \\sum_i \\lambda_i \\, \\mathrm{CE}(z_i, y^a_i)
            + (1 - \\lambda_i) \\, \\mathrm{CE}(z_i, y^b_i).

Conventions:

* ``lam`` is the weight of the sample's own image (side ``a``); its partner (side ``b``)
  gets ``1 - lam``. Mixup: ``x~ = lam * x_a + (1 - lam) * x_b``. CutMix: the box is pasted from
  the partner, and ``lam`` is the fraction of pixels actually kept from ``x_a`` after the box is
  clipped to the image. The same ``lam`` weights the labels: the true kept area, not the sampled
  Beta draw (those differ whenever the box was clipped at the border).
* The mixer never smooths labels; smoothing is an explicit argument of the loss.
* For a teacher target of a mixed image, MKF uses the composite of per-image knowledge,
  ``lam * K[index_a] + (1 - lam) * K[index_b]`` (:meth:`MixedBatch.soft_targets` of per-image
  teacher probabilities gives exactly this). It is not the same as running the teacher on the
  mixed image: a network's response to a mixed input is not the ``lam``-mix of its responses to
  the two clean inputs, which is the very gap the knowledge fraction models.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mkfkit._checks import (
    as_lam,
    check_floating,
    check_generator_state,
    check_image_dims,
    check_in_range,
    check_index,
    check_integer,
    check_positive_int,
    check_same_device,
    check_shape,
    check_state_keys,
    check_tensor,
    describe,
)
from mkfkit._devices import to_device
from mkfkit.distill import batch_mean, check_classes
from mkfkit.distributed import distributed_rank

__all__ = [
    "CompoundMix",
    "MixedBatch",
    "MixedCrossEntropyLoss",
    "cutmix",
    "mixed_cross_entropy",
    "mixup",
    "sample_beta",
    "sample_box",
]

Box = Tuple[int, int, int, int]


class MixedBatch(NamedTuple):
    """A mixed batch and everything needed to know how it was made.

    Attributes:
        images: Tensor[B, C, H, W] mixed images (the input tensor itself when ``op == "none"``).
        targets_a: the sample's own targets, class indices Tensor[B] or probabilities Tensor[B, K].
        targets_b: the partner's targets, ``targets_a[partner]``.
        index_a: Tensor[B] dataset indices of the samples (batch positions if none were given).
        index_b: Tensor[B] dataset indices of the partners, ``index_a[partner]``.
        lam: float32 Tensor[B] on the images' device, weight of side ``a`` (``1`` when unmixed).
        partner: int64 Tensor[B], batch position of each sample's partner (``arange(B)`` when
            unmixed).
        op: ``"none"``, ``"mixup"`` or ``"cutmix"``.
        box: ``(y0, y1, x0, x1)`` of the pasted region (rows ``y0:y1``, columns ``x0:x1``) for
            CutMix, else ``None``.
    """

    images: Tensor
    targets_a: Tensor
    targets_b: Tensor
    index_a: Tensor
    index_b: Tensor
    lam: Tensor
    partner: Tensor
    op: str
    box: Optional[Box]

    def soft_targets(self, num_classes: Optional[int] = None) -> Tensor:
        """Dense mixed targets ``lam * T_a + (1 - lam) * T_b`` as a float32 Tensor[B, K].

        Class indices become one-hot rows over ``num_classes`` classes (required for them);
        probability targets are mixed as given, in float32 (float64 stays float64). Feeding
        per-image teacher probabilities ``K[indices]`` as targets gives MKF's composite target
        ``lam * K[index_a] + (1 - lam) * K[index_b]``.
        """
        target_a, target_b = (
            _dense_targets(t, num_classes, name)
            for t, name in ((self.targets_a, "targets_a"), (self.targets_b, "targets_b"))
        )
        lam = self.lam.to(device=target_a.device, dtype=target_a.dtype).unsqueeze(1)
        return lam * target_a + (1 - lam) * target_b


def _dense_targets(targets: Tensor, num_classes: Optional[int], name: str) -> Tensor:
    if targets.is_floating_point():
        return targets if targets.dtype == torch.float64 else targets.float()
    if num_classes is None:
        raise ValueError(
            f"`num_classes` must be given for class-index targets, but got None ({name} "
            f"has dtype {targets.dtype})"
        )
    num_classes = check_positive_int(num_classes, "num_classes")
    check_index(targets, name, num_classes)
    return F.one_hot(targets.long(), num_classes).float()


# --------------------------------------------------------------------------------------------
# Random draws. Every draw comes from the caller's CPU torch.Generator, so a run is reproducible
# from a seed and resumable from the generator state; the global RNGs are never touched.


def _uniform(generator: torch.Generator) -> float:
    """One float64 draw from (0, 1] (the open lower end keeps ``log`` finite)."""
    return 1.0 - torch.rand((), dtype=torch.float64, generator=generator).item()


def _normal(generator: torch.Generator) -> float:
    return torch.randn((), dtype=torch.float64, generator=generator).item()


def _log_gamma_variate(shape: float, generator: torch.Generator) -> float:
    """``log X`` for ``X ~ Gamma(shape, 1)`` by Marsaglia and Tsang's exact rejection method.

    For ``shape < 1`` it uses ``Gamma(a) = Gamma(a + 1) * U ** (1 / a)``, kept in log space:
    ``U ** (1 / a)`` underflows to 0 for small ``a`` and would turn ``lam`` into 0 / 0.
    """
    boost = 0.0
    if shape < 1.0:
        boost = math.log(_uniform(generator)) / shape
        shape += 1.0
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = _normal(generator)
        v = 1.0 + c * x
        if v <= 0.0:
            continue
        v = v * v * v
        log_u = math.log(_uniform(generator))
        # The squeeze `u < 1 - 0.0331 x^4` only saves a log; the log test alone is exact.
        if log_u < 0.5 * x * x + d * (1.0 - v + math.log(v)):
            return math.log(d) + math.log(v) + boost


def sample_beta(alpha: float, beta: float, generator: torch.Generator) -> float:
    """One draw from Beta(alpha, beta) using only ``generator``.

    ``torch.distributions.Beta`` cannot take a generator, so the draw is built from two Gamma
    variates, ``X / (X + Y)`` with ``X ~ Gamma(alpha)``, ``Y ~ Gamma(beta)`` (exact in
    distribution), evaluated as ``sigmoid(log X - log Y)`` to stay finite for small shapes.

    Args:
        alpha, beta: positive shape parameters.
        generator: a CPU ``torch.Generator``.

    Returns:
        A float in [0, 1].

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> 0.0 <= sample_beta(1.0, 1.0, g) <= 1.0
        True
    """
    check_in_range(alpha, "alpha", 0.0, math.inf, low_open=True, high_open=True)
    check_in_range(beta, "beta", 0.0, math.inf, low_open=True, high_open=True)
    _check_generator(generator)
    log_ratio = _log_gamma_variate(float(alpha), generator) - _log_gamma_variate(
        float(beta), generator
    )
    # sigmoid without overflow for either sign
    if log_ratio >= 0:
        return 1.0 / (1.0 + math.exp(-log_ratio))
    ratio = math.exp(log_ratio)
    return ratio / (1.0 + ratio)


def sample_box(height: int, width: int, lam: float, generator: torch.Generator) -> Box:
    """A CutMix box covering about ``1 - lam`` of an ``height x width`` image, clipped to it.

    The uncut box has sides ``floor(H * sqrt(1 - lam))`` and ``floor(W * sqrt(1 - lam))`` and a
    centre drawn uniformly among the pixels; clipping at the border makes the real pasted area
    smaller than ``1 - lam``, so compute the kept fraction from the returned box
    (``1 - (y1 - y0) * (x1 - x0) / (H * W)``), as :class:`CompoundMix` does.

    Returns:
        ``(y0, y1, x0, x1)`` with ``0 <= y0 <= y1 <= height`` and ``0 <= x0 <= x1 <= width``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y0, y1, x0, x1 = sample_box(32, 32, 0.75, g)
        >>> 0 <= y0 <= y1 <= 32 and 0 <= x0 <= x1 <= 32
        True
    """
    check_positive_int(height, "height")
    check_positive_int(width, "width")
    check_in_range(lam, "lam", 0.0, 1.0)
    _check_generator(generator)
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    centre = torch.randint(0, height * width, (), generator=generator).item()
    cy, cx = divmod(centre, width)
    y0, x0 = cy - cut_h // 2, cx - cut_w // 2
    y1, x1 = y0 + cut_h, x0 + cut_w
    return (
        min(max(y0, 0), height),
        min(max(y1, 0), height),
        min(max(x0, 0), width),
        min(max(x1, 0), width),
    )


def _kept_fraction(box: Box, height: int, width: int) -> float:
    y0, y1, x0, x1 = box
    return 1.0 - (y1 - y0) * (x1 - x0) / (height * width)


def _random_partner(batch: int, generator: torch.Generator) -> Tensor:
    """A random permutation of ``range(batch)`` without fixed points (a single cycle).

    A sample paired with itself would be labelled as mixed although nothing was mixed, and the
    knowledge fraction would then split an unmixed output; a random cycle avoids that while
    each sample's partner stays uniform over the other ``batch - 1`` samples.
    """
    order = torch.randperm(batch, generator=generator)
    partner = torch.empty_like(order)
    partner[order] = order.roll(-1)
    return partner


# --------------------------------------------------------------------------------------------
# Pixel operations.


def _check_images(images: Tensor) -> Tensor:
    check_shape(images, "images", (None, None, None, None), "Tensor[B, C, H, W]")
    check_image_dims(images, "images")
    if not images.is_floating_point():
        raise TypeError(
            f"`images` must have a floating-point dtype (convert uint8 images with "
            f"`.float()` first), but got {images.dtype}"
        )
    return images


def _check_partner(partner: Tensor, images: Tensor) -> Tensor:
    check_index(partner, "partner", images.shape[0], length=images.shape[0])
    check_same_device(partner, "partner", images, "images")
    return partner


def _check_box(box: object, height: int, width: int) -> Box:
    ok = (
        isinstance(box, (tuple, list))
        and len(box) == 4
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in box)
    )
    if ok:
        y0, y1, x0, x1 = box = tuple(int(v) for v in box)
        ok = 0 <= y0 <= y1 <= height and 0 <= x0 <= x1 <= width
    if not ok:
        raise ValueError(
            f"`box` must be 4 ints (y0, y1, x0, x1) with 0 <= y0 <= y1 <= {height} and "
            f"0 <= x0 <= x1 <= {width}, but got {box!r}"
        )
    return tuple(box)  # type: ignore[return-value]


def _mixup_pixels(images: Tensor, partner: Tensor, weight: Union[float, Tensor]) -> Tensor:
    return (images * weight).add_(images.index_select(0, partner) * (1 - weight))


def _cutmix_pixels(images: Tensor, partner: Tensor, box: Box) -> Tensor:
    y0, y1, x0, x1 = box
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images[:, :, y0:y1, x0:x1].index_select(0, partner)
    return mixed


def mixup(images: Tensor, partner: Tensor, lam: Union[float, Tensor]) -> Tensor:
    """Mixup of each image with its partner: ``lam * x[i] + (1 - lam) * x[partner[i]]``.

    Args:
        images: Tensor[B, C, H, W] of a floating dtype; not modified.
        partner: integer Tensor[B] of batch positions, on the images' device.
        lam: a number in [0, 1], or a Tensor[B] of per-sample weights (cast to the images'
            dtype).

    Returns:
        Tensor[B, C, H, W], a new tensor of the images' dtype.

    Example:
        >>> x = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
        >>> mixup(x, torch.tensor([1, 0]), 0.25)[0, 0, 0, 0].item()
        0.75
    """
    _check_images(images)
    _check_partner(partner, images)
    if isinstance(lam, Tensor):
        weight: Union[float, Tensor] = as_lam(lam, images.shape[0], images.device, images.dtype).view(-1, 1, 1, 1)
    else:
        check_in_range(lam, "lam", 0.0, 1.0)
        weight = float(lam)
    return _mixup_pixels(images, partner, weight)


def cutmix(images: Tensor, partner: Tensor, box: Box) -> Tensor:
    """CutMix: paste ``box`` of each partner's image into the image.

    Args:
        images: Tensor[B, C, H, W]; not modified.
        partner: integer Tensor[B] of batch positions, on the images' device.
        box: ``(y0, y1, x0, x1)``: rows ``y0:y1`` and columns ``x0:x1`` come from the partner.

    Returns:
        Tensor[B, C, H, W], a new tensor. The kept fraction of each image is
        ``1 - (y1 - y0) * (x1 - x0) / (H * W)``.

    Example:
        >>> x = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
        >>> cutmix(x, torch.tensor([1, 0]), (0, 2, 0, 2))[0].sum().item()
        4.0
    """
    _check_images(images)
    _check_partner(partner, images)
    return _cutmix_pixels(images, partner, _check_box(box, images.shape[2], images.shape[3]))


# --------------------------------------------------------------------------------------------
# The sampler.


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator, but got {describe(generator)}")
    if generator.device.type != "cpu":
        raise ValueError(
            f"`generator` must be a CPU torch.Generator (the draws are a few numbers per "
            f"batch), but got one on {generator.device}"
        )
    return generator


# Added to the default seed so that the mixer does not replay the stream of another block that
# is seeded from torch.initial_seed() too (equal streams would tie the mixing decisions to, say,
# the depth draws of the same step).
_SEED_OFFSET = 0x6D6B666B6D6978  # "mkfkmix"


class CompoundMix:
    """MKF's compound data mixing: warm-up, then per batch none / Mixup / CutMix.

    Per call, after ``warmup_steps`` calls without mixing: a Bernoulli(``mix_prob``) draw decides
    whether the batch is mixed; if so, CutMix with probability ``switch_prob``, else Mixup, with
    ``lam ~ Beta(alpha, alpha)`` (one draw per batch). Each sample is paired with a partner from a
    random permutation of the batch without fixed points, so any batch size ``B >= 2`` works;
    ``B = 1`` is returned unmixed. CutMix reports (and weights the labels by) the area actually
    kept after the box is clipped.

    The paper warms up for about the first 10% of training, with ``mix_prob = switch_prob = 0.5``;
    pass ``warmup_steps = round(0.1 * total_training_steps)``.

    All draws come from the mixer's own CPU ``torch.Generator``. Without one, it is seeded from
    ``torch.initial_seed()`` (so ``torch.manual_seed`` makes runs repeatable) plus the
    ``torch.distributed`` rank, so ranks draw differently unless ``same_on_all_ranks=True``. A generator passed in is used as given: seed it per rank
    yourself (e.g. ``seed + rank``). :meth:`state_dict` holds the call count and the generator
    state, so a resumed run mixes exactly as an uninterrupted one.

    Args:
        mix_prob: probability that a batch after warm-up is mixed, in [0, 1].
        switch_prob: probability that a mixed batch uses CutMix rather than Mixup, in [0, 1].
        mixup_alpha: Beta parameter of Mixup's ``lam``, > 0.
        cutmix_alpha: Beta parameter of CutMix's sampled ``lam``, > 0.
        warmup_steps: number of first calls that are never mixed, >= 0.
        generator: CPU ``torch.Generator`` for every draw, or ``None`` (see above).
        same_on_all_ranks: with ``generator=None``, draw the same on every rank.

    Call:
        ``mix(images, targets, indices=None) -> MixedBatch``

        * images: Tensor[B, C, H, W] of a floating dtype; never modified.
        * targets: class indices (integer Tensor[B]) or probabilities (floating Tensor[B, K]).
        * indices: optional integer Tensor[B] of dataset indices (default: batch positions).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> mix = CompoundMix(mix_prob=1.0, switch_prob=0.0, generator=g)
        >>> batch = mix(torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,)))
        >>> batch.op, batch.lam.shape, bool((batch.partner != torch.arange(6)).all())
        ('mixup', torch.Size([6]), True)
        >>> loss = mixed_cross_entropy(torch.randn(6, 10), batch)
    """

    def __init__(
        self,
        mix_prob: float = 0.5,
        switch_prob: float = 0.5,
        mixup_alpha: float = 1.0,
        cutmix_alpha: float = 1.0,
        warmup_steps: int = 0,
        generator: Optional[torch.Generator] = None,
        same_on_all_ranks: bool = False,
    ) -> None:
        check_in_range(mix_prob, "mix_prob", 0.0, 1.0)
        check_in_range(switch_prob, "switch_prob", 0.0, 1.0)
        for name, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            check_in_range(alpha, name, 0.0, math.inf, low_open=True, high_open=True)
        check_positive_int(warmup_steps, "warmup_steps", minimum=0)
        self.mix_prob = float(mix_prob)
        self.switch_prob = float(switch_prob)
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.warmup_steps = warmup_steps
        if generator is None:
            rank = 0 if same_on_all_ranks else distributed_rank()
            seed = torch.initial_seed() + _SEED_OFFSET + rank
            generator = torch.Generator().manual_seed(seed % 2**64)
        self.generator = _check_generator(generator)
        self.step = 0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mix_prob={self.mix_prob}, switch_prob={self.switch_prob}, "
            f"mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, "
            f"warmup_steps={self.warmup_steps}, step={self.step})"
        )

    def state_dict(self) -> Dict[str, Any]:
        """Calls so far and the generator state."""
        return {"step": self.step, "generator_state": self.generator.get_state()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the next call mixes as the saved run's next did."""
        check_state_keys(state_dict, "state_dict", ("step", "generator_state"))
        step = check_positive_int(state_dict["step"], "state_dict['step']", minimum=0)
        generator_state = check_generator_state(state_dict["generator_state"], "state_dict['generator_state']")
        self.step = step
        self.generator.set_state(generator_state)

    def __call__(
        self, images: Tensor, targets: Tensor, indices: Optional[Tensor] = None
    ) -> MixedBatch:
        _check_images(images)
        size = images.shape[0]
        _check_targets(targets, size)
        if indices is None:
            indices = torch.arange(size, device=images.device)
        else:
            check_integer(indices, "indices")
            check_shape(indices, "indices", (size,), f"Tensor[B] with B = {size}")

        in_warmup = self.step < self.warmup_steps
        self.step += 1
        if in_warmup or size < 2 or not self._bernoulli(self.mix_prob):
            return MixedBatch(
                images=images,
                targets_a=targets,
                targets_b=targets,
                index_a=indices,
                index_b=indices,
                lam=torch.ones(size, dtype=torch.float32, device=images.device),
                partner=torch.arange(size, device=images.device),
                op="none",
                box=None,
            )

        use_cutmix = self._bernoulli(self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = sample_beta(alpha, alpha, self.generator)
        partner_cpu = _random_partner(size, self.generator)
        partner = to_device(partner_cpu, images.device)

        def partners_of(values: Tensor) -> Tensor:
            # targets and indices may live on another device than the images
            on_device = partner if values.device == partner.device else partner_cpu
            return values.index_select(0, to_device(on_device, values.device))

        box: Optional[Box] = None
        if use_cutmix:
            box = sample_box(images.shape[2], images.shape[3], lam, self.generator)
            lam = _kept_fraction(box, images.shape[2], images.shape[3])
        # Mix the pixels with the float32 value that is reported, not the float64 draw.
        lam = float(torch.tensor(lam, dtype=torch.float32))
        if box is None:
            mixed = _mixup_pixels(images, partner, lam)
        else:
            mixed = _cutmix_pixels(images, partner, box)
        return MixedBatch(
            images=mixed,
            targets_a=targets,
            targets_b=partners_of(targets),
            index_a=indices,
            index_b=partners_of(indices),
            lam=torch.full((size,), lam, dtype=torch.float32, device=images.device),
            partner=partner,
            op="cutmix" if use_cutmix else "mixup",
            box=box,
        )

    def _bernoulli(self, probability: float) -> bool:
        return torch.rand((), dtype=torch.float64, generator=self.generator).item() < probability


def _check_targets(
    targets: Tensor, size: int, name: str = "targets", num_classes: Optional[int] = None
) -> None:
    """Class indices Tensor[B] or probabilities Tensor[B, K] (``K = num_classes`` if given)."""
    check_tensor(targets, name)
    if targets.is_floating_point():
        spec = f"Tensor[B, K] with B = {size}"
        if num_classes is not None:
            spec += f", K = {num_classes}"
        check_shape(targets, name, (size, num_classes), spec)
        check_in_range(targets, name, 0.0, 1.0)
    else:
        check_integer(targets, name)
        check_shape(targets, name, (size,), f"Tensor[B] with B = {size}")


# --------------------------------------------------------------------------------------------
# The loss.


def mixed_cross_entropy(
    logits: Tensor, batch: MixedBatch, label_smoothing: float = 0.0
) -> Tensor:
    """Per-sample mixed cross-entropy, then the mean over the batch.

    .. math::

        \\ell = \\frac{1}{B} \\sum_i \\lambda_i \\, \\mathrm{CE}_\\epsilon(z_i, y^a_i)
                + (1 - \\lambda_i) \\, \\mathrm{CE}_\\epsilon(z_i, y^b_i)

    with ``CE_eps`` the cross-entropy of :func:`torch.nn.functional.cross_entropy` with label
    smoothing ``eps`` (class indices or probability targets). Computed in float32 (float64 stays
    float64), also under autocast.

    Class-index targets must lie in ``[0, K - 1]``. There is no ``ignore_index``: ``-100``
    (``F.cross_entropy``'s default) is refused like any other index out of range, because a
    mixed pair with one ignored side has no well-defined target (drop such samples before
    mixing). An empty batch (``B = 0``) gives 0 with a zero gradient (docs/METHOD.md,
    "Conventions").

    Args:
        logits: Tensor[B, K] of a floating dtype, ``K >= 1``.
        batch: the :class:`MixedBatch` the logits were computed from.
        label_smoothing: in [0, 1]; 0 (the default) means plain cross-entropy.

    Returns:
        Scalar tensor, float32 (float64 for float64 logits).

    Example:
        >>> batch = CompoundMix(mix_prob=0.0)(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 1]))
        >>> logits = torch.randn(4, 3)
        >>> plain = F.cross_entropy(logits, batch.targets_a)
        >>> torch.allclose(mixed_cross_entropy(logits, batch), plain)
        True
    """
    check_floating(logits, "logits")
    if not isinstance(batch, MixedBatch):
        raise TypeError(f"`batch` must be a MixedBatch, but got {type(batch).__name__}")
    size = batch.lam.shape[0]
    check_shape(logits, "logits", (size, None), f"Tensor[B, K] with B = {size}")
    check_classes(logits, "logits")
    check_in_range(label_smoothing, "label_smoothing", 0.0, 1.0)
    for name in ("targets_a", "targets_b"):
        targets = getattr(batch, name)
        _check_targets(targets, size, f"batch.{name}", logits.shape[1])
        if not targets.is_floating_point():
            try:
                check_index(targets, f"batch.{name}", logits.shape[1], length=size)
            except ValueError as error:
                if bool((targets < 0).any()):
                    raise ValueError(f"{error} (there is no ignore_index: drop such samples before mixing)") from None
                raise
    for name in ("targets_a", "targets_b", "lam"):
        check_same_device(getattr(batch, name), f"batch.{name}", logits, "logits")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    with torch.autocast(logits.device.type, enabled=False):
        # Both sides share one log-softmax (and one backward through it).
        log_probs = logits.to(dtype).log_softmax(1)
        smoothing = float(label_smoothing)
        loss_a, loss_b = (_cross_entropy(log_probs, targets, smoothing) for targets in (batch.targets_a, batch.targets_b))
        lam = batch.lam.to(dtype)
        return batch_mean(lam * loss_a + (1 - lam) * loss_b)


def _cross_entropy(log_probs: Tensor, targets: Tensor, smoothing: float) -> Tensor:
    """``F.cross_entropy(logits, targets, reduction="none", label_smoothing=smoothing)`` from
    ``log_probs = logits.log_softmax(1)``, in the operations ATen runs after its log-softmax (so
    bit for bit the same). ``targets``: checked class indices Tensor[B] or probabilities
    Tensor[B, K]."""
    classes = log_probs.shape[1]
    if targets.is_floating_point():
        targets = targets.to(log_probs.dtype)
        if smoothing > 0:
            targets = targets * (1 - smoothing) + smoothing / classes
        return -(log_probs * targets).sum(1)
    loss = F.nll_loss(log_probs, targets.long(), reduction="none")
    if smoothing > 0:
        loss = (1 - smoothing) * loss + -log_probs.sum(1) * (smoothing / classes)
    return loss


class MixedCrossEntropyLoss(nn.Module):
    """Module form of :func:`mixed_cross_entropy`.

    Example:
        >>> criterion = MixedCrossEntropyLoss(label_smoothing=0.1)
        >>> batch = CompoundMix(mix_prob=0.0)(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]))
        >>> criterion(torch.randn(2, 5), batch).shape
        torch.Size([])
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        check_in_range(label_smoothing, "label_smoothing", 0.0, 1.0)
        self.label_smoothing = float(label_smoothing)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"

    def forward(self, logits: Tensor, batch: MixedBatch) -> Tensor:
        return mixed_cross_entropy(logits, batch, self.label_smoothing)
