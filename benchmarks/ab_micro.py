"""Per-call host cost of the fraction and a small bank, one checkout: python benchmarks/ab_micro.py CHECKOUT
(prints microseconds: LinearFraction, QPFraction at B=64 C=10; bank update unmixed, mixed linear,
mixed QP at B=256 C=100, N=1000; best of 5 loops)."""
import sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from mkfkit import LinearFraction, QPFraction, KnowledgeBank
import mkfkit
g = torch.Generator().manual_seed(0)
rows = [torch.softmax(2 * torch.randn(64, 10, generator=g), 1) for _ in range(3)]
lam = torch.rand(64, generator=g)
res = []
for f in (LinearFraction(), QPFraction()):
    for _ in range(200): f(*rows, lam)
    best = 1e9
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(500): f(*rows, lam)
        best = min(best, (time.perf_counter() - t) / 500)
    res.append(best * 1e6)
bank = KnowledgeBank(1000, 100, 1)
probs = torch.softmax(torch.randn(256, 100, generator=g), 1)
ia = torch.randperm(1000, generator=g)[:256]; ib = ia.flip(0); l = torch.rand(256, generator=g)
bank.update(0, torch.softmax(torch.randn(1000, 100, generator=g), 1), torch.arange(1000))
with mkfkit.value_checks(False):
    for fn in (lambda: bank.update(0, probs, ia), lambda: bank.update(0, probs, ia, ib, l), lambda: bank.update(0, probs, ia, ib, l, QPFraction())):
        for _ in range(20): fn()
        best = 1e9
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(50): fn()
            best = min(best, (time.perf_counter() - t) / 50)
        res.append(best * 1e6)
print(" ".join(f"{r:.0f}" for r in res))
