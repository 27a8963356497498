"""Argument checks shared by every block.

Each check raises ``TypeError`` (wrong kind of object, dtype) or ``ValueError`` (wrong shape,
range, device, non-finite values) with a message of the form
"`name` must ..., but got ...", so a user sees which argument is wrong, what was expected and
what was given.

Checks that read tensor *values* (ranges, finiteness, simplex rows) synchronise a CUDA device
with the host. They run by default and can be switched off for speed with
:func:`set_value_checks` or the :func:`value_checks` context manager; they are skipped
automatically while a CUDA graph is being captured or ``torch.compile`` is tracing, where a
host synchronisation is impossible, and for tensors on the meta device, which hold no values.
Shape, dtype and device checks cost nothing and always run.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections import abc
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "set_value_checks",
    "value_checks",
    "value_checks_enabled",
]

_value_checks = True


def set_value_checks(enabled: bool) -> None:
    """Switch the value checks (ranges, NaN/Inf, simplex rows) on or off globally."""
    global _value_checks
    _value_checks = bool(enabled)


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Context manager that sets the value checks for its body and restores them after.

    Example:
        >>> import mkfkit
        >>> with mkfkit.value_checks(False):
        ...     pass  # hot loop without host synchronisation
    """
    previous = _value_checks
    set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(previous)


def value_checks_enabled(*tensors: Tensor) -> bool:
    """Whether value checks should run now for ``tensors``."""
    if not _value_checks:
        return False
    if any(t.is_meta for t in tensors):
        return False
    if torch.compiler.is_compiling():
        return False
    if any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing():
        return False
    return True


def describe(value: object) -> str:
    """A short description of ``value`` for an error message."""
    if isinstance(value, Tensor):
        return f"Tensor of shape {tuple(value.shape)}, dtype {value.dtype} on {value.device}"
    return f"{value!r} ({type(value).__name__})"


def format_number(value: float, dtype: torch.dtype = torch.float64) -> str:
    """``value`` with as few significant digits as tell it apart from its neighbours in ``dtype``.

    Six digits hide the fault of, say, ``1 + 1e-6`` ("1"); the full ``repr`` of a float32
    entry shows digits the tensor never had (1.3 as "1.2999999523162842"). The shortest form
    that reads back as the same ``dtype`` value does neither.
    """
    if not math.isfinite(value):
        return f"{value}"
    for digits in range(6, 18):
        text = f"{value:.{digits}g}"
        if torch.tensor(float(text), dtype=dtype).item() == value:
            return text
    return repr(value)


def check_tensor(value: object, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, but got {describe(value)}")
    return value


def check_module(value: object, name: str) -> torch.nn.Module:
    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"`{name}` must be a torch.nn.Module, but got {describe(value)}")
    return value


def check_module_types(value: object, name: str) -> tuple:
    """A tuple of ``nn.Module`` subclasses (such as the ``extra_types`` of the depth helpers)."""
    if not isinstance(value, tuple) or not all(isinstance(t, type) and issubclass(t, torch.nn.Module) for t in value):
        raise TypeError(f"`{name}` must be a tuple of torch.nn.Module subclasses, but got {describe(value)}")
    return value


def check_floating(value: Tensor, name: str) -> Tensor:
    check_tensor(value, name)
    if not value.is_floating_point():
        raise TypeError(f"`{name}` must have a floating-point dtype, but got {value.dtype}")
    return value


def check_integer(value: Tensor, name: str) -> Tensor:
    check_tensor(value, name)
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"`{name}` must have an integer dtype, but got {value.dtype}")
    return value


def check_shape(value: Tensor, name: str, shape: Sequence[Optional[int]], spec: str) -> Tensor:
    """Check ``value.shape`` against ``shape``, where ``None`` matches any size.

    ``spec`` is the shape as the docs write it, e.g. ``"Tensor[B, C]"``.
    """
    check_tensor(value, name)
    ok = value.dim() == len(shape) and all(
        want is None or want == got for want, got in zip(shape, value.shape)
    )
    if not ok:
        raise ValueError(f"`{name}` must be a {spec}, but got shape {tuple(value.shape)}")
    return value


def check_image_dims(value: Tensor, name: str) -> None:
    """A Tensor[B, C, H, W] with C, H and W >= 1; an empty batch (B = 0) is allowed."""
    if 0 in value.shape[1:]:
        raise ValueError(
            f"`{name}` must have C, H and W of at least 1 (B may be 0), but got shape "
            f"{tuple(value.shape)}"
        )


def _check_same(attribute: str, error: type, value: Tensor, name: str, reference: Tensor,
                reference_name: str) -> None:
    """``value`` must share ``reference``'s shape, device or dtype (``attribute``)."""
    expected, got = getattr(reference, attribute), getattr(value, attribute)
    if got != expected:
        if attribute == "shape":
            wanted, got = f"have the shape of `{reference_name}` {tuple(expected)}", tuple(got)
        elif attribute == "device":
            wanted = f"be on the device of `{reference_name}` ({expected})"
        else:
            wanted = f"have the {attribute} of `{reference_name}` ({expected})"
        raise error(f"`{name}` must {wanted}, but got {got}")


def check_same_shape(value: Tensor, name: str, reference: Tensor, reference_name: str) -> None:
    _check_same("shape", ValueError, value, name, reference, reference_name)


def check_same_device(value: Tensor, name: str, reference: Tensor, reference_name: str) -> None:
    _check_same("device", ValueError, value, name, reference, reference_name)


def check_same_dtype(value: Tensor, name: str, reference: Tensor, reference_name: str) -> None:
    _check_same("dtype", TypeError, value, name, reference, reference_name)


def check_finite(value: Tensor, name: str) -> None:
    if value_checks_enabled(value) and not bool(torch.isfinite(value).all()):
        bad = (~torch.isfinite(value)).sum().item()
        raise ValueError(f"`{name}` must be finite, but got {bad} NaN/Inf entries")


def _is_real(value: object) -> bool:
    """A Python or NumPy real number (NumPy registers its scalars with ``numbers``); not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(value: object, name: str) -> float:
    """A real number as a Python float: int, float or a NumPy scalar such as ``np.float32(0.5)``."""
    if not _is_real(value):
        raise TypeError(f"`{name}` must be a number, but got {describe(value)}")
    return float(value)


def check_in_range(
    value: Union[float, int, Tensor],
    name: str,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Check that a number, or every entry of a tensor, lies in the interval (or half-open)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, Tensor):
        if not value_checks_enabled(value) or value.numel() == 0:
            return
        # Tensor entries must also be finite. The two extremes come from one reduction and one
        # transfer to the host; NaN propagates into them, so it fails here too.
        extremes = torch.stack(torch.aminmax(value.detach())).tolist()
        if all(math.isfinite(e) and _inside(e, low, high, low_open, high_open) for e in extremes):
            return
        bad = ~(torch.isfinite(value) & _inside(value, low, high, low_open, high_open))
        got = format_number(value[bad].flatten()[0].item(), value.dtype)
        raise ValueError(f"`{name}` must lie in {interval}, but got {got}")
    number = check_number(value, name)
    if not _inside(number, low, high, low_open, high_open):
        raise ValueError(f"`{name}` must lie in {interval}, but got {format_number(number)}")


def _inside(value, low: float, high: float, low_open: bool, high_open: bool):
    """Whether a number (or each entry of a tensor) lies in the interval; False for NaN."""
    above_low = value > low if low_open else value >= low
    below_high = value < high if high_open else value <= high
    return above_low & below_high


def check_positive_int(value: object, name: str, minimum: int = 1) -> int:
    """An integer ``>= minimum`` as a Python int: int or a NumPy integer such as ``np.int64(3)``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, but got {describe(value)}")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, but got {value}")
    return int(value)


def check_device(value: object, name: str) -> torch.device:
    """A device as a ``torch.device``: a ``torch.device``, a device string or a CUDA index."""
    try:
        if isinstance(value, (torch.device, str)) or (isinstance(value, numbers.Integral) and not isinstance(value, bool)):
            return torch.device(value)
    except RuntimeError:
        pass
    raise ValueError(
        f"`{name}` must be a torch.device or a device string such as 'cpu' or 'cuda:0', but got "
        f"{describe(value)}"
    )


def check_choice(value: object, name: str, choices: Sequence[object]) -> None:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {options}, but got {value!r}")


def distribution_tolerance(dtype: torch.dtype) -> float:
    """How far a row of probabilities in ``dtype`` may sum from 1: 1e-3, or ``2 eps`` if larger.

    Half-precision rows round each entry by up to ``eps / 2``, so their sums drift further than
    float32 rows do (bf16: ``2 eps = 0.0156``).
    """
    return max(1e-3, 2 * torch.finfo(dtype).eps)


def check_distribution_rows(value: Tensor, name: str, atol: Optional[float] = None) -> None:
    """Check that every row of ``value`` (Tensor[..., C]) is a probability vector.

    ``atol`` defaults to :func:`distribution_tolerance` of the dtype of ``value``.
    """
    if atol is None:
        atol = distribution_tolerance(value.dtype)
    if not value_checks_enabled(value) or value.numel() == 0:
        return
    # Four reductions and one transfer to the host in the common, valid case.
    sums = value.sum(dim=-1, dtype=torch.float64)
    low, high, low_sum, high_sum = torch.stack([*torch.aminmax(value), *torch.aminmax(sums)]).tolist()
    if not (math.isfinite(low) and math.isfinite(high)):
        check_finite(value, name)
    if low < -atol:
        raise ValueError(
            f"`{name}` must hold probability rows (entries >= 0), but got an entry "
            f"{format_number(low, value.dtype)}"
        )
    if max(high_sum - 1, 1 - low_sum) > atol:
        worst = high_sum if high_sum - 1 >= 1 - low_sum else low_sum
        raise ValueError(
            f"`{name}` must hold probability rows (each summing to 1 within {atol:g}), "
            f"but got a row summing to {format_number(worst, value.dtype)}"
        )


def check_index(value: Tensor, name: str, size: int, length: Optional[int] = None) -> Tensor:
    """Check an index Tensor[B] of an integer dtype with entries in [0, size)."""
    check_integer(value, name)
    if value.dim() != 1 or (length is not None and value.shape[0] != length):
        expected = "Tensor[B]" if length is None else f"Tensor[B] with B = {length}"
        raise ValueError(f"`{name}` must be a {expected}, but got shape {tuple(value.shape)}")
    if value_checks_enabled(value) and value.numel() > 0:
        low, high = torch.stack(torch.aminmax(value)).tolist()
        if low < 0 or high >= size:
            bad = low if low < 0 else high
            raise ValueError(f"`{name}` must hold indices in [0, {size - 1}], but got {bad}")
    return value


def as_lam(
    lam: Union[float, Tensor], batch: int, device: torch.device, dtype: torch.dtype, name: str = "lam"
) -> Tensor:
    """Return mixing weights as a Tensor[B] of ``dtype`` on ``device`` (the batch's).

    ``lam`` is a number or a Tensor[B] (or a 0-d tensor) whose entries lie in [0, 1]; a tensor
    must already be on ``device``: a silent copy would be a host round trip per step.
    """
    if isinstance(lam, Tensor):
        check_floating(lam, name)
        if lam.dim() == 0:
            lam = lam.expand(batch)
        check_shape(lam, name, (batch,), f"number or Tensor[B] with B = {batch}")
        if lam.device != device:
            raise ValueError(f"`{name}` must be on {device}, the device of the batch, but got {lam.device}")
        check_in_range(lam, name, 0.0, 1.0)
        return lam.to(dtype)
    check_in_range(lam, name, 0.0, 1.0)
    return torch.full((batch,), float(lam), dtype=dtype, device=device)


def check_tensor_list(
    values: object,
    name: str,
    spec: Optional[str] = None,
    ndim: Optional[int] = None,
    *,
    item: str = "tensor",
    minimum: int = 1,
    count: Optional[int] = None,
    per: str = "branch",
    same: Optional[str] = None,
    any_iterable: bool = False,
) -> list[Tensor]:
    """Check a list of tensors and return it as a list.

    ``values`` must be a list or tuple (with ``any_iterable=True``: any iterable but a tensor)
    holding exactly ``count`` entries ("one ``item`` per ``per``") or, without ``count``, at
    least ``minimum`` of them. With ``spec`` (e.g. ``"Tensor[B, K]"``) and ``ndim``, every entry
    must be a floating-point tensor of ``ndim`` dimensions on the device of entry 0, and
    ``same="batch"`` / ``"shape"`` asks for the batch size / the whole shape of entry 0.
    Without ``spec`` only the container and the count are checked.
    """
    container = "sequence" if any_iterable else "list or tuple"
    allowed = isinstance(values, abc.Iterable) if any_iterable else isinstance(values, (list, tuple))
    if isinstance(values, Tensor) or not allowed:
        raise TypeError(f"`{name}` must be a {container} of {spec or item + 's'}, but got {describe(values)}")
    values = list(values)
    if count is not None and len(values) != count:
        raise ValueError(f"`{name}` must hold one {item} per {per} ({count}), but got {len(values)}")
    if len(values) < minimum:
        number = "one" if minimum == 1 else str(minimum)
        raise ValueError(
            f"`{name}` must hold at least {number} {item}{'s' if minimum > 1 else ''}, but got {len(values)}"
        )
    if spec is None:
        return values
    check_choice(same, "same", (None, "batch", "shape"))
    first = f"{name}[0]"
    for index, value in enumerate(values):
        entry = f"{name}[{index}]"
        check_floating(value, entry)
        check_shape(value, entry, (None,) * ndim, spec)
        if same == "shape":
            check_same_shape(value, entry, values[0], first)
        elif same == "batch" and value.shape[0] != values[0].shape[0]:
            raise ValueError(
                f"`{entry}` must have the batch size of `{first}` ({values[0].shape[0]}), "
                f"but got {value.shape[0]}"
            )
        check_same_device(value, entry, values[0], first)
    return values


def check_state_keys(state: object, name: str, expected: Sequence[str]) -> None:
    """A state dict holding exactly the entries ``expected``: a clear error, not a bare KeyError."""
    if not isinstance(state, abc.Mapping):
        raise TypeError(f"`{name}` must be a dict, but got {describe(state)}")
    missing = [key for key in expected if key not in state]
    unexpected = sorted(str(key) for key in state if key not in expected)
    faults = [f"{kind} {keys}" for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if faults:
        raise ValueError(f"`{name}` must hold exactly the entries {list(expected)}, but got {' and '.join(faults)}")


def check_generator_state(state: object, name: str) -> Tensor:
    """A state of a CPU ``torch.Generator`` (as ``get_state()`` returns it), checked on a scratch
    generator so that a rejected state changes nothing; returns a copy to ``set_state`` with."""
    if not isinstance(state, Tensor) or state.dtype != torch.uint8 or state.dim() != 1:
        raise TypeError(
            f"`{name}` must be a uint8 Tensor[N] from torch.Generator.get_state(), but got "
            f"{describe(state)}"
        )
    if state.is_meta:
        raise ValueError(f"`{name}` must be a CPU torch.Generator state, but got one on the meta "
                         "device, which holds no values")
    state = state.detach().to("cpu", copy=True)
    try:
        torch.Generator().set_state(state)
    except RuntimeError as error:
        raise ValueError(f"`{name}` must be a CPU torch.Generator state, but got an invalid one ({error})") from None
    return state
