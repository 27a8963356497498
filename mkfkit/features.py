"""Record intermediate outputs of any model by submodule name, without editing the model."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Iterator, Sequence

from torch import nn
from torch.utils.hooks import RemovableHandle

from mkfkit._checks import check_module

__all__ = ["FeatureCollector"]

# Wrappers whose submodule names gain a prefix: DistributedDataParallel / DataParallel
# ("module.") and torch.compile's OptimizedModule ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
            model = model._orig_mod
        else:
            return model


def _strip_prefixes(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


class FeatureCollector(Mapping):
    """Context manager recording the outputs of named submodules through forward hooks.

    Inside the ``with`` block every forward call of a named submodule stores its output (with
    its autograd graph, so losses on it backpropagate into the model). On exit, also after an
    exception, every hook is removed; recorded outputs stay readable until :meth:`clear`.

    Names are those of ``model.named_modules()``. A model wrapped in
    ``DistributedDataParallel``, ``DataParallel`` or ``torch.compile`` is unwrapped, and names
    are accepted with or without the wrapper prefix (``"module.layer1"`` and ``"layer1"`` both
    work); outputs are keyed by the names as given. An unknown name raises a ``ValueError``
    listing close matches, when the collector is built.

    A module that runs several times in one forward pass (shared weights, activation
    checkpointing) keeps its latest output. Call :meth:`clear` after each step so the previous
    step's tensors are not kept alive.

    The collector is a read-only mapping from name to output, iterated in the order of
    ``names`` (only names that have run since the last :meth:`clear`), so
    ``list(feats.values())`` is ready for :class:`~mkfkit.attention.AttentionTransferLoss`.

    Args:
        model: the model (plain or wrapped).
        names: the submodule names to record, shallow to deep as you want them listed.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> with FeatureCollector(model, ["0", "2"]) as feats:
        ...     out = model(torch.randn(5, 4))
        ...     [tuple(v.shape) for v in feats.values()]
        [(5, 3), (5, 2)]
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        check_module(model, "model")
        if isinstance(names, str) or not isinstance(names, Sequence) or len(names) == 0:
            raise ValueError(f"`names` must be a non-empty list of submodule names, but got {names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"`names` must not repeat a name, but got {list(names)!r}")
        available = dict(_unwrap(model).named_modules())
        self._modules: dict[str, nn.Module] = {}
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"`names` must hold strings, but got {name!r}")
            key = name if name in available else _strip_prefixes(name)
            if key not in available:
                close = difflib.get_close_matches(_strip_prefixes(name), [k for k in available if k], n=5)
                hint = f"; close matches: {', '.join(repr(c) for c in close)}" if close else ""
                raise ValueError(f"`names` holds {name!r}, which is not a submodule of the model{hint}")
            self._modules[name] = available[key]
        self._outputs: dict[str, Any] = {}
        self._handles: list[RemovableHandle] = []

    def _hook(self, name: str):
        def record(module: nn.Module, args: Any, output: Any) -> None:
            self._outputs[name] = output

        return record

    def __enter__(self) -> "FeatureCollector":
        if self._handles:
            raise RuntimeError("this FeatureCollector is already active; it cannot be entered twice")
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in self._modules.items()]
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the hooks (done automatically on leaving the ``with`` block)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clear(self) -> None:
        """Forget the recorded outputs (call between steps)."""
        self._outputs.clear()

    @property
    def names(self) -> list[str]:
        """The names being recorded, as given."""
        return list(self._modules)

    def __getitem__(self, name: str) -> Any:
        if name in self._outputs:
            return self._outputs[name]
        if name in self._modules:
            raise KeyError(f"{name!r} has not run since the collector was entered or cleared")
        raise KeyError(f"{name!r} is not recorded by this collector; it records {self.names}")

    def __iter__(self) -> Iterator[str]:
        return (name for name in self._modules if name in self._outputs)

    def __len__(self) -> int:
        return len(self._outputs)

    def __repr__(self) -> str:
        return f"FeatureCollector(names={self.names}, recorded={list(self)}, active={bool(self._handles)})"
