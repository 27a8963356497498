"""Does training from a folder of images keep up with training from memory? Images per second
of ``train.py``'s batch loop, its images held in memory against decoded from their files.

The folder (``--data-dir``, as ``train.py --dataset folder`` reads it) is read once; then each
variant trains ``--batches`` baseline steps of ``--batch-size`` images (``train.py``'s
``train_step``, augmentation included) with the batches from ``epoch_batches``, as the batch loop
gets them: ``memory`` from the float32 tensor of the images, ``workers N`` decoded from the
files by N processes (0: by the training process). The variants run in turn, ``--rounds`` times,
and the medians are reported, twice:

* ``images/s (wall)``: what a user sees, but on a shared machine as noisy as the other jobs;
* ``images/s (CPU)``: images per second of CPU time of the training process and its decoding
  workers together, which other jobs disturb much less: on a machine with no core to spare for
  the workers, the throughput a run would get.

    python benchmarks/bench_folder.py --data-dir DIR [--widths 8 16 32] [--batches 40]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train  # noqa: E402
from _common import device_report, print_table, write_json  # noqa: E402
from image_folder import FolderImages  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the decoding workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, metavar="DIR", help="the folder of images")
    parser.add_argument("--widths", nargs="+", type=int, default=[8, 16, 32], metavar="C")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40, help="training steps per variant")
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2], metavar="N")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, metavar="PATH")
    options = parser.parse_args()
    torch.set_num_threads(1)
    args = train.parse_args(["--dataset", "folder", "--data-dir", options.data_dir, "--cache",
                             "none", "--methods", "baseline", "--device", "cpu", "--widths",
                             *map(str, options.widths), "--batch-size", str(options.batch_size)])
    data = train.load_data(args)
    streamed: FolderImages = data.train_images
    in_memory = streamed.load()
    run = train.build_run("baseline", 0, args, data)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data.train_labels), generator=generator)
    size = options.batch_size
    batches = [order[i * size : (i + 1) * size] for i in range(options.batches)]
    variants = {"memory": (in_memory, 0)}
    variants.update({f"workers {n}": (streamed, n) for n in options.workers})
    times: Dict[str, List[List[float]]] = {name: [] for name in variants}
    for _ in range(options.rounds):
        for name, (images, workers) in variants.items():
            wall, cpu = time.perf_counter(), cpu_seconds()
            # the loader first: its end joins the workers, whose CPU time is then counted
            for batch, indices in zip(train.epoch_batches(images, batches, workers), batches):
                batch = train.augment(batch, args, generator)
                train.train_step(run, batch, data.train_labels[indices], indices, args,
                                 len(batches))
            times[name].append([time.perf_counter() - wall, cpu_seconds() - cpu])
    count = len(batches) * size
    rows = [{"variant": name,
             "wall": count / statistics.median(wall for wall, _ in runs),
             "cpu": count / statistics.median(cpu for _, cpu in runs)} for name, runs in times.items()]
    for row in rows:
        row["wall_vs_memory"] = row["wall"] / rows[0]["wall"]
        row["cpu_vs_memory"] = row["cpu"] / rows[0]["cpu"]
    print_table(rows, [("variant", "variant", "<"), ("images/s (wall)", "wall", ".0f"),
                       ("x memory", "wall_vs_memory", ".3f"), ("images/s (CPU)", "cpu", ".0f"),
                       ("x memory ", "cpu_vs_memory", ".3f")],
                title=f"{options.data_dir}: {count} images per variant, median of "
                      f"{options.rounds} rounds")
    print(f"device: {device_report('cpu')}")
    if options.json:
        write_json(options.json, {"device": device_report("cpu"), "options": vars(options),
                                  "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
