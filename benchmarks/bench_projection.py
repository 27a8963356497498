"""Benchmark of the three searches of the exact projection (mkfkit/_projection.py).

``project_box_simplex`` finds the segment of the row sum that reaches 1 (and so which coordinates
sit at a bound) by sorting the 2C breakpoints of every row (``search="sort"``), by evaluating
the row sum at every breakpoint (``search="table"``, Tensor[2B, 2C, C]) or by a fixed number of
safeguarded Newton passes (``search="newton"``); ``"auto"`` picks one by size and device. This
script times them side by side (the table only up to 2**24 entries), on the two kinds of rows
the library projects:

* ``qp``   -- the exact QP fraction's points and boxes (both sides of a batch, 2B rows);
* ``opt2`` -- raw OPT2 estimates projected onto the simplex (LinearFraction(), 2B rows),

for B (pairs) in {1, 8, 64, 256, 512} and C in {10, 32, 100, 300, 1000, 5000}, float32, and
prints the median time of each, the search ``"auto"`` takes and how much slower that is than
the faster of the two.

    python benchmarks/bench_projection.py --device cpu --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import device_report, median_time, print_table, write_json  # noqa: E402
from bench_fraction import TABLE_LIMIT, make_instance  # noqa: E402

from mkfkit import _projection  # noqa: E402
from mkfkit.fraction import _feasible_target, _qp_side, linear_fraction, side_weights  # noqa: E402

SEARCHES = ("sort", "table", "newton")


def boxes(kind: str, batch: int, num_classes: int, device: str):
    """Rows to project, as (v, lo, hi): Tensor[2B, C] each."""
    mixed, base_a, base_b, lam = (t.float() for t in make_instance(batch, num_classes, device))
    if kind == "qp":
        target, bases, weights = _feasible_target(mixed), torch.stack((base_a, base_b)), side_weights(lam).unsqueeze(-1)
        sides = [_qp_side(target, bases, weights, torch.full((len(lam), 1), side_a, device=lam.device)) for side_a in (True, False)]
        return torch.cat([side[0] for side in sides]), *torch.cat([side[1] for side in sides], 1)
    raw = linear_fraction(mixed, base_a, base_b, lam, project=False)
    v = torch.cat((raw.a, raw.b))
    return v, torch.zeros_like(v), torch.ones_like(v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per cell")
    parser.add_argument("--quick", action="store_true", help="few sizes")
    parser.add_argument("--json", default=str(HERE / "out" / "projection.json"), help="where to write the results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches, classes = ([8, 256], [10, 100, 1000]) if args.quick else ([1, 8, 64, 256, 512], [10, 32, 100, 300, 1000, 5000])
    print(f"{args.device}: {device_report(args.device)}")

    results = []
    for kind in ("qp", "opt2"):
        for num_classes in classes:
            for batch in batches:
                v, lo, hi = boxes(kind, batch, num_classes, args.device)
                row = {"rows": kind, "B": batch, "C": num_classes, "auto": _projection._pick_search(v, "auto")}
                for search in SEARCHES:
                    fits = search != "table" or 2 * v.numel() * num_classes <= TABLE_LIMIT
                    row[f"{search}_ms"] = median_time(
                        lambda: _projection.project_box_simplex(v, lo, hi, search=search), args.device, args.repeats
                    ) if fits else None
                row["auto_over_best"] = row[f"{row['auto']}_ms"] / min(row[f"{s}_ms"] for s in SEARCHES if row[f"{s}_ms"])
                results.append(row)
                print(f"[{kind}] B={batch:4d} C={num_classes:5d} "
                      + " ".join(f"{s}={row[f'{s}_ms'] or float('nan'):.3f} ms" for s in SEARCHES), flush=True)

    print_table(
        results,
        [("rows", "rows", "<"), ("B", "B", "d"), ("C", "C", "d")]
        + [(f"{search} (ms)", f"{search}_ms", ".3f") for search in SEARCHES]
        + [("auto", "auto", "<"), ("auto / best", "auto_over_best", ".2f")],
        title="Median time per projection of 2B rows (float32); auto = the search search='auto' takes",
    )
    write_json(args.json, {"settings": {"repeats": args.repeats, "device": args.device}, "results": results})


if __name__ == "__main__":
    main()
