"""Injected faults (``SAGA_FAULT_INJECTION=1`` in the worker's environment too), as in the contract.

- ``transient:N``: attempts 1..N raise a transient error; ``always``: every attempt does;
- ``fail``: a business refusal; ``crash``: the first attempt does its work, then the process dies
  as SIGKILL would, before replying; ``hang:S``: the first attempt sleeps S seconds.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from orchestrator.messaging.envelopes import FAULT, Command, fault_fired_line
from orchestrator.ops.config import settings
from workers import limits

log = logging.getLogger(__name__)


class TransientError(Exception):
    """A failure worth retrying: the next attempt may well succeed."""


class InjectedRefusal(Exception):
    """The ``fail`` fault: a business refusal."""


def enabled(fault: str | None) -> bool:
    return bool(fault) and settings().fault_injection


def fired(fault: str, command: Command, attempt: int) -> None:
    """Say that the fault struck, before it does (a crash leaves no other trace of itself)."""
    log.warning(fault_fired_line(fault, command.type, command.saga_id, attempt))
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()


def before_work(fault: str | None, command: Command, attempt: int, redelivered: bool) -> None:
    """Apply the faults that strike before the local work."""
    if not enabled(fault):
        return
    assert fault is not None
    match = FAULT.fullmatch(fault)
    if not match:
        return
    if fault == "always":
        fired(fault, command, attempt)
        raise TransientError("injected fault: always")
    if fault == "fail":
        fired(fault, command, attempt)
        raise InjectedRefusal("injected fault: fail")
    if match.group("n") and attempt <= int(match.group("n")):
        fired(fault, command, attempt)
        raise TransientError(f"injected fault: {fault} (attempt {attempt})")
    hang = hang_of(fault, attempt, redelivered)
    if hang is not None:
        fired(fault, command, attempt)
        limits.sleep(hang)  # a batch consumer keeps the soft limit


def hang_of(fault: str | None, attempt: int, redelivered: bool) -> float | None:
    """The seconds an injected ``hang`` holds this attempt, if one strikes it (the first
    delivery of attempt 1)."""
    match = FAULT.fullmatch(fault or "") if enabled(fault) else None
    if match and match.group("s") and attempt == 1 and not redelivered:
        return float(match.group("s"))
    return None


def after_work(fault: str | None, command: Command, attempt: int, applied_now: bool) -> None:
    """``crash``: die right after the first attempt committed its effect, before the reply."""
    if enabled(fault) and fault == "crash" and applied_now:
        fired("crash", command, attempt)
        os.kill(os.getpid(), signal.SIGKILL)
