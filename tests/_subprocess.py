"""The environment in which the tests run a repository script (train.py, a benchmark, an
example) as a subprocess."""

import os
from pathlib import Path
from typing import Dict

ROOT = Path(__file__).resolve().parents[1]


def script_environment() -> Dict[str, str]:
    """``os.environ`` with this checkout's mkfkit first on the path (not whichever one is
    installed), one thread per process (repeatable timings and results, no oversubscription of
    the CI's two cores), without the Triton interpreter that tests/conftest.py chooses for
    this process's kernel tests (the scripts run the plain CPU paths), and with Python's fault
    handler on: a script that dies of a signal prints where it was."""
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    environment["OMP_NUM_THREADS"] = "1"
    environment["PYTHONFAULTHANDLER"] = "1"
    return environment
