"""Cost of MKF's depth sub-networks relative to the full network.

For every group of :class:`mkfkit.depth.DepthSampler` (0 = full network) this measures the
average fraction of residual blocks that run, and the median time of a forward pass (eval mode,
no_grad) and of a training forward + backward. Each sampled sub-network is timed alternately
with the full network (paired, so drift in the machine's speed cancels); the ratio column is
the median over the draws of sub / full. Dropped blocks are not computed, so a sub-network must
be cheaper than the full one (drop-path code that computes a block and then zeroes it stays
at ratio 1).

Models: the CIFAR ResNet-56 of :mod:`mkfkit.models` on 32x32 images, and torchvision's
ResNet-50 on 224x224 images (64x64 with ``--quick``) when torchvision is installed. Devices: CPU, and CUDA when available.

Usage::

    python benchmarks/bench_depth.py            # full run
    python benchmarks/bench_depth.py --quick    # a short run
    python benchmarks/bench_depth.py --json benchmarks/out/depth.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Callable, Dict, List

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import device_name, device_report, median_time, print_table, write_json  # noqa: E402

from mkfkit.depth import DepthSampler  # noqa: E402
from mkfkit.models import ResNet  # noqa: E402


def build_models(quick: bool) -> Dict[str, tuple]:
    """name -> (model factory, input shape)."""
    models = {"cifar-resnet56": (lambda: ResNet(num_classes=100, blocks=(9, 9, 9)), (3, 32, 32))}
    try:
        import torchvision
    except ImportError:
        print("torchvision not installed: skipping ResNet-50")
    else:
        size = 64 if quick else 224
        models["tv-resnet50"] = (
            lambda: torchvision.models.resnet50(num_classes=1000),
            (3, size, size),
        )
    return models


def paired_times(fn: Callable[[], None], sampler: DepthSampler, subnet, device: str, repeats: int):
    """Median times (ms) of ``fn`` on the full network and on ``subnet``, one call of each in turn."""
    full, sub = [], []
    for i in range(repeats + 1):  # the first round warms both up
        with sampler.full():
            t_full = median_time(fn, device, repeats=1, warmup=0)
        with sampler.apply(subnet):
            t_sub = median_time(fn, device, repeats=1, warmup=0)
        if i > 0:
            full.append(t_full)
            sub.append(t_sub)
    return statistics.median(full), statistics.median(sub)


def bench_model(
    name: str, factory: Callable[[], nn.Module], shape: tuple, device: str, args: argparse.Namespace
) -> List[dict]:
    torch.manual_seed(0)
    model = factory().to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    sampler = DepthSampler.from_model(model, num_groups=args.groups, seed=0)
    batch = args.batch_cuda if device == "cuda" else args.batch_cpu
    if name == "tv-resnet50" and device == "cpu":
        batch = max(batch // 8, 1)
    x = torch.randn(batch, *shape, device=device)
    if device == "cuda":
        x = x.to(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (batch,), device=device)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), target).backward()

    keys = (
        "fraction",
        "forward_full",
        "forward_sub",
        "forward_ratio",
        "train_full",
        "train_sub",
        "train_ratio",
    )
    per_group: Dict[int, Dict[str, list]] = {g: {k: [] for k in keys} for g in range(args.groups)}
    for _ in range(args.cycles * args.groups):
        subnet = sampler.draw()
        record = per_group[subnet.group]
        record["fraction"].append(subnet.active_fraction)
        for mode, fn, training in (("forward", forward, False), ("train", train_step, True)):
            model.train(training)
            full_ms, sub_ms = paired_times(fn, sampler, subnet, device, args.repeats)
            record[f"{mode}_full"].append(full_ms)
            record[f"{mode}_sub"].append(sub_ms)
            record[f"{mode}_ratio"].append(sub_ms / full_ms)
    rows = []
    for group, record in per_group.items():
        row = {
            "model": name,
            "device": device,
            "device_name": device_name(device),
            "batch": batch,
            "input": list(shape),
            "blocks": len(sampler.blocks),
            "group": group,
            "draws": len(record["fraction"]),
            "active_fraction": statistics.mean(record["fraction"]),
        }
        for mode in ("forward", "train"):
            row[f"{mode}_ms"] = statistics.median(record[f"{mode}_sub"])
            row[f"{mode}_full_ms"] = statistics.median(record[f"{mode}_full"])
            row[f"{mode}_ratio"] = statistics.median(record[f"{mode}_ratio"])
        rows.append(row)
    return rows


def print_rows(rows: List[dict]) -> None:
    print_table(
        rows,
        [("model", "model", "<"), ("device", "device", "<"), ("batch", "batch", ""), ("group", "group", ""),
         ("active", "active_fraction", ".3f"), ("fwd ms", "forward_ms", ".2f"), ("full ms", "forward_full_ms", ".2f"),
         ("ratio", "forward_ratio", ".3f"), ("train ms", "train_ms", ".2f"), ("full ms", "train_full_ms", ".2f"),
         ("ratio", "train_ratio", ".3f")],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--json", default=os.path.join(HERE, "out", "depth.json"))
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--groups", type=int, default=3)
    args = parser.parse_args()
    args.cycles = 1 if args.quick else 5
    args.repeats = 2 if args.quick else 5
    args.batch_cpu = 8 if args.quick else 64
    args.batch_cuda = 128 if args.quick else 256
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    if devices and devices[-1] == "cuda":
        torch.backends.cudnn.benchmark = True

    for device in devices:
        print(f"{device}: {device_report(device)}")
    print(
        "DepthSampler defaults (drop_rate=0.25, growth=4, max_drop_fraction=0.5), "
        f"num_groups={args.groups}"
    )
    rows: List[dict] = []
    for device in devices:
        for name, (factory, shape) in build_models(args.quick).items():
            rows += bench_model(name, factory, shape, device, args)
    print_rows(rows)
    write_json(args.json, {"quick": args.quick, "rows": rows})


if __name__ == "__main__":
    main()
