"""KnowledgeBank: memory per storage layout, update/target speed, and the top-k error.

1. **Memory** of a bank with T = 3 groups for CIFAR-100 (50k x 100), Tiny ImageNet
   (100k x 200) and ImageNet (1.28M x 1000): computed by ``KnowledgeBank.memory_bytes`` and
   measured as the growth of the process's resident memory when the bank is allocated (only
   where it fits under ``--max-measure-gb``).
2. **Speed** for B = 512, C = 1000: ``update`` (unmixed; mixed with the linear and the exact QP
   fraction, where every row appears twice, once per side) and ``target`` (mixed), per storage
   layout, on the CPU and on CUDA when available (value checks off: the hot-path setting; one
   row with checks on). Also a bank on the CPU serving a CUDA caller, and the per-row Python loop
   of PS-KD-style code as a baseline. A dense bank on CUDA takes the fused Triton path there
   (``backend="auto"``); a second table compares it with ``backend="torch"`` (CUDA only; skipped
   with a printed reason otherwise), timed per call with a synchronisation and as 20
   back-to-back calls between CUDA events.
3. **Top-k error**: the KL divergence ``KL(target_float32 || target_layout)`` of composite
   targets (random partners, ``lam ~ Beta(1, 1)``) after training, where every bank was fed the
   same outputs. The outputs are real training outputs of small models trained here with
   Mixup on half of the batches after a one-epoch warm-up:
   an MLP on scikit-learn's digits (C = 10), and linear softmax classifiers on synthetic
   Gaussian-cluster data with C = 100 (20 samples a class) and C = 1000 (10 a class; full run
   only); the cluster means share a low-dimensional structure so wrong classes get
   structured, not uniform, mass. Batches of 256, the default ``LinearFraction``. For scale,
   the table also gives the KD loss itself, ``KL(target_float32 || model output)``.

Usage::

    python benchmarks/bench_bank.py            # full run
    python benchmarks/bench_bank.py --quick    # a short run
    python benchmarks/bench_bank.py --json benchmarks/out/bank.json
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import List, Optional

import torch
from torch import Tensor, nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import device_report, loop_time, median_time, print_table, write_json  # noqa: E402

import mkfkit  # noqa: E402
from mkfkit.bank import KnowledgeBank  # noqa: E402
from mkfkit.fraction import LinearFraction, QPFraction  # noqa: E402

DATASETS = [("CIFAR-100", 50_000, 100), ("Tiny ImageNet", 100_000, 200), ("ImageNet", 1_281_167, 1000)]
MEMORY_LAYOUTS = [("float32", None), ("bfloat16", None), ("float16", None), ("topk", 8), ("topk", 32), ("topk", 64)]


def layout_name(storage: str, k: Optional[int]) -> str:
    return storage if k is None else f"topk k={k}"


# ----------------------------------------------------------------------------------- memory


def return_freed_memory_to_the_os() -> None:
    """Serve every allocation above 64 KiB by mmap (glibc), so freeing a bank shrinks the
    resident set and the next bank's growth is measured from a clean base."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_rows(quick: bool, max_measure_gb: float) -> List[dict]:
    return_freed_memory_to_the_os()
    rows = []
    for dataset, samples, classes in DATASETS:
        for storage, k in MEMORY_LAYOUTS:
            computed = KnowledgeBank.memory_bytes(samples, classes, 3, storage, k)
            measured = None
            fits = computed < min(max_measure_gb * 1e9, 0.5 * available_bytes())
            if fits and not (quick and dataset == "ImageNet"):
                gc.collect()
                before = resident_bytes()
                bank = KnowledgeBank(samples, classes, 3, storage=storage, k=k)
                measured = resident_bytes() - before
                del bank
                gc.collect()
            rows.append(
                dict(dataset=dataset, samples=samples, classes=classes, layout=layout_name(storage, k),
                     computed_bytes=computed, measured_bytes=measured)
            )
    return rows


def print_memory(rows: List[dict]) -> None:
    print_table(
        rows,
        [
            ("dataset", "dataset", "<"),
            ("N x C", lambda row: f"{row['samples']} x {row['classes']}", ""),
            ("layout", "layout", "<"),
            ("computed GB", lambda row: row["computed_bytes"] / 1e9, ".4f"),
            ("measured GB", lambda row: None if row["measured_bytes"] is None else row["measured_bytes"] / 1e9, ".4f"),
        ],
        "Memory of a bank with T = 3 (GB = 1e9 bytes; measured = resident-memory growth on allocation)",
    )


# ----------------------------------------------------------------------------------- speed


def naive_update(store: Tensor, probs: Tensor, index: Tensor, momentum: float) -> None:
    """PS-KD-style per-row loop (what mkfkit replaces): one EMA per row, in Python."""
    for row, sample in enumerate(index.tolist()):
        store[sample] = momentum * probs[row] + (1 - momentum) * store[sample]


def speed_rows(device: str, quick: bool) -> List[dict]:
    samples, classes, batch = (10_000 if quick else 50_000), 1000, 512
    repeats = 5 if quick else 20
    generator = torch.Generator().manual_seed(0)
    index_a = torch.randperm(samples, generator=generator)[:batch].to(device)
    index_b = index_a[torch.randperm(batch, generator=generator).to(device)]
    lam = torch.distributions.Beta(1.0, 1.0).sample((batch,)).to(device)
    probs = torch.softmax(3 * torch.randn(batch, classes, generator=generator), dim=1).to(device)
    linear, qp = LinearFraction(), QPFraction()

    rows = []
    placements = [(device, device)] + ([("cpu", "cuda")] if device == "cuda" else [])
    for bank_device, caller in placements:
        where = "bank on cuda" if bank_device == "cuda" else ("bank on cpu, caller cuda" if caller == "cuda" else "cpu")
        for storage, k in [("float32", None), ("bfloat16", None), ("topk", 32)]:
            bank = KnowledgeBank(samples, classes, 3, storage=storage, k=k, device=bank_device)
            bank.update(1, torch.softmax(torch.randn(samples, classes), 1).to(bank_device),
                        torch.arange(samples, device=bank_device))
            operations = {
                "update unmixed": lambda: bank.update(1, probs, index_a),
                "update mixed, linear": lambda: bank.update(1, probs, index_a, index_b, lam, linear),
                "update mixed, exact QP": lambda: bank.update(1, probs, index_a, index_b, lam, qp),
                "target mixed": lambda: bank.target(0, index_a, index_b, lam),
            }
            with mkfkit.value_checks(False):
                for operation, fn in operations.items():
                    rows.append(dict(device=caller, placement=where, operation=operation,
                                     layout=layout_name(storage, k), ms=median_time(fn, caller, repeats, 2)))
            if storage == "float32" and bank_device == device:
                ms = median_time(operations["update mixed, linear"], caller, repeats, 2)
                rows.append(dict(device=caller, placement=where, operation="update mixed, linear (value checks on)",
                                 layout="float32", ms=ms))
                store = torch.full((samples, classes), 1 / classes, device=device)
                ms = median_time(lambda: naive_update(store, probs, index_a, 0.5), caller, max(3, repeats // 4), 1)
                rows.append(dict(device=caller, placement=where, operation="update unmixed, per-row Python loop",
                                 layout="float32", ms=ms))
            del bank
    reference = {(r["placement"], r["operation"]): r["ms"] for r in rows if r["layout"] == "float32"}
    for row in rows:
        base = reference.get((row["placement"], row["operation"].replace(", per-row Python loop", "")
                              .replace(" (value checks on)", "")))
        row["vs_float32"] = row["ms"] / base if base else None
    return rows


def print_speed(rows: List[dict]) -> None:
    print_table(
        rows,
        [("placement", "placement", "<"), ("operation", "operation", "<"), ("layout", "layout", "<"),
         ("ms", "ms", ".3f"), ("x float32", "vs_float32", ".2f")],
        "Speed, B = 512, C = 1000, T = 3 (median ms; ratio to the float32 bank, same operation)",
    )


def fused_rows(quick: bool) -> List[dict]:
    """The fused Triton path (backend="triton") against the torch path, bank and batch on CUDA."""
    from mkfkit import kernels

    if not torch.cuda.is_available() or not kernels.available("cuda"):
        print("fused bank path: skipped (needs a CUDA device and Triton)")
        return []
    samples, classes, batch = (10_000 if quick else 50_000), 1000, 512
    repeats = 5 if quick else 20
    generator = torch.Generator().manual_seed(0)
    index_a = torch.randperm(samples, generator=generator)[:batch].cuda()
    index_b = index_a[torch.randperm(batch, generator=generator).cuda()]
    lam = torch.distributions.Beta(1.0, 1.0).sample((batch,)).cuda()
    probs = torch.softmax(3 * torch.randn(batch, classes, generator=generator), dim=1).cuda()
    warm = torch.softmax(torch.randn(samples, classes, generator=generator), 1).cuda()
    linear, qp = LinearFraction(), QPFraction()
    rows = []
    for storage in ("float32", "bfloat16"):
        banks = {}
        for backend in ("torch", "triton"):
            banks[backend] = KnowledgeBank(samples, classes, 3, storage=storage, device="cuda", backend=backend)
            banks[backend].update(1, warm, torch.arange(samples, device="cuda"))
        for operation, call in {
            "update unmixed": lambda bank: bank.update(1, probs, index_a),
            "update mixed, linear": lambda bank: bank.update(1, probs, index_a, index_b, lam, linear),
            "update mixed, exact QP": lambda bank: bank.update(1, probs, index_a, index_b, lam, qp),
            "target mixed": lambda bank: bank.target(1, index_a, index_b, lam),
        }.items():
            row = dict(layout=storage, operation=operation)
            with mkfkit.value_checks(False):
                for backend, bank in banks.items():
                    row[f"{backend}_ms"] = median_time(lambda: call(bank), "cuda", repeats, 2)
                    row[f"{backend}_loop_ms"] = loop_time(lambda: call(bank), "cuda", repeats)
            row["speedup"] = row["torch_ms"] / row["triton_ms"]
            row["speedup_loop"] = row["torch_loop_ms"] / row["triton_loop_ms"]
            rows.append(row)
        del banks
    return rows


def print_fused(rows: List[dict]) -> None:
    if rows:
        print_table(
            rows,
            [("layout", "layout", "<"), ("operation", "operation", "<"),
             ("torch ms", "torch_ms", ".3f"), ("fused ms", "triton_ms", ".3f"), ("speedup", "speedup", ".1f"),
             ("torch loop", "torch_loop_ms", ".3f"), ("fused loop", "triton_loop_ms", ".3f"),
             ("speedup", "speedup_loop", ".1f")],
            "Fused Triton path vs torch path, bank on CUDA, B = 512, C = 1000 (median ms per call; "
            "'ms': synchronised around each call, 'loop': 20 calls back to back between CUDA events)",
        )


# ----------------------------------------------------------------------------------- top-k error


def digits_data():
    from sklearn.datasets import load_digits

    data = load_digits()
    features = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return "digits (sklearn, MLP)", features, torch.tensor(data.target), 10, [1, 2, 3, 5]


def cluster_data(classes: int, per_class: int, generator: torch.Generator):
    # Class means on a 16-dimensional subspace of a 64-dimensional space: similar classes exist.
    basis = torch.randn(16, 64, generator=generator)
    means = torch.randn(classes, 16, generator=generator) @ basis / 4
    labels = torch.arange(classes).repeat_interleave(per_class)
    features = means[labels] + torch.randn(labels.shape[0], 64, generator=generator)
    ks = [4, 8, 16, 32] if classes == 100 else [16, 32, 64]
    return f"clusters C={classes} (linear)", features, labels, classes, ks


def topk_error_rows(quick: bool) -> List[dict]:
    generator = torch.Generator().manual_seed(0)
    sources = [digits_data(), cluster_data(100, 20, generator)]
    if not quick:
        sources.append(cluster_data(1000, 10, generator))
    epochs = 6 if quick else 10
    rows = []
    for name, features, labels, classes, ks in sources:
        samples = labels.shape[0]
        hidden = 64
        model = (nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, classes))
                 if classes == 10 else nn.Linear(64, classes))
        optimiser = torch.optim.SGD(model.parameters(), lr=0.1 if classes == 10 else 0.5, momentum=0.9)
        halves = [("bfloat16", None), ("float16", None)] if classes < 1000 else [("bfloat16", None)]
        layouts = [("float32", None)] + halves + [("topk", k) for k in ks]
        banks = {layout_name(s, k): KnowledgeBank(samples, classes, 1, storage=s, k=k) for s, k in layouts}
        beta = torch.distributions.Beta(torch.tensor(1.0), torch.tensor(1.0))
        for epoch in range(epochs):
            order = torch.randperm(samples, generator=generator)
            for start in range(0, samples, 256):
                index = order[start:start + 256]
                x, y = features[index], labels[index]
                mix = epoch > 0 and bool(torch.rand((), generator=generator) < 0.5)
                partner = torch.randperm(index.shape[0], generator=generator) if mix else torch.arange(index.shape[0])
                lam = beta.sample((index.shape[0],)) if mix else torch.ones(index.shape[0])
                inputs = lam[:, None] * x + (1 - lam[:, None]) * x[partner]
                logits = model(inputs)
                loss = (lam * nn.functional.cross_entropy(logits, y, reduction="none")
                        + (1 - lam) * nn.functional.cross_entropy(logits, y[partner], reduction="none")).mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                probs = torch.softmax(logits.detach(), dim=1)
                for bank in banks.values():
                    if mix:
                        bank.update(0, probs, index, index[partner], lam)
                    else:
                        bank.update(0, probs, index)
        # Composite targets over the whole training set with random partners.
        everything = torch.arange(samples)
        partner = everything[torch.randperm(samples, generator=generator)]
        lam = beta.sample((samples,))
        reference = banks["float32"].target(0, everything, partner, lam).probs
        with torch.no_grad():
            output = torch.softmax(model(lam[:, None] * features + (1 - lam[:, None]) * features[partner]), 1)
        kd_scale = kl_rows(reference, output).mean().item()
        accuracy = (model(features).argmax(1) == labels).float().mean().item()
        for layout, bank in banks.items():
            if layout == "float32":
                continue
            kl = kl_rows(reference, bank.target(0, everything, partner, lam).probs)
            rows.append(dict(source=name, classes=classes, layout=layout, kl_mean=kl.mean().item(),
                             kl_p99=kl.quantile(0.99).item(), kl_max=kl.max().item(), kd_loss=kd_scale,
                             train_accuracy=accuracy, epochs=epochs))
    return rows


def kl_rows(p: Tensor, q: Tensor) -> Tensor:
    """KL(p || q) per row in nats, with 0 log 0 = 0."""
    p, q = p.double(), q.double()
    terms = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log()), 0.0)
    return terms.sum(1)


def print_topk(rows: List[dict]) -> None:
    print_table(
        rows,
        [("source", "source", "<"), ("layout", "layout", "<"), ("mean KL", "kl_mean", ".2e"),
         ("p99 KL", "kl_p99", ".2e"), ("max KL", "kl_max", ".2e"), ("KD loss", "kd_loss", ".3f"),
         ("train acc", "train_accuracy", ".3f")],
        "Error of compact layouts on training outputs: KL(target_float32 || target_layout), nats",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run")
    parser.add_argument("--json", default=os.path.join(HERE, "out", "bank.json"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--max-measure-gb", type=float, default=4.0,
                        help="allocate banks up to this size to measure them (default 4)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"{device}: {device_report(device)}")
    memory = memory_rows(args.quick, args.max_measure_gb)
    print_memory(memory)
    speed = [row for device in devices for row in speed_rows(device, args.quick)]
    print_speed(speed)
    fused = fused_rows(args.quick)
    print_fused(fused)
    topk = topk_error_rows(args.quick)
    print_topk(topk)

    write_json(args.json, {"quick": args.quick, "memory": memory, "speed": speed, "fused": fused, "topk_error": topk})


if __name__ == "__main__":
    main()
