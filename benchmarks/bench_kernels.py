"""Fused Triton kernels: registers, spills, occupancy and traffic floor of every launch (issue 28).

No GPU needed: every launch configuration the launch rules of ``mkfkit/kernels/`` choose over
a grid of shapes (B = 1 to 65,536, C = 1 to 32,769, every dtype the kernels accept) is compiled
ahead of time for sm_80 and sm_90 with Triton's compiler (``mkfkit.kernels._resources``), and

1. **per configuration**: registers a thread and bytes spilled (``ptxas -v``) on each target,
   shared memory, and the programs (and warps) one SM holds at once, by registers, shared
   memory and warp slots (static occupancy), on an H100 SXM (sm_90) and an A100 80GB (sm_80);
2. **per shape** (float32 at the sizes of the other benchmarks, or ``--shapes``): programs a
   launch, warps resident per SM in a full wave, bytes read and written at the least, and the
   traffic floor (those bytes at the GPU's peak bandwidth: H100 SXM 3.35 TB/s, A100 80GB
   2.0 TB/s, from NVIDIA's datasheets). Where the floor exceeds a launch's cost (about 4 us),
   the launch rule should fill the GPU: a program on every SM and at least a quarter of the
   warp slots (16 of 64); the table says where it does, and the JSON lists every shape of the
   grid where it does not.

``--device cuda`` also times each launch of those shapes (20 back-to-back calls between CUDA
events, median of the repeats) and prints the achieved bandwidth against the floor. It needs
a CUDA device (an error otherwise).

Usage::

    python benchmarks/bench_kernels.py                      # the whole grid, both targets
    python benchmarks/bench_kernels.py --shapes 512x10 512x100 512x1000 512x21843
    python benchmarks/bench_kernels.py --device cuda --json benchmarks/out/kernels.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import sys
import time
from typing import Dict, List, Sequence, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import device_report, loop_time, print_table, write_json  # noqa: E402

from mkfkit.kernels import _resources  # noqa: E402

BATCHES = [2 ** k for k in range(17)]
CLASSES = sorted({2 ** k for k in range(16)} | {2 ** k + 1 for k in range(16)} | {10, 100, 1000, 21843})
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
REPORT_SHAPES = [(b, c) for b in (256, 4096, 65536) for c in (10, 100, 1000, 21843)]
# What a launch costs before any byte moves (host launch and grid start), in seconds.
LAUNCH_COST = 4e-6
# Peak HBM bandwidth by device name, for --device cuda (datasheets: H200 4.8, H100 SXM 3.35,
# H100 PCIe 2.0, A100 80GB 2.0 TB/s); first match wins.
BANDWIDTHS = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12)]


def parse_shape(text: str) -> Tuple[int, int]:
    batch, _, classes = text.partition("x")
    return int(batch), int(classes)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tile(launch: _resources.Launch) -> str:
    """The launch configuration in a few characters: rows x block (chunked), or the block."""
    constexprs = dict(launch.constexprs)
    if "ROWS" in constexprs:
        chunked = "" if constexprs["SINGLE_BLOCK"] else " chunked"
        return f"{constexprs['ROWS']} x {constexprs['BLOCK']}{chunked}"
    return str(constexprs["BLOCK"])


def build_all(configs: Sequence[tuple], jobs: int) -> Dict[Tuple[tuple, int], _resources.Resources]:
    """Every configuration built for every target, by ``jobs`` forked processes (compiling is
    single-threaded; forking keeps the imports)."""
    pairs = [(config, arch) for config in configs for arch in _resources.ARCHS]
    if jobs == 1:
        return {pair: _resources.build(*pair) for pair in pairs}
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        return dict(zip(pairs, pool.map(_resources.build, *zip(*pairs), chunksize=4)))


def fills(launch: _resources.Launch, resources: _resources.Resources, gpu: _resources.GPU) -> dict:
    """Programs, resident warps per SM in a full wave, the floor and whether the rule holds."""
    read, written = _resources.traffic(launch)
    floor = (read + written) / gpu.bandwidth
    # Programs resident at once, spread over the SMs (the first wave), in warps per SM.
    resident = min(_resources.occupancy(resources, gpu) * gpu.sms, launch.grid)
    warps = resident * resources.num_warps / gpu.sms
    needed = floor > LAUNCH_COST
    holds = launch.grid >= gpu.sms and 4 * warps >= gpu.warps_per_sm
    return dict(floor_us=1e6 * floor, warps_per_sm=warps, rule=None if not needed else holds)


def config_rows(configs, built, served) -> List[dict]:
    rows = []
    for config, launch in configs.items():
        row = dict(call=launch.name, dtype=dtype_name(launch.dtype), tile=tile(launch),
                   warps=launch.num_warps, shapes=served[config])
        for gpu in _resources.GPUS:
            resources = built[config, gpu.arch]
            row.update({
                f"sm{gpu.arch}_registers": resources.registers,
                f"sm{gpu.arch}_spilled": resources.spill_stores + resources.spill_loads,
                f"sm{gpu.arch}_stack": resources.stack,
                f"sm{gpu.arch}_shared": resources.shared,
                f"sm{gpu.arch}_stages": resources.num_stages,
                f"sm{gpu.arch}_programs_per_sm": _resources.occupancy(resources, gpu),
                f"sm{gpu.arch}_warps_per_sm": _resources.occupancy(resources, gpu) * resources.num_warps,
            })
        rows.append(row)
    return rows


def shape_row(launch: _resources.Launch, built) -> dict:
    read, written = _resources.traffic(launch)
    row = dict(call=launch.name, batch=launch.shape[0], classes=launch.shape[1],
               dtype=dtype_name(launch.dtype), tile=tile(launch), warps=launch.num_warps,
               programs=launch.grid, read_mb=read / 1e6, written_mb=written / 1e6)
    for gpu in _resources.GPUS:
        for key, value in fills(launch, built[launch.config, gpu.arch], gpu).items():
            row[f"sm{gpu.arch}_{key}"] = value
    return row


def rule_text(value) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def time_launches(shapes: Sequence[Tuple[int, int]], device: torch.device, repeats: int) -> List[dict]:
    """Achieved bandwidth of each launch of ``shapes`` (float32) on ``device``."""
    name = torch.cuda.get_device_name(device)
    bandwidth = next((value for key, value in BANDWIDTHS if key in name), None)
    rows = []
    for batch, classes in shapes:
        launches = _resources.launches(batch, classes, torch.float32)
        for launch, (call_name, call) in zip(launches, _resources.calls(batch, classes, torch.float32, device)):
            seconds = 1e-3 * loop_time(call, device, repeats)
            moved = sum(_resources.traffic(launch))
            floor = None if bandwidth is None else moved / bandwidth
            rows.append(dict(call=call_name, batch=batch, classes=classes, time_us=1e6 * seconds,
                             achieved_tb_s=moved / seconds / 1e12,
                             floor_us=None if floor is None else 1e6 * floor,
                             of_floor=None if floor is None else floor / seconds))
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, metavar="BxC",
                        help="only these shapes, every dtype (default: the whole grid)")
    parser.add_argument("--dtypes", nargs="+", default=[dtype_name(dtype) for dtype in DTYPES],
                        choices=[dtype_name(dtype) for dtype in DTYPES])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: also time the launches of the reported shapes")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=os.cpu_count(),
                        help="compile in this many processes (default: one per CPU)")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_kernels.py: --device cuda times the kernels with CUDA events, but this "
                 "machine has no CUDA device; run without --device for the compiled figures")
    reason = _resources.unavailable()
    if reason is not None:
        sys.exit(f"bench_kernels.py: cannot build the kernels ahead of time: {reason}")
    import triton

    grid = args.shapes or [(b, c) for b in BATCHES for c in CLASSES]
    reported = args.shapes or REPORT_SHAPES
    start = time.perf_counter()
    configs: Dict[tuple, _resources.Launch] = {}
    served: Dict[tuple, int] = {}
    every = []
    dtypes = [getattr(torch, name) for name in args.dtypes]
    for dtype in dtypes:
        for batch, classes in grid:
            for launch in _resources.launches(batch, classes, dtype):
                configs.setdefault(launch.config, launch)
                served[launch.config] = served.get(launch.config, 0) + 1
                every.append(launch)
    built = build_all(list(configs), args.jobs)
    seconds = time.perf_counter() - start
    print(f"{device_report('cpu')}; triton {triton.__version__}: {len(configs)} configurations "
          f"of {len(grid)} shapes x {len(dtypes)} dtypes, compiled for "
          f"{', '.join(f'sm_{arch}' for arch in _resources.ARCHS)} in {seconds:.0f} s")

    configurations = config_rows(configs, built, served)
    columns = [("call", "call", "<"), ("dtype", "dtype", "<"), ("rows x block", "tile", "<"),
               ("warps", "warps", "d")]
    for gpu in sorted(_resources.GPUS, key=lambda gpu: gpu.arch):
        columns += [(f"regs {gpu.arch}", f"sm{gpu.arch}_registers", "d"),
                    (f"spill {gpu.arch}", f"sm{gpu.arch}_spilled", "d")]
    columns += [("smem B", "sm90_shared", "d"), ("warps/SM A100", "sm80_warps_per_sm", "d"),
                ("warps/SM H100", "sm90_warps_per_sm", "d"), ("shapes", "shapes", "d")]
    print_table(configurations, columns,
                "Per configuration: registers a thread and bytes spilled (stores + loads) on "
                "sm_80 / sm_90, shared memory, resident warps per SM (of 64) by static occupancy")

    shapes = [shape_row(launch, built) for launch in every]
    report = [row for row in shapes if row["dtype"] == "float32" and (row["batch"], row["classes"]) in reported]
    columns = [("call", "call", "<"), ("B", "batch", "d"), ("C", "classes", "d"),
               ("rows x block", "tile", "<"), ("warps", "warps", "d"), ("programs", "programs", "d"),
               ("MB read", "read_mb", ".2f"), ("MB written", "written_mb", ".2f")]
    for gpu in _resources.GPUS:
        short = gpu.name.split()[0]
        columns += [(f"floor us {short}", f"sm{gpu.arch}_floor_us", ".2f"),
                    (f"warps/SM {short}", f"sm{gpu.arch}_warps_per_sm", ".1f"),
                    (f"fills {short}", lambda row, arch=gpu.arch: rule_text(row[f"sm{arch}_rule"]), "<")]
    print_table(report, columns,
                f"Per shape, float32: the traffic floor at peak bandwidth; where it exceeds "
                f"{1e6 * LAUNCH_COST:.0f} us, whether the grid fills every SM with at least 16 warps")

    spilled = [row for row in configurations if row["sm80_spilled"] or row["sm90_spilled"]]
    unfilled = [row for row in shapes if False in (row["sm80_rule"], row["sm90_rule"])]
    needed = sum(1 for row in shapes if row["sm80_rule"] is not None or row["sm90_rule"] is not None)
    print(f"\n{len(spilled)} of {len(configurations)} configurations spill; the grid fills the GPU "
          f"in {needed - len(unfilled)} of the {needed} launches whose floor exceeds the launch cost")
    for row in unfilled[:12]:
        print(f"  not filled: {row['call']}, B = {row['batch']}, C = {row['classes']}, {row['dtype']}: "
              f"{row['programs']} programs, {row['sm90_warps_per_sm']:.1f} / {row['sm80_warps_per_sm']:.1f} "
              f"warps per SM (H100 / A100)")
    if len(unfilled) > 12:
        print(f"  ... and {len(unfilled) - 12} more (all in the JSON)")

    timed = []
    if args.device == "cuda":
        timed = time_launches(reported, torch.device("cuda"), args.repeats)
        print_table(timed, [("call", "call", "<"), ("B", "batch", "d"), ("C", "classes", "d"),
                            ("us", "time_us", ".1f"), ("TB/s", "achieved_tb_s", ".2f"),
                            ("floor us", "floor_us", ".1f"), ("of floor", "of_floor", ".0%")],
                    f"Achieved bandwidth, float32, on {device_report('cuda')}")

    if args.json:
        write_json(args.json, {
            "triton": triton.__version__,
            "gpus": [dict(vars(gpu)) for gpu in _resources.GPUS],
            "launch_cost_us": 1e6 * LAUNCH_COST,
            "configurations": configurations,
            "spilled": len(spilled),
            "unfilled": unfilled,
            "shapes": report,
            "timed": timed,
        })


if __name__ == "__main__":
    main()
