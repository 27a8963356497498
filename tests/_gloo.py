"""How a test's gloo worker process (started by ``torch.multiprocessing.spawn``) ends."""

import os
import sys
from typing import NoReturn

import torch.distributed as dist


def leave_process_group() -> NoReturn:
    """Meet the other workers, destroy the process group and exit with status 0 at once.

    The barrier: no worker tears gloo down while another may still use it. The exit skips the
    interpreter's teardown, which now and then aborts a process that used gloo (SIGABRT,
    "terminate called without an active exception") even after ``destroy_process_group``, and
    ``spawn`` would report a worker that finished its work as failed. Call it last, once the
    worker's results are saved.
    """
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
