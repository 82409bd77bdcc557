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
    timer = threading.Timer(cfg.task_time_limit_s, _hard_limit, (cfg.task_time_limit_s, what))
    timer.daemon = True
    timer.start()
    soft = cfg.task_soft_time_limit_s
    token = _soft.set(_Soft(time.monotonic() + soft, soft, what) if soft else None)
    try:
        yield
    finally:
        timer.cancel()
        _soft.reset(token)


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
