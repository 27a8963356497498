"""How many torch operations does MKF's bookkeeping dispatch? One count per training step.

The bookkeeping of one MKF step on a mixed batch: ``bank.target`` (the composite teacher),
``kd_loss`` on the sub-network's logits, its backward, and ``bank.update`` with the fraction.
That is what MKF adds to a training step with mixing; issue 18 counts it so ("MKF's own"). The
second count adds ``mixed_cross_entropy``, which a mixup baseline pays as well ("with mixed CE").
Every aten operation that reaches the dispatcher is counted (a ``TorchDispatchMode``; views
and in-place operations included, as each is a call the host makes and, on a GPU, most are a
kernel launch). Views among them (``OpOverload.is_view``: ``view``, ``unsqueeze``, ``select``,
``expand``, ``detach``, ...) only make a new tensor header and launch nothing; the column "of
which views" counts them. The model's own forward and backward are not part of the count: the
logits are a leaf tensor.

On the CPU the bank and the fraction take the eager torch path (``backend="torch"``); the counts
are the same on any device for that path. With ``--device cuda`` the default path
(``backend="auto"``: the bank's fused read and write kernels, the QP's fused kernel) is counted
too, and for both paths the kernels and copies the GPU runs (the profiler's CUDA events, the
Triton kernels among them). Value checks off (as in a tuned run) and on.

    python benchmarks/bench_ops.py [--device cpu|cuda] [--batch 64] [--classes 10] [--top 0]
                                   [--json PATH]
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
STORAGES = ("float32", "bfloat16")


def make_fraction(name: str, backend: str):
    """The fraction ``name`` ("linear" or "qp") for a bank of ``backend``: the QP takes the same
    backend (its fused kernel on CUDA under "auto"); OPT2 has no kernel."""
    return LinearFraction() if name == "linear" else QPFraction(backend=backend)


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while it is active, by name and phase, and how many
    of them are views."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self.phases: Counter = Counter()
        self.views = 0
        self.phase = ""

    def enter(self, phase: str) -> None:
        """Count the following operations under ``phase`` too."""
        self.phase = phase

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        self.phases[self.phase] += 1
        self.views += func.is_view
        return func(*args, **(kwargs or {}))


def bookkeeping(bank: KnowledgeBank, fraction, logits: torch.Tensor, batch, group: int = 0,
                enter=lambda phase: None, mixed_ce: bool = True) -> torch.Tensor:
    """MKF's bookkeeping of one step: teacher, losses, backward, bank update; returns the loss.
    ``enter(phase)`` is called as each phase begins (``"target"``, ``"losses"``, ``"backward"``,
    ``"update"``). ``mixed_ce``: add the mixed cross-entropy to the KD loss, as a step does."""
    enter("target")
    teacher = bank.target(group, batch.index_a, batch.index_b, batch.lam)
    enter("losses")
    loss = kd_loss(logits, teacher.probs, 4.0, teacher_kind="probs", weight=teacher.mask)
    if mixed_ce:
        loss = mixed_cross_entropy(logits, batch) + loss
    enter("backward")
    loss.backward()
    enter("update")
    bank.update(group, logits.detach().softmax(1), batch.index_a, batch.index_b, batch.lam, fraction)
    return loss


def setup(batch: int, classes: int, storage: str, device: torch.device, backend: str, seed: int = 0):
    """A bank whose rows all hold knowledge, a mixed batch and leaf logits, on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    samples = 4 * batch
    bank = KnowledgeBank(samples, classes, 1, storage=storage, device=device, backend=backend)
    probs = torch.randn(samples, classes, generator=generator).softmax(1)
    bank.update(0, probs.to(device), torch.arange(samples, device=device))
    mix = CompoundMix(mix_prob=1.0, switch_prob=0.0, generator=generator)
    images = torch.zeros(batch, 1, 2, 2, device=device)
    labels = torch.randint(0, classes, (batch,), generator=generator).to(device)
    mixed = mix(images, labels, torch.randperm(samples, generator=generator)[:batch].to(device))
    logits = torch.randn(batch, classes, generator=generator).to(device).requires_grad_()
    return bank, mixed, logits


def gpu_kernels(step) -> int:
    """Kernels and copies the GPU runs in ``step()`` (CUDA events of the profiler)."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        step()
        torch.cuda.synchronize()
    return sum(1 for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def count(batch: int, classes: int, fraction: str, storage: str, checks: bool,
          device: torch.device = torch.device("cpu"), backend: str = "torch") -> Dict[str, object]:
    """One row: the operations of MKF's own bookkeeping by phase and by name, and the total with
    the mixed cross-entropy (and on CUDA the GPU kernels of both)."""
    bank, mixed, logits = setup(batch, classes, storage, device, backend)
    strategy = make_fraction(fraction, backend)
    row: Dict[str, object] = dict(fraction=fraction, storage=storage, value_checks=checks,
                                  backend=backend, B=batch, C=classes)
    def step(mixed_ce: bool, enter=lambda phase: None) -> None:
        logits.grad = None
        bookkeeping(bank, strategy, logits, mixed, enter=enter, mixed_ce=mixed_ce)

    with mkfkit.value_checks(checks):
        step(True)  # first call: lazy imports, caches, kernels
        own, with_ce = OpCounter(), OpCounter()
        for counter, mixed_ce in ((own, False), (with_ce, True)):
            with counter:
                step(mixed_ce, counter.enter)
        row.update(ops=sum(own.counts.values()), views=own.views, ops_with_ce=sum(with_ce.counts.values()),
                   by_op=dict(own.counts.most_common()), **{phase: own.phases[phase] for phase in PHASES})
        if device.type == "cuda":
            row.update(kernels=gpu_kernels(lambda: step(False)), kernels_with_ce=gpu_kernels(lambda: step(True)))
    return row


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (the torch path) or cuda (also the fused path)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--top", type=int, default=0, help="also print the N most frequent ops")
    default_json = Path(__file__).resolve().parent / "out" / "ops.json"
    parser.add_argument("--json", default=str(default_json))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backends = ("torch", "auto") if device.type == "cuda" else ("torch",)

    rows = [count(args.batch, args.classes, fraction, storage, checks, device, backend)
            for backend in backends for fraction in ("linear", "qp") for storage in STORAGES
            for checks in (False, True)]
    print(f"device: {device_report(device)}")
    columns = [("backend", "backend", "<"), ("fraction", "fraction", "<"), ("bank storage", "storage", "<"),
               ("value checks", "value_checks", "<"), ("B", "B", "d"), ("C", "C", "d"),
               *((phase, phase, "d") for phase in PHASES), ("MKF's own", "ops", "d"),
               ("of which views", "views", "d"), ("with mixed CE", "ops_with_ce", "d")]
    if device.type == "cuda":
        columns += [("GPU kernels", "kernels", "d"), ("GPU kernels with mixed CE", "kernels_with_ce", "d")]
    print_table(rows, columns, title="aten operations of one step's bookkeeping (target, kd, backward, "
                                     "update; then with the mixed CE)")
    for row in rows[: args.top and len(rows)]:
        print(f"\n{row['backend']} {row['fraction']} {row['storage']} checks={row['value_checks']}:")
        for name, calls in list(row["by_op"].items())[: args.top]:
            print(f"  {calls:4d}  {name}")
    write_json(args.json, {"device": device_report(device), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
