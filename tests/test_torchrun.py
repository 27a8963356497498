"""``benchmarks/train.py`` on two processes (gloo on the CPU), as ``torchrun`` starts it.

A short study (baseline, KD-ATFF, Stimulative Training and MKF with the exact QP) runs under
``python -m torch.distributed.run`` (what the ``torchrun`` command runs), then again, stopped
inside the MKF run and resumed, in processes started with torchrun's environment variables. At the end of every run each process hashes its
whole training state (``process_state_sha256`` in the JSON: model weights and BatchNorm buffers,
knowledge bank, optimiser, mixer, depth sampler, generators); the processes must agree bit for
bit, and the first process's checkpoint must hash to the same value. Killing one process makes
the other stop with a one-line error instead of waiting for it.
"""

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _subprocess import script_environment
import torch

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")
if not torch.distributed.is_available():
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import train  # noqa: E402

PROCESSES = 2
METHODS = ["baseline", "kdatff-mix", "dml", "st", "mkf-qp"]
# 192 images, batch 32 (16 per process): 6 steps per epoch, 12 per run.
TINY = ["--device", "cpu", "--train-subset", "192", "--batch-size", "32", "--epochs", "2",
        "--seeds", "0", "--blocks", "2", "2", "2", "--widths", "8", "16", "16", "--no-progress",
        "--methods", *METHODS]
STOP = (len(METHODS) - 1) * 12 + 9  # inside the second epoch of the MKF run (the last)
ENVIRONMENT = script_environment()


def torchrun(*arguments, cwd):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(PROCESSES), str(BENCHMARKS / "train.py"), *TINY, *arguments]
    done = subprocess.run(command, cwd=cwd, env=ENVIRONMENT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_processes(*arguments, cwd):
    """The processes of a torchrun launch, started with the environment torchrun gives them but
    without torchrun (which costs one more Python start, and would itself stop every process
    when one fails)."""
    environment = {**ENVIRONMENT, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                   "WORLD_SIZE": str(PROCESSES), "LOCAL_WORLD_SIZE": str(PROCESSES)}
    command = [sys.executable, str(BENCHMARKS / "train.py"), *TINY, *arguments]
    return [subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**environment, "RANK": str(rank),
                                             "LOCAL_RANK": str(rank)})
            for rank in range(PROCESSES)]


def finish(processes, timeout):
    """Wait for ``processes``; kill those still running after ``timeout`` seconds in all."""
    deadline = time.monotonic() + timeout
    try:
        return [process.communicate(timeout=max(deadline - time.monotonic(), 0.1))
                for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()


def run_processes(*arguments, cwd):
    processes = start_processes(*arguments, cwd=cwd)
    outputs = finish(processes, timeout=300)
    for process, (out, error) in zip(processes, outputs):
        assert process.returncode == 0, out[-2000:] + error[-4000:]
    return outputs


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    whole = torchrun("--checkpoint", "whole.pt", "--out", "whole", cwd=root)
    stopped = run_processes("--checkpoint", "resumed.pt", "--out", "resumed", "--stop-after",
                            str(STOP), cwd=root)
    assert [out.count(f"stopped after {STOP} steps") for out, _ in stopped] == [1, 0]
    assert not (root / "resumed").exists()
    run_processes("--checkpoint", "resumed.pt", "--out", "resumed", "--resume", cwd=root)
    return root, whole


def report(folder):
    return json.loads((folder / "train_digits.json").read_text())


def final_state(path):
    return train.load_checkpoint(str(path), train.parse_args(TINY))["current"]


@pytest.mark.slow
def test_the_processes_end_every_run_with_the_same_state(studies, monkeypatch):
    root, _ = studies
    runs = {run["method"]: run for run in report(root / "whole")["runs"]}
    assert list(runs) == METHODS
    for method, run in runs.items():
        digests = run["process_state_sha256"]
        assert len(digests) == PROCESSES and len(set(digests)) == 1, method
        assert 0 <= run["top1"] <= 100 and len(run["history"]) == 2
    # The digest covers the real state: the first process's checkpoint of the MKF run hashes
    # to it (read as that process reads it: its rank and the number of processes).
    monkeypatch.setenv("WORLD_SIZE", str(PROCESSES))
    monkeypatch.setenv("RANK", "0")
    state = final_state(root / "whole.pt")
    del state["train_seconds"]
    assert train.state_digest(state) == runs["mkf-qp"]["process_state_sha256"][0]
    # The processes trained on disjoint halves of every epoch, yet ended with the same bank:
    # each took in the other's rows. So did the record of when rows were written: every image
    # was in a batch of one process or the other.
    assert bool((state["last_write"].max(dim=0).values >= 0).all())
    assert report(root / "whole")["config"]["processes"] == PROCESSES


@pytest.mark.slow
def test_a_stopped_study_resumes_exactly_under_torchrun(studies):
    root, _ = studies
    whole, resumed = report(root / "whole")["runs"], report(root / "resumed")["runs"]
    assert [run["process_state_sha256"] for run in resumed] == [
        run["process_state_sha256"] for run in whole]
    assert [run["history"] for run in resumed] == [run["history"] for run in whole]


@pytest.mark.slow
def test_results_are_written_once(studies):
    root, whole = studies
    assert sorted(path.name for path in (root / "whole").iterdir()) == [
        "train_digits.json", "train_digits.png"]
    assert whole.stdout.count("top-1 (%)") == 1
    assert whole.stdout.count("wrote whole/train_digits.json") == 1
    assert whole.stdout.count("wrote whole/train_digits.png") == 1


@pytest.mark.slow
def test_a_two_process_checkpoint_is_refused_by_one_process(studies, tmp_path):
    root, _ = studies
    with pytest.raises(train.CheckpointError, match=r"processes \(torchrun --nproc_per_node\) "
                       r"2 \(saved\) vs 1 \(given\)"):
        train.main(TINY + ["--checkpoint", str(root / "resumed.pt"), "--resume",
                           "--out", str(tmp_path)])


@pytest.mark.parametrize("rank", range(PROCESSES))
def test_each_process_takes_a_disjoint_equal_share_of_every_epoch(monkeypatch, rank):
    monkeypatch.setenv("WORLD_SIZE", str(PROCESSES))
    monkeypatch.setenv("RANK", str(rank))
    order = torch.randperm(11)
    share = train.share_of_epoch(order)
    # ranks 0 and 1 take the even and odd positions; the 11th image waits for the next epoch
    assert torch.equal(share, order[rank:10:2])
    assert train.draws_for_all_processes(16) == (32, slice(16 * rank, 16 * (rank + 1)))


class Exited(Exception):
    """Raised by the stand-in for ``os._exit``."""


@pytest.mark.parametrize("processes", [1, PROCESSES])
def test_a_torchrun_process_exits_without_the_interpreters_teardown(monkeypatch, processes):
    """Under torchrun the teardown can abort a process that used gloo, even after a clean
    finish (SIGABRT instead of the exit status, now and then), so train.py leaves by
    ``os._exit``; a plain run leaves as usual."""
    def stand_in(status):
        raise Exited(status)

    monkeypatch.setattr(train.os, "_exit", stand_in)
    monkeypatch.setenv("WORLD_SIZE", str(processes))
    expected = SystemExit if processes == 1 else Exited
    with pytest.raises(expected) as exited:
        train.exit_now(3)
    assert exited.value.args == (3,)


@pytest.mark.slow
def test_killing_one_process_stops_the_other_with_a_clear_error(tmp_path):
    """Without torchrun, which would itself stop the survivor: here the survivor must notice."""
    processes = start_processes("--epochs", "200", "--checkpoint", "study.pt",
                                "--collective-timeout", "20", cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "study.pt").exists():  # the first epoch is done: mid-run
            assert time.monotonic() < deadline and processes[0].poll() is None
            time.sleep(0.2)
        processes[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        (_, error), _ = finish(processes, timeout=60)
        waited = time.monotonic() - killed
    finally:
        finish(processes, timeout=0)
    assert processes[0].returncode == 1
    assert waited < 30  # at most the --collective-timeout, usually at once
    last_line = error.strip().splitlines()[-1]
    assert last_line.startswith("error: process 0 of 2 lost contact with the others (")
    assert "one of them failed, was killed or stopped answering" in last_line
    assert "Traceback" not in error
