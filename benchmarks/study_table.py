"""Summarise the runs of benchmarks/study.sh: one row per configuration of a phase.

    python benchmarks/study_table.py benchmarks/study/final [--json OUT]

Every configuration's runs (one JSON of train.py per seed, in PHASE/NAME-sSEED/ or PHASE/NAME/)
are gathered; the table gives the last epoch's top-1 mean and sample standard deviation over
the seeds, the difference to the baseline's mean (``wide-*`` configurations to
``wide-baseline``'s), the full network's training accuracy (the
generalisation gap), and the diagnostics of the last epoch (means over seeds). The methods
that train several networks (KD-ATFF and its controls) get a second table: the ensemble's top-1
and its lead over the best branch, the loss terms, the branches' disagreement, and the cost of
what is deployed (branch 0 alone, and the whole ensemble) with the time per epoch against the
baseline's.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Collection, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

# Of the last epoch, means over seeds: MKF's (kd, knowledge_age, fraction_l1) and the
# multi-network methods' (train.py's accuracies and PER_STEP_DIAGNOSTICS).
DIAGNOSTICS = ("kd", "knowledge_age", "fraction_l1", "ce", "teacher_ce", "attention",
               "disagreement_kl", "disagreement_top1", "ensemble_top1", "ensemble_minus_best_branch")


def gather(phase: Path) -> Dict[str, List[Dict[str, Any]]]:
    """Finished runs by configuration name (a trailing ``-sN`` seed suffix is dropped)."""
    configurations: Dict[str, List[Dict[str, Any]]] = {}
    for path in sorted(phase.glob("*/train_*.json")):
        name = re.sub(r"-s\d+$", "", path.parent.name)
        configurations.setdefault(name, []).extend(json.loads(path.read_text())["runs"])
    return configurations


def summarise(configurations: Dict[str, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    rows = []
    for name, runs in configurations.items():
        top1 = [run["top1"] for run in runs]
        last = [run["history"][-1] for run in runs]
        row = {"configuration": name, "seeds": len(runs),
               "top1_mean": statistics.mean(top1),
               "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
               "train_top1": statistics.mean(entry["train_top1"] for entry in last),
               "seconds_per_epoch": statistics.mean(run["seconds_per_epoch"] for run in runs)}
        for key in DIAGNOSTICS:
            values = [entry[key] for entry in last if key in entry]
            row[key] = statistics.mean(values) if values else None
        for network in ("single", "ensemble"):  # the same in every seed: the architecture's
            costs = [run["deployment"][network] for run in runs if "deployment" in run]
            row[f"{network}_parameters"] = costs[0]["parameters"] if costs else None
            row[f"{network}_mflops"] = costs[0]["flops"] / 1e6 if costs else None
        rows.append(row)
    by_name = {row["configuration"]: row for row in rows}
    for row in rows:
        baseline = by_name.get(baseline_of(row["configuration"], by_name))
        row["vs_baseline"] = None if baseline is None else row["top1_mean"] - baseline["top1_mean"]
        row["time_vs_baseline"] = (None if baseline is None else
                                   row["seconds_per_epoch"] / baseline["seconds_per_epoch"])
    return rows


def baseline_of(name: str, names: Collection[str]) -> Optional[str]:
    """The baseline a configuration is compared with: ``PREFIX-baseline`` for the longest prefix
    of ``name`` that has one (``wide-mix-only`` -> ``wide-baseline``), else ``baseline``; None
    when there is neither."""
    parts = name.split("-")
    for cut in range(len(parts) - 1, -1, -1):
        candidate = "-".join(parts[:cut] + ["baseline"])
        if candidate in names:
            return candidate
    return None


TABLE = [
    ("configuration", "configuration", "<"),
    ("seeds", "seeds", "d"),
    ("top-1 (%)", lambda row: f"{row['top1_mean']:.2f} ± {row['top1_std']:.2f}", ""),
    ("vs baseline", "vs_baseline", "+.2f"),
    ("train top-1", "train_top1", ".2f"),
    ("KD term", "kd", ".3f"),
    ("knowledge age", "knowledge_age", ".0f"),
    ("fraction L1", "fraction_l1", ".3f"),
    ("s/epoch", "seconds_per_epoch", ".1f"),
]

# The methods that train several networks (KD-ATFF, its controls): what a user deploys and why
# the ensemble teaches what it does.
ENSEMBLE_TABLE = [
    ("configuration", "configuration", "<"),
    ("branch 0", lambda row: f"{row['top1_mean']:.2f}", ""),
    ("ensemble", "ensemble_top1", ".2f"),
    ("ens. - best branch", "ensemble_minus_best_branch", "+.2f"),
    ("CE", "ce", ".3f"),
    ("teacher CE", "teacher_ce", ".3f"),
    ("KL", "kd", ".3f"),
    ("attention", "attention", ".4f"),
    ("disagree KL", "disagreement_kl", ".3f"),
    ("disagree top-1", "disagreement_top1", ".3f"),
    ("params (branch 0 / all)",
     lambda row: f"{row['single_parameters']:,} / {row['ensemble_parameters']:,}", ""),
    ("MFLOPs (branch 0 / all)",
     lambda row: f"{row['single_mflops']:.1f} / {row['ensemble_mflops']:.1f}", ""),
    ("x baseline time", "time_vs_baseline", ".2f"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", type=Path, help="a phase folder of benchmarks/study.sh")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    rows = summarise(gather(args.phase))
    if not rows:
        print(f"error: no finished runs under {args.phase}", file=sys.stderr)
        return 2
    print_table(rows, TABLE, title=f"{args.phase.name}: last-epoch top-1, mean ± std over seeds")
    ensembles = [row for row in rows if row["ensemble_top1"] is not None]
    if ensembles:
        print_table(ensembles, ENSEMBLE_TABLE, title=f"{args.phase.name}: the multi-network "
                    "methods, last epoch, means over seeds (CE per branch; KL unweighted)")
    if args.json:
        write_json(args.json, {"phase": str(args.phase), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
