"""The options of one ``sagactl bench`` run, shared by the entry (orchestrator/proof/bench/command.py), the
load (bench_load.py) and the system under test (bench_target.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    n: int = 500
    mode: str = "http"  # or "direct"
    concurrency: int = 8
    rate: float | None = None  # orders per second (paced); None = as fast as `concurrency` allows
    url: str | None = None  # a running system; None = a fresh sandbox of our own
    warmup: int = 20
    timeout_s: float = 300.0
    raw: bool = True
    floor: bool = False  # also the floor baseline (bench_raw): six tasks, six commits
    idle_s: float = 10.0  # the window that measures background commits
    profile_dir: str | None = None  # py-spy output, one file per process
    # cpu: py-spy --gil (only threads holding the GIL: Python code running);
    # wall: py-spy --idle (every sample, waits on the database and the broker included).
    profile_mode: str = "cpu"
    keep_logs: bool = False
    # http mode: seconds of POST /orders at half the saturation rate, then at 100/s; 0: none.
    post_s: float = 10.0


Say = Callable[[str], None]
