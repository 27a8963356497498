"""The fused kernels built ahead of time for real GPUs (sm_80, sm_90), with no GPU (issue 28).

Triton's interpreter, which the other kernel tests run on a machine without CUDA, accepts
programs the GPU compiler refuses and says nothing about registers. Here
``benchmarks/bench_kernels.py`` runs in a subprocess (Triton imported as a compiler, whatever
this process chose): it compiles every launch configuration the launch rules of
``mkfkit/kernels/`` choose over its grid of shapes (B = 1 to 65,536, C = 1 to 32,769) and
dtypes, each once, for both targets, and reports what ``ptxas`` says. The test skips, saying
why, where Triton or its ``ptxas`` is missing.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _subprocess import script_environment

pytest.importorskip("triton", reason="Triton is not installed: no kernel to compile")

from mkfkit.kernels import _resources  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CALLS = {
    "qp forward": ("float32", "bfloat16", "float16", "float64"),
    "qp forward, counting": ("float32", "bfloat16", "float16", "float64"),
    "qp backward": ("float32", "bfloat16", "float16", "float64"),
    "bank read": ("float32", "bfloat16", "float16"),
    "bank read, pairs": ("float32", "bfloat16", "float16"),
    "bank read, mixed": ("float32", "bfloat16", "float16"),
    "bank write": ("float32", "bfloat16", "float16"),
    "bank write, some valid": ("float32", "bfloat16", "float16"),
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    reason = _resources.unavailable()
    if reason is not None:
        pytest.skip(f"cannot build the kernels ahead of time: {reason}")
    path = tmp_path_factory.mktemp("kernels") / "kernels.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--json", str(path)]
    # In a session of its own, so that a timeout ends its compiling processes too.
    with subprocess.Popen(command, cwd=ROOT, env=script_environment(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as process:
        try:
            # About 95 s of CPU time in two processes; the limit leaves room for a busy machine
            # (8 min of wall time seen while other jobs held both cores).
            stdout, stderr = process.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]
    return json.loads(path.read_text())


@pytest.mark.slow
def test_every_kernel_and_dtype_compiles_for_sm80_and_sm90(report):
    built = {}
    for row in report["configurations"]:
        built.setdefault(row["call"], set()).add(row["dtype"])
        for arch in _resources.ARCHS:
            assert 0 < row[f"sm{arch}_registers"] <= 255, row
    assert built == {call: set(dtypes) for call, dtypes in CALLS.items()}
    # Short, long and chunked rows all met: more than one configuration for every call.
    for call in CALLS:
        assert sum(row["call"] == call for row in report["configurations"]) > 2, call


@pytest.mark.slow
def test_no_configuration_spills(report):
    spilled = [
        (row["call"], row["dtype"], row["tile"], row["warps"], arch, row[f"sm{arch}_spilled"])
        for row in report["configurations"] for arch in _resources.ARCHS
        if row[f"sm{arch}_spilled"]
    ]
    assert not spilled, f"registers spilled (call, dtype, tile, warps, sm, bytes): {spilled}"


@pytest.mark.slow
def test_large_launches_fill_the_gpu_unless_rows_are_fewer_than_sms(report):
    # Where moving the bytes takes longer than launching, the grid occupies every SM with at
    # least a quarter of its warp slots; the one exception (benchmarks/RESULTS.md, "Kernel
    # resources") is a batch of fewer long rows than SMs, as a row is never split over programs.
    sms = {gpu["arch"]: gpu["sms"] for gpu in report["gpus"]}
    unexplained = [
        (row["call"], row["batch"], row["classes"], row["dtype"], arch)
        for row in report["unfilled"] for arch in sms
        if row[f"sm{arch}_rule"] is False and row["batch"] >= sms[arch]
    ]
    assert not unexplained, f"launches that leave the GPU idle (call, B, C, dtype, sm): {unexplained}"

