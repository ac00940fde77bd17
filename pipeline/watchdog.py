"""End a training process that stopped making progress instead of letting it burn the allocation.

A stalled collective (a peer that died or hangs) or a data read that never returns blocks
the training loop forever; torch.distributed's own timeout covers only some collectives
and none of the reads. The loop calls :meth:`HangWatchdog.progress` at every step, evaluation
and save. When ``timeout_s`` pass without one, the watchdog prints what stalled and every
thread's stack, asks SLURM to requeue the job (under SLURM, while ``slurm.max_requeues``
allows; the requeued job resumes from its last checkpoint) and ends the process.
"""

from __future__ import annotations

import faulthandler
import os
import subprocess
import sys
import threading
import time

import psutil

# EX_TEMPFAIL: the job may succeed when run again.
HANG_EXIT_CODE = 75


class HangWatchdog:
    def __init__(self, timeout_s: float, rank: int, max_requeues: int):
        self.timeout_s = timeout_s
        self.rank = rank
        self.max_requeues = max_requeues
        self._last_progress = time.monotonic()
        self._doing = "starting"
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        self._thread.start()

    def progress(self, doing: str) -> None:
        """The loop moved on; ``doing`` names what comes next ("step 120", "save")."""
        self._last_progress = time.monotonic()
        self._doing = doing

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(min(self.timeout_s / 4, 30.0)):
            idle = time.monotonic() - self._last_progress
            if idle > self.timeout_s:
                self._end(idle)

    def _end(self, idle: float) -> None:
        print(
            f"rank {self.rank}: train.hang_timeout_minutes: no progress for {idle:.0f} s in "
            f"{self._doing} (a stalled collective or data read); ending the job, stacks follow",
            file=sys.stderr, flush=True,
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        requeue_slurm_job(self.max_requeues)
        # Helper processes (Megatron's checkpoint-writer manager) would outlive an _exit and
        # keep the job's output pipes open.
        for child in psutil.Process().children(recursive=True):
            child.kill()
        sys.stderr.flush()
        os._exit(HANG_EXIT_CODE)


def requeue_slurm_job(max_requeues: int) -> None:
    """Under SLURM, put the job back in the queue unless it was requeued ``max_requeues``
    times already; every task may ask, SLURM acts on the first request."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id is None:
        return
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if restarts >= max_requeues:
        print(f"slurm.max_requeues: job {job_id} was requeued {restarts} times already; "
              f"not requeuing it again", file=sys.stderr, flush=True)
        return
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if result.returncode == 0:
        print(f"requeued SLURM job {job_id} (restart {restarts + 1} of at most {max_requeues})",
              file=sys.stderr, flush=True)
