"""How many torch operations does MKF's bookkeeping dispatch? One count per training step.

The bookkeeping of one MKF step on a mixed batch: ``bank.target`` (the composite teacher),
``kd_loss`` and ``mixed_cross_entropy`` on the sub-network's logits, their backward, and
``bank.update`` with the fraction. Every aten operation that reaches the dispatcher is counted
(a ``TorchDispatchMode``; views and in-place operations included, as each is a call the host
makes and, on a GPU, most are a kernel launch). The model's own forward and backward are not
part of the count: the logits are a leaf tensor.

Counted on the eager torch path (``backend="torch"``) on the CPU; the counts are the same on
any device for the torch path. Value checks off (as in a tuned run) and on.

    python benchmarks/bench_ops.py [--batch 64] [--classes 10] [--top 0] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_report, print_table, write_json  # noqa: E402

import mkfkit  # noqa: E402
from mkfkit.bank import KnowledgeBank  # noqa: E402
from mkfkit.distill import kd_loss  # noqa: E402
from mkfkit.fraction import LinearFraction, QPFraction  # noqa: E402
from mkfkit.mixing import CompoundMix, mixed_cross_entropy  # noqa: E402

PHASES = ("target", "losses", "backward", "update")
FRACTIONS = {"linear": LinearFraction, "qp": lambda: QPFraction(backend="torch")}


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while it is active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self.phases: Counter = Counter()
        self.phase = ""

    def enter(self, phase: str) -> None:
        """Count the following operations under ``phase`` too."""
        self.phase = phase

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        self.phases[self.phase] += 1
        return func(*args, **(kwargs or {}))


def bookkeeping(bank: KnowledgeBank, fraction, logits: torch.Tensor, batch, group: int = 0,
                enter=lambda phase: None) -> torch.Tensor:
    """MKF's bookkeeping of one step: teacher, losses, backward, bank update; returns the loss.
    ``enter(phase)`` is called as each phase begins (``"target"``, ``"losses"``, ``"backward"``,
    ``"update"``)."""
    enter("target")
    teacher = bank.target(group, batch.index_a, batch.index_b, batch.lam)
    enter("losses")
    loss = mixed_cross_entropy(logits, batch) + kd_loss(
        logits, teacher.probs, 4.0, teacher_kind="probs", weight=teacher.mask)
    enter("backward")
    loss.backward()
    enter("update")
    bank.update(group, logits.detach().softmax(1), batch.index_a, batch.index_b, batch.lam, fraction)
    return loss


def setup(batch: int, classes: int, storage: str, seed: int = 0):
    """A bank whose rows all hold knowledge, a mixed batch and leaf logits."""
    generator = torch.Generator().manual_seed(seed)
    samples = 4 * batch
    bank = KnowledgeBank(samples, classes, 1, storage=storage, backend="torch")
    bank.update(0, torch.randn(samples, classes, generator=generator).softmax(1), torch.arange(samples))
    mix = CompoundMix(mix_prob=1.0, switch_prob=0.0, generator=generator)
    images = torch.zeros(batch, 1, 2, 2)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    mixed = mix(images, labels, torch.randperm(samples, generator=generator)[:batch])
    logits = torch.randn(batch, classes, generator=generator, requires_grad=True)
    return bank, mixed, logits


def count(batch: int, classes: int, fraction: str, storage: str, checks: bool) -> Dict[str, object]:
    bank, mixed, logits = setup(batch, classes, storage)
    strategy = FRACTIONS[fraction]()
    with mkfkit.value_checks(checks):
        bookkeeping(bank, strategy, logits, mixed)  # first call: lazy imports, caches
        logits.grad = None
        counter = OpCounter()
        with counter:
            bookkeeping(bank, strategy, logits, mixed, enter=counter.enter)
    return dict(fraction=fraction, storage=storage, value_checks=checks, B=batch, C=classes,
                ops=sum(counter.counts.values()), **{phase: counter.phases[phase] for phase in PHASES},
                by_op=dict(counter.counts.most_common()))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--top", type=int, default=0, help="also print the N most frequent ops")
    default_json = Path(__file__).resolve().parent / "out" / "ops.json"
    parser.add_argument("--json", default=str(default_json))
    args = parser.parse_args(argv)

    rows = [count(args.batch, args.classes, fraction, storage, checks)
            for fraction in FRACTIONS for storage in ("float32", "bfloat16") for checks in (False, True)]
    print(f"device: {device_report('cpu')}")
    print_table(rows, [("fraction", "fraction", "<"), ("bank storage", "storage", "<"),
                       ("value checks", "value_checks", "<"), ("B", "B", "d"), ("C", "C", "d"),
                       *((phase, phase, "d") for phase in PHASES), ("aten ops", "ops", "d")],
                title="aten operations of one step's bookkeeping (target, kd + mixed CE, backward, update)")
    for row in rows[: args.top and len(rows)]:
        print(f"\n{row['fraction']} {row['storage']} checks={row['value_checks']}:")
        for name, calls in list(row["by_op"].items())[: args.top]:
            print(f"  {calls:4d}  {name}")
    write_json(args.json, {"device": device_report("cpu"), "backend": "torch", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
