"""A batch consumer's hard time limit (workers/limits.py): one watchdog thread per process kills
the process when a block outlives the limit, as Celery kills a pool process, and leaves every
block that ends in time alone. Real processes: the kill is a SIGKILL of the interpreter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

_SCRIPT = """
import logging, sys, time
logging.basicConfig(level=logging.INFO)
from workers import limits
for _ in range(int(sys.argv[2])):
    with limits.watch(sys.argv[1]):
        time.sleep(float(sys.argv[3]))
print("done")
"""


def _run(what: str, blocks: int, each_s: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SAGA_TASK_TIME_LIMIT_S": "0.5", "SAGA_TASK_SOFT_TIME_LIMIT_S": "0"}
    return subprocess.run([sys.executable, "-c", _SCRIPT, what, str(blocks), str(each_s)],
                          env=env, capture_output=True, text=True, timeout=60)


def test_a_block_past_its_hard_limit_kills_its_process() -> None:
    ran = _run("inventory.reserve[t-1]", 1, 30)
    assert ran.returncode == -signal.SIGKILL, (ran.returncode, ran.stderr)
    assert "Hard time limit (0.5s) exceeded for inventory.reserve[t-1]" in ran.stderr
    assert "done" not in ran.stdout


def test_blocks_that_end_in_time_are_left_alone_however_long_they_run_in_all() -> None:
    ran = _run("payment.charge[t-2]", 8, 0.1)  # 0.8 s in all, each block well under 0.5 s
    assert ran.returncode == 0, ran.stderr
    assert "done" in ran.stdout and "Hard time limit" not in ran.stderr
