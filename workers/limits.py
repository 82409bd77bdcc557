"""The task time limits, kept by a batch consumer for the work in hand (Celery keeps them for its
own tasks only, and a batch consumer runs none).

- past the hard limit (``SAGA_TASK_TIME_LIMIT_S``) the process is killed, as Celery kills a pool
  process: its unacked messages go back to the queue and are delivered again (the quorum queue's
  delivery limit dead-letters one that keeps hanging). A hung batch cannot hold a consumer forever;
- past the soft limit (``SAGA_TASK_SOFT_TIME_LIMIT_S``) an injected ``hang`` raises
  ``SoftTimeLimitExceeded``, which the participant retries as transient, as under Celery.
The lines logged are Celery's own, so what operators (and tests) look for stays the same.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from celery.exceptions import SoftTimeLimitExceeded

from orchestrator.ops.config import settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Soft:
    deadline: float  # time.monotonic()
    limit_s: float
    what: str


_soft: ContextVar[_Soft | None] = ContextVar("soft_time_limit", default=None)


@contextmanager
def watch(what: str) -> Iterator[None]:
    """Keep the time limits over the block; ``what`` names the work, as ``task[id]``."""
    cfg = settings()
    dog = _watchdog()
    hard = dog.add(cfg.task_time_limit_s, what)
    soft = cfg.task_soft_time_limit_s
    token = _soft.set(_Soft(time.monotonic() + soft, soft, what) if soft else None)
    try:
        yield
    finally:
        dog.remove(hard)
        _soft.reset(token)


# How often the watchdog looks at the hard deadlines: the limit is kept within this much.
TICK_S = 0.25


class _Watchdog:
    """One thread per process keeps every hard limit in hand (a timer thread started and
    cancelled per batch was a fixed cost of every batch)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._work: dict[int, tuple[float, float, str]] = {}  # id -> (deadline, limit, what)
        self._next = 0
        threading.Thread(target=self._run, name="time-limits", daemon=True).start()

    def add(self, limit_s: float, what: str) -> int:
        with self._lock:
            self._next += 1
            self._work[self._next] = (time.monotonic() + limit_s, limit_s, what)
            return self._next

    def remove(self, key: int) -> None:
        with self._lock:
            self._work.pop(key, None)

    def _run(self) -> None:
        while True:
            time.sleep(TICK_S)
            now = time.monotonic()
            with self._lock:
                late = [(limit, what) for deadline, limit, what in self._work.values()
                        if deadline <= now]
            if late:
                _hard_limit(*late[0])


_dog: _Watchdog | None = None
_dog_lock = threading.Lock()


def _watchdog() -> _Watchdog:
    global _dog
    if _dog is None or _dog.pid != os.getpid():  # a forked pool process needs its own thread
        with _dog_lock:
            if _dog is None or _dog.pid != os.getpid():
                _dog = _Watchdog()
    return _dog


def _hard_limit(limit_s: float, what: str) -> None:
    log.error("Hard time limit (%ss) exceeded for %s", limit_s, what)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def sleep(seconds: float) -> None:
    """``time.sleep``, cut short by the soft limit of the work in hand, if one is kept here."""
    soft = _soft.get()
    if soft is None or time.monotonic() + seconds < soft.deadline:
        time.sleep(seconds)
        return
    time.sleep(max(0.0, soft.deadline - time.monotonic()))
    log.warning("Soft time limit (%ss) exceeded for %s", soft.limit_s, soft.what)
    raise SoftTimeLimitExceeded(f"soft time limit ({soft.limit_s}s) exceeded")
