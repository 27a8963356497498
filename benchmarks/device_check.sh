#!/usr/bin/env bash
# The checks that need a GPU, as one command of about nine minutes (a lent GPU machine gives a
# session 15 minutes, its start included): the CUDA tests, then the GPU figures RESULTS.md waits
# for (issue 18: operations and kernels per MKF step, the compiled training step; issue 8: the
# fused fraction; issue 28: each kernel's achieved bandwidth against its traffic floor). Each part has its own time limit, so a slow part cannot eat the others' time,
# and each leaves its log (and JSON) in OUT (default benchmarks/out/device):
#
#   bash benchmarks/device_check.sh            # in the repository root, on the GPU machine
#
# The machine's own Python is used (PYTHON, default python3) with this checkout on PYTHONPATH:
# nothing is installed. Without cvxpy there, the tests against the Clarabel reference skip.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out/device}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

part() {  # part NAME SECONDS COMMAND...: run COMMAND for at most SECONDS, log to OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $(date -u +%T) $name (at most $limit s): $*"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local status=$?
    tail -n 40 "$out/$name.log"
    echo "== $(date -u +%T) $name: exit $status$([ $status = 124 ] && echo ' (time limit)')"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$python" -c 'import sys, torch, triton; print(sys.version.split()[0], torch.__version__, "triton", triton.__version__)'
    git log -1 --format='commit %h %s' 2>/dev/null
} 2>&1 | tee "$out/machine.txt"

# Every test with a CUDA case (the `device` and `kernel_device` parameters, the CUDA-only tests).
part tests 155 "$python" -m pytest -q -k cuda -p no:cacheprovider --continue-on-collection-errors
part ops 45 "$python" benchmarks/bench_ops.py --device cuda --json "$out/ops.json"
part fraction 60 "$python" benchmarks/bench_fraction.py --device cuda --skip-cvxpylayers --quick \
    --json "$out/fraction.json"
# The 32 px fp32 setting of issue 18's target, eager and compiled (default, reduce-overhead).
part step 200 "$python" benchmarks/bench_step.py --device cuda --quick --only "b256 C100 fp32" \
    --json "$out/step.json"
# Float32 launches of B = 4096 at the four class counts of RESULTS' resource table (45 s of the
# tests' time moved here): the time of each against its floor at the GPU's bandwidth.
part kernels 45 "$python" benchmarks/bench_kernels.py --device cuda --dtypes float32 --repeats 5 \
    --shapes 4096x10 4096x100 4096x1000 4096x21843 --json "$out/kernels.json"
