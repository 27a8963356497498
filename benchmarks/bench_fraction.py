"""Benchmark of the knowledge-fraction strategies: speed and accuracy side by side.

Compares, on the same random instances (float32, value checks off while timing):

* ``opt2_raw``   -- the paper's OPT2 formula (LinearFraction(project=False))
* ``opt2_proj``  -- OPT2 projected onto the simplex (LinearFraction(), the default)
* ``exact``      -- the exact QP in closed form, plain torch (QPFraction(backend="torch")), its
  projection's search chosen by ``"auto"``
* ``exact_sort`` / ``exact_table`` / ``exact_newton`` -- the same with each search of the
  projection in turn (mkfkit/_projection.py; the table only up to 2**24 entries)
* ``triton``     -- the exact QP as a fused Triton kernel (when mkfkit.kernels.available)
* ``cvx_scs`` / ``cvx_clarabel`` -- the same QP through cvxpylayers (the paper's route)

for B in {64, 256, 512} and C in {10, 100, 1000}, forward and forward+backward, on CPU and CUDA.
Times are medians; ratios are to OPT2 (raw) and to the exact QP (``exact``). Two timings per cell: "sync"
synchronises the device around every call (latency of one call, launch overhead included);
"loop" times 20 back-to-back calls between two CUDA events (throughput in a training loop,
where the host queues the next call while the GPU runs). cvxpylayers gets the "sync" timing
only. Accuracy: max |error| of each strategy's (a, b) against the exact QP solved in float64,
and the share of raw OPT2 rows that leave [0, 1].

CPU threads: torch and cvxpylayers use the same number, ``--threads`` (default: torch's, all
cores). cvxpylayers solves the rows of a batch in parallel on that many threads (diffcp's
``n_jobs_forward``/``n_jobs_backward``); torch parallelises inside its operations.

    python benchmarks/bench_fraction.py --quick            # a short run
    python benchmarks/bench_fraction.py --device cpu       # the full grid on one device
    python benchmarks/bench_fraction.py --device cpu --threads 1   # one core each
    python benchmarks/bench_fraction.py --device cpu --batches 64 --classes 10 --repeats 100
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import device_report, loop_time, median_time, print_table, write_json  # noqa: E402

import mkfkit  # noqa: E402
from mkfkit import _projection  # noqa: E402
from mkfkit.fraction import LinearFraction, QPFraction  # noqa: E402

TABLE_LIMIT = 2**24  # entries of the table search's Tensor[2B, 2C, C] worth timing


class ExactBySearch(QPFraction):
    """The exact QP in torch with its projection's search fixed to ``search`` (one of the
    ``_projection`` searches) instead of chosen by ``"auto"``."""

    def __init__(self, search: str) -> None:
        super().__init__(backend="torch")
        self.search = search

    def forward(self, mixed, base_a, base_b, lam):
        # The choice has one owner, _projection._pick_search: stand in for it during the call.
        pick = _projection._pick_search
        _projection._pick_search = lambda v, search: self.search
        try:
            return super().forward(mixed, base_a, base_b, lam)
        finally:
            _projection._pick_search = pick

    def extra_repr(self) -> str:
        return f"search={self.search!r}"


def make_instance(batch, num_classes, device, seed=0):
    """Mixed pairs with bases near the truth; lam ~ U(0, 1). float32 on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    truth_a = torch.softmax(2 * torch.randn(batch, num_classes, generator=generator, dtype=torch.float64), -1)
    truth_b = torch.softmax(2 * torch.randn(batch, num_classes, generator=generator, dtype=torch.float64), -1)
    noise = lambda: torch.softmax(torch.randn(batch, num_classes, generator=generator, dtype=torch.float64), -1)  # noqa: E731
    base_a, base_b = 0.7 * truth_a + 0.3 * noise(), 0.7 * truth_b + 0.3 * noise()
    lam = torch.rand(batch, generator=generator, dtype=torch.float64)
    mixed = lam[:, None] * truth_a + (1 - lam[:, None]) * truth_b
    return [t.to(device) for t in (mixed, base_a, base_b, lam)]


def triton_status(device: str) -> tuple[bool, str]:
    from mkfkit import kernels

    if not kernels.available(torch.device(device)):
        return False, f"Triton not available on {device}"
    return True, ""


def run_strategy(strategy, inputs, backward: bool):
    mixed = inputs[0].detach().requires_grad_(backward)
    out = strategy(mixed, *inputs[1:])
    if backward:
        (out.a.sum() + (out.b * out.b).sum()).backward()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few sizes, few repeats")
    parser.add_argument("--device", default="all", help="cpu, cuda, or all (default: cpu and cuda when present)")
    parser.add_argument("--json", default=str(HERE / "out" / "fraction.json"), help="where to write the results")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per cell (default 20, quick 5)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes B (default 64 256 512)")
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="class counts C (default 10 100 1000)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both (torch default)")
    parser.add_argument("--skip-cvxpylayers", action="store_true", help="leave out the cvxpylayers columns")
    parser.add_argument(
        "--cvx-budget",
        type=float,
        default=None,
        help="skip a cvxpylayers cell whose estimated time per call exceeds this many seconds "
        "(estimated from the smallest batch of the same C; default 20, quick 5)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    batches, classes = ([64, 256], [10, 100]) if args.quick else ([64, 256, 512], [10, 100, 1000])
    batches, classes = args.batches or batches, args.classes or classes
    repeats = args.repeats or (5 if args.quick else 20)
    cvx_repeats = 1 if args.quick else 2
    cvx_budget = args.cvx_budget if args.cvx_budget is not None else (5.0 if args.quick else 20.0)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "all" else [args.device]

    strategies = {
        "opt2_raw": LinearFraction(project=False),
        "opt2_proj": LinearFraction(),
        "exact": QPFraction(backend="torch"),
        **{f"exact_{search}": ExactBySearch(search) for search in ("sort", "table", "newton")},
    }
    cvx = {}
    if args.skip_cvxpylayers:
        print("cvxpylayers: skipped (--skip-cvxpylayers)")
    else:
        try:
            import cvxpylayers  # noqa: F401

            from mkfkit.reference import CvxpyQPFraction

            jobs = {"n_jobs_forward": threads, "n_jobs_backward": threads}
            cvx = {
                f"cvx_{conic.lower()}": CvxpyQPFraction(conic_solver=conic, solver_args=jobs)
                for conic in ("SCS", "CLARABEL")
            }
        except ImportError:
            print("cvxpylayers: skipped (not installed; pip install mkfkit[qp])")

    settings = {"quick": args.quick, "repeats": repeats, "cvxpylayers_repeats": cvx_repeats, "threads": threads}
    for device in devices:
        print(f"{device}: {device_report(device)}")
    results = []
    warnings.simplefilter("ignore")  # cvxpylayers/cvxpy chatter
    for device in devices:
        usable, reason = triton_status(device)
        device_strategies = dict(strategies)
        if usable:
            device_strategies["triton"] = QPFraction(backend="triton")
        else:
            print(f"[{device}] triton column skipped: {reason}")
        per_row = {}  # (C, backward, name) -> seconds per row measured at the smallest B
        for num_classes in classes:
            for batch in batches:
                inputs = make_instance(batch, num_classes, device)
                reference = strategies["exact_sort"](*inputs)  # float64 exact solution, by the sort
                inputs32 = [t.float() for t in inputs]
                raw = strategies["opt2_raw"](*inputs32)
                leaving = float(((raw.a < 0) | (raw.a > 1)).any(-1).float().mean())
                row = {"device": device, "B": batch, "C": num_classes, "opt2_rows_leaving_01": leaving}
                with mkfkit.value_checks(False):
                    for name, strategy in {**device_strategies, **cvx}.items():
                        if name == "exact_table" and 2 * (2 * batch) * num_classes**2 > TABLE_LIMIT:
                            continue
                        if name in cvx:  # build (and cache) the layer for this C outside the timing
                            strategy(*(t[:1] for t in inputs32))
                        latest = {}  # the last call's output, for the accuracy columns
                        for backward in (False, True):
                            mode = "fwdbwd" if backward else "fwd"
                            key = f"{name}_{mode}_s"
                            if name in cvx:
                                estimate = per_row.get((num_classes, backward, name), 0.0) * batch
                                if estimate > cvx_budget:
                                    print(f"[{device}] {name} B={batch} C={num_classes} {mode}: skipped, "
                                          f"estimated {estimate:.0f} s per call > --cvx-budget {cvx_budget:g} s")
                                    row[key] = None
                                    continue
                            seconds = 1e-3 * median_time(
                                lambda: latest.update(out=run_strategy(strategy, inputs32, backward)),
                                device,
                                cvx_repeats if name in cvx else repeats,
                                warmup=0 if name in cvx else 2,
                            )
                            per_row.setdefault((num_classes, backward, name), seconds / batch)
                            row[key] = seconds
                            if name not in cvx:
                                row[f"{name}_{mode}_loop_s"] = 1e-3 * loop_time(
                                    lambda: run_strategy(strategy, inputs32, backward), device, repeats
                                )
                        if latest:
                            out = latest["out"]
                            row[f"{name}_max_err"] = max(
                                float((out.a.double() - reference.a).abs().max()),
                                float((out.b.double() - reference.b).abs().max()),
                            )
                results.append(row)
                print_row(row, list(device_strategies) + list(cvx))
    print_tables(results, list(strategies) + ["triton"] + list(cvx))
    write_json(args.json, {"settings": settings, "results": results})


def print_row(row, names) -> None:
    cells = [f"{name}={row.get(f'{name}_fwd_s') or float('nan'):.2e}s" for name in names]
    print(f"[{row['device']}] B={row['B']:4d} C={row['C']:5d} fwd: " + " ".join(cells), flush=True)


def print_tables(results, names) -> None:
    def fmt_ms(value):
        return "-" if value is None else f"{value * 1e3:9.3f}"

    def ratio(value, base):
        return "-" if value is None or not base else f"{value / base:8.1f}x"

    def timing(name, key):
        def cell(r):
            value = r.get(f"{name}_{key}")
            base, exact = r.get(f"opt2_raw_{key}"), r.get(f"exact_{key}")
            return f"{fmt_ms(value)} {ratio(value, base)} {ratio(value, exact)}"

        return cell

    instance = [("device", "device", "<"), ("B", "B", ""), ("C", "C", "")]
    timings = {"s": "synchronised around every call", "loop_s": "20 calls back to back, no sync"}
    for suffix, how in timings.items():
        for mode in ("fwd", "fwdbwd"):
            key = f"{mode}_{suffix}"
            present = [n for n in names if any(r.get(f"{n}_{key}") is not None for r in results)]
            print_table(
                results,
                instance + [(n, timing(n, key), "") for n in present],
                f"Median time per call in ms ({'forward' if mode == 'fwd' else 'forward + backward'}; "
                f"{how}); ratio to OPT2 raw / to exact QP",
            )
    present = [n for n in names if any(f"{n}_max_err" in r for r in results)]
    print_table(
        results,
        instance + [("OPT2 rows out", "opt2_rows_leaving_01", ".1%")] + [(n, f"{n}_max_err", ".2e") for n in present],
        "Accuracy: max |error| vs the exact QP in float64 (inputs float32); share of raw OPT2 rows leaving [0, 1]",
    )


if __name__ == "__main__":
    main()
