"""examples/train_digits.py runs end to end with every method and rejects bad arguments."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from _subprocess import script_environment

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_digits.py"
EPOCH_LINE = re.compile(
    r"epoch +(\d+)/2  train loss (\d+\.\d+)  accuracy (\d+\.\d+) %(?:  ensemble (\d+\.\d+) %)?"
)


def run_example(*arguments):
    command = [sys.executable, str(SCRIPT), "--device", "cpu", *arguments]
    return subprocess.run(command, cwd=ROOT, env=script_environment(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mkf", "kdatff", "baseline"])
def test_example_trains_and_prints_the_accuracy_of_every_epoch(method):
    done = run_example("--method", method, "--epochs", "2")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{method} on 1438 training and 359 test digits"), lines[0]
    epochs = [EPOCH_LINE.fullmatch(line) for line in lines[1:]]
    assert len(epochs) == 2 and all(epochs), lines
    assert [int(epoch.group(1)) for epoch in epochs] == [1, 2]
    for epoch in epochs:
        assert 0.0 <= float(epoch.group(3)) <= 100.0, epoch.group(0)
        assert (epoch.group(4) is not None) == (method == "kdatff"), epoch.group(0)
    # After two epochs every method is far above chance (10 %); all reach 70-90 % here.
    assert float(epochs[-1].group(3)) > 50.0, epochs[-1].group(0)


@pytest.mark.parametrize("argument", ["--epochs", "--batch-size", "--groups"])
def test_example_rejects_a_count_below_one_in_one_line(argument):
    done = run_example(argument, "0")
    assert done.returncode == 2 and done.stdout == ""
    error = done.stderr.splitlines()[-1]
    assert error.endswith(f"argument {argument}: must be at least 1, got 0"), done.stderr


@pytest.mark.slow
def test_example_trains_sub_networks_with_more_groups():
    done = run_example("--method", "mkf", "--epochs", "2", "--groups", "3")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    epochs = [EPOCH_LINE.fullmatch(line) for line in done.stdout.splitlines()[1:]]
    assert len(epochs) == 2 and all(epochs) and float(epochs[-1].group(3)) > 50.0, done.stdout
