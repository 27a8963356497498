"""The methods of ``benchmarks/train.py``: the training step of each, the loop a user reads and
copies, one module per family of methods; ``train.py`` is the driver around them (arguments,
data, torchrun, checkpoints, evaluation).

* :mod:`.baseline`: ``baseline``, ``mix-only``;
* :mod:`.mkf`: ``mkf-opt2``, ``mkf-qp``, ``mkf-nofraction``, ``mkf-nomix``;
* :mod:`.st`: ``st`` (Stimulative Training);
* :mod:`.branches`: ``kdatff`` and the methods it is measured against on one multi-branch
  network: ``kdatff-noat``, ``kdatff-nofusion``, ``one``, ``multibranch``, ``kdatff-mix``;
* :mod:`.dml`: ``dml`` (Deep Mutual Learning).

Each module has ``build(run, args, data)``, which gives a new :class:`~.run.Run` its model
(on ``args.device``, built from the global seed the driver has set) and its blocks, and
``step(run, images, labels, indices, args, per_epoch)``, which takes one batch, runs the
backward pass(es) and returns the loss (the driver zeroes the gradients and steps the
optimiser). Methods with more than one network also say what is evaluated (``outputs``) and
what a user deploys (``deployed``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict

from torch import Tensor, nn

from . import baseline, branches, dml, mkf, st
from .run import Run


def single_output(run: Run, images: Tensor) -> Dict[str, Tensor]:
    """The logits evaluated for a method with one network."""
    return {"top1": run.model(images)}


def the_model(run: Run) -> nn.Module:
    return run.model


@dataclasses.dataclass(frozen=True)
class Method:
    build: Callable[..., None]
    step: Callable[..., Tensor]
    # logits to evaluate by name; "top1" is the deployed network's
    outputs: Callable[[Run, Tensor], Dict[str, Tensor]] = single_output
    deployed: Callable[[Run], nn.Module] = the_model  # the network a user deploys


def _family(module, names) -> Dict[str, Method]:
    extra = {name: getattr(module, name) for name in ("outputs", "deployed") if hasattr(module, name)}
    return {name: Method(module.build, module.step, **extra) for name in names}


# The order of --help and of the default tables.
METHODS: Dict[str, Method] = {
    **_family(baseline, ["baseline"]),
    **_family(mkf, ["mkf-opt2", "mkf-qp"]),
    **_family(branches, ["kdatff"]),
    **_family(mkf, ["mkf-nofraction", "mkf-nomix"]),
    **_family(baseline, ["mix-only"]),
    **_family(st, ["st"]),
    **_family(dml, ["dml"]),
    **_family(branches, ["one", "kdatff-noat", "kdatff-nofusion", "multibranch", "kdatff-mix"]),
}
# The methods that train more than one network (--branches applies to them).
MULTI_NETWORK_METHODS = [*branches.VARIANTS, "dml"]
# The methods that transfer attention between consecutive blocks of each branch.
ATTENTION_METHODS = [name for name, variant in branches.VARIANTS.items() if variant.attention]
