#!/usr/bin/env bash
# Mutation testing (issue 30): the decomposition math, or with MUTATION_SET=blocks the other blocks.
#
# mutmut (3.x) copies mkfkit/ to mutants/, mutates fraction.py, _projection.py, bank.py and
# mixing.py, and runs, for each mutant, those tests of test_fraction, test_projection,
# test_bank, test_mixing and test_bad_input that cover the mutated function (configuration:
# [mutmut] in setup.cfg). One worker, pinned to CORE; property tests draw 10 examples each
# (the "mutation" profile of tests/conftest.py) instead of CI's 40.
#
# MUTATION_SET=blocks mutates the other blocks (depth, attention, fusion, distill, features,
# models, _checks) against their tests ([mutmut-blocks] in setup.cfg), in the scratch copy
# mutants-blocks/ (mutmut reads only the [mutmut] section of the working directory's setup.cfg);
# run mutmut's other commands there.
#
#   benchmarks/mutation.sh CORE                 run the mutants not tested yet (a rerun
#                                               resumes; delete mutants/ to start afresh)
#   benchmarks/mutation.sh CORE PATTERN ...     (re)test the mutants whose names match, e.g.
#                                               'mkfkit.fraction.*', tested before or not
#   python -m mutmut results                    list the survivors afterwards
#   python -m mutmut show NAME                  the diff of one mutant
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
core=${1:?usage: benchmarks/mutation.sh CORE [PATTERN ...]}
shift
if [ "${MUTATION_SET:-math}" = blocks ]; then
    mkdir -p mutants-blocks
    cp -rp mkfkit tests mutants-blocks/  # -p: unchanged files keep their times, so a rerun resumes
    # [mutmut-blocks] as the scratch copy's [mutmut].
    "$PYTHON" - <<'PY'
import configparser

source = configparser.ConfigParser()
source.read("setup.cfg")
scratch = configparser.ConfigParser()
scratch["mutmut"] = source["mutmut-blocks"]
with open("mutants-blocks/setup.cfg", "w") as file:
    scratch.write(file)
PY
    cd mutants-blocks
fi
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-mutation}
taskset -c "$core" "$PYTHON" -m mutmut run --max-children 1 "$@"
"$PYTHON" - <<'PY'
"""Score per mutated file, from mutmut's results (mutants/<path>.meta)."""
import collections
import json
import pathlib

from mutmut.stats import status_by_exit_code

for meta in sorted(pathlib.Path("mutants/mkfkit").glob("*.py.meta")):
    codes = json.loads(meta.read_text())["exit_code_by_key"].values()
    counts = collections.Counter(status_by_exit_code[code] for code in codes)
    detected = counts["killed"] + counts["timeout"] + counts["segfault"]
    judged = detected + counts["survived"] + counts["suspicious"]
    score = f"{100 * detected / judged:.1f} %" if judged else "n/a"
    print(f"{meta.name[:-5]}: {len(codes)} mutants, score {score} ({detected} of {judged} detected); "
          + ", ".join(f"{status} {count}" for status, count in sorted(counts.items())))
PY
