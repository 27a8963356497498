"""A/B timing of the fraction and bank hot paths of two checkouts, one CPU thread, in one run.

Each round runs every cell once per checkout in a fresh subprocess (alternating order, so drift
hits both alike); the table gives the median time per call over rounds and the ratio new/old.

    taskset -c 1 python benchmarks/ab_cpu.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CELL_CODE = r'''
import json, sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
import mkfkit
from mkfkit import KnowledgeBank, LinearFraction, QPFraction

def per_call(fn, repeats):
    fn(); fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]

out = {}
gen = torch.Generator().manual_seed(0)
for batch, classes in ((64, 10), (64, 100), (256, 100), (256, 1000)):
    rows = [torch.softmax(2 * torch.randn(batch, classes, generator=gen), 1) for _ in range(3)]
    lam = torch.rand(batch, generator=gen)
    for name, fraction in (("linear", LinearFraction()), ("qp", QPFraction(backend="torch"))):
        out[f"fraction {name} B={batch} C={classes}"] = per_call(lambda: fraction(*rows, lam), 30)
        def fwd_bwd():
            mixed = rows[0].clone().requires_grad_(True)
            fraction(mixed, *rows[1:], lam).a.sum().backward()
        out[f"fraction {name} fwd+bwd B={batch} C={classes}"] = per_call(fwd_bwd, 20)
samples, classes, batch = 50_000, 1000, 512
probs = torch.softmax(2 * torch.randn(batch, classes, generator=gen), 1)
index_a = torch.randperm(samples, generator=gen)[:batch]
index_b = index_a[torch.randperm(batch, generator=gen)]
lam = torch.rand(batch, generator=gen)
with mkfkit.value_checks(False):
    for storage in ("float32", "bfloat16"):
        bank = KnowledgeBank(samples, classes, 1, storage=storage)
        bank.update(0, torch.softmax(torch.randn(samples, classes, generator=gen), 1), torch.arange(samples))
        tag = f"B={batch} C={classes} {storage}"
        out[f"bank update unmixed {tag}"] = per_call(lambda: bank.update(0, probs, index_a), 10)
        out[f"bank update mixed linear {tag}"] = per_call(lambda: bank.update(0, probs, index_a, index_b, lam), 10)
        out[f"bank update mixed qp {tag}"] = per_call(lambda: bank.update(0, probs, index_a, index_b, lam, QPFraction()), 10)
        out[f"bank target mixed {tag}"] = per_call(lambda: bank.target(0, index_a, index_b, lam), 20)
print(json.dumps(out))
'''


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    times = {"old": {}, "new": {}}
    for round_ in range(args.rounds):
        order = ("old", "new") if round_ % 2 == 0 else ("new", "old")
        for which in order:
            result = subprocess.run([sys.executable, "-c", CELL_CODE, getattr(args, which)],
                                    capture_output=True, text=True, check=True)
            for cell, seconds in json.loads(result.stdout).items():
                times[which].setdefault(cell, []).append(seconds)
    print("| cell | old (ms) | new (ms) | new/old |\n|---|---:|---:|---:|")
    for cell in times["old"]:
        old, new = (statistics.median(times[w][cell]) * 1e3 for w in ("old", "new"))
        print(f"| {cell} | {old:.3f} | {new:.3f} | {new / old:.2f} |")


if __name__ == "__main__":
    main()
