"""What every benchmark script needs: the device report, a median timer, JSON output, a table.

Used by every script in ``benchmarks/``.

A script run as ``python benchmarks/bench_x.py`` has ``benchmarks/`` on ``sys.path`` and imports
this module as ``import _common``. Timing uses public tools only: ``time.perf_counter`` with
``torch.cuda.synchronize`` around CUDA work, and CUDA events for back-to-back calls.
"""

from __future__ import annotations

import datetime
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Tuple, Union

import torch

__all__ = [
    "device_name", "device_report", "synchronize", "median_time", "loop_time", "write_json", "print_table",
]

Device = Union[str, torch.device]
# (header, row key or function of the row, format spec); a spec starting with "<" left-aligns.
Column = Tuple[str, Union[str, Callable[[Mapping[str, Any]], Any]], str]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: Device) -> str:
    """The hardware behind ``device``: the GPU's name, or the CPU model and torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({torch.get_num_threads()} threads)"


def device_report(device: Device) -> str:
    """``device_name(device)`` and the torch version, e.g. "NVIDIA H100 80GB HBM3; torch 2.5.1"."""
    return f"{device_name(device)}; torch {torch.__version__}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(fn: Callable[[], Any], device: torch.device, calls: int, seconds: float = 0.25) -> None:
    """Call ``fn()`` at least ``calls`` times and, unless ``calls`` is 0, for at least ``seconds``.

    A fixed count of warm-up calls is not enough for sub-millisecond calls: caches, the
    allocator and the clock frequency settle over a fraction of a second, and the first cell of
    a table came out up to 1.6x slow without this.
    """
    start = time.perf_counter()
    done = 0
    while done < calls or (calls > 0 and time.perf_counter() - start < seconds):
        fn()
        done += 1
    synchronize(device)


def median_time(fn: Callable[[], Any], device: Device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls, after :func:`warm_up`.

    On CUDA the device is synchronised before the clock starts and after every call, so the
    time covers the queued kernels, not just their launch.
    """
    device = torch.device(device)
    warm_up(fn, device, warmup)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def loop_time(fn: Callable[[], Any], device: Device, repeats: int, calls: int = 20, warmup: int = 2) -> float:
    """Median time per call in milliseconds of ``calls`` back-to-back calls of ``fn()``.

    The throughput of a training loop: no synchronisation between the calls, so the host
    queues the next call while the GPU runs the last one. On CUDA two events, recorded before
    the first and after the last call, time each batch of ``calls``; on the CPU the wall clock.
    The median is over ``repeats`` batches.
    """
    device = torch.device(device)
    warm_up(fn, device, warmup)
    times = []
    for _ in range(repeats):
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
        else:
            start_time = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append(1e3 * (time.perf_counter() - start_time) / calls)
    return statistics.median(times)


def write_json(path: Union[str, Path], payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as JSON to ``path`` (parent folders created), under an ``environment``
    entry recording the devices, torch version, date and command line, then print the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    environment = {
        "cpu": device_name("cpu"),
        "cuda": device_name("cuda") if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python"] + sys.argv),
    }
    path.write_text(json.dumps({"environment": environment, **payload}, indent=2))
    print(f"wrote {path}")


def _cell(row: Mapping[str, Any], column: Column) -> str:
    _, value, spec = column
    value = value(row) if callable(value) else row.get(value)
    return "-" if value is None else format(value, spec.lstrip("<"))


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], title: str = "") -> None:
    """Print ``rows`` (dicts) as a table: a header, a rule, one line per row; ``None`` prints "-".

    Columns are as wide as their widest cell; numbers align right, a column whose spec starts
    with "<" aligns left.
    """
    cells = [[_cell(row, column) for column in columns] for row in rows]
    headers = [column[0] for column in columns]
    widths = [max([len(header)] + [len(line[i]) for line in cells]) for i, header in enumerate(headers)]
    aligns = ["<" if column[2].startswith("<") else ">" for column in columns]

    def line(texts: Sequence[str]) -> str:
        return "  ".join(f"{text:{align}{width}}" for text, align, width in zip(texts, aligns, widths)).rstrip()

    if title:
        print(f"\n{title}")
    header = line(headers)
    print(header)
    print("-" * len(header))
    for texts in cells:
        print(line(texts))
