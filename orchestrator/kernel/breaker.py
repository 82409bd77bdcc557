"""The circuit breaker of each service, fed by the replies the orchestrator receives.

Each orchestrator process counts, per service, the replies it applied (once their transaction
committed: ``replies.observe``; a success or a business refusal: a healthy call; a "retrying" or
"held" reply: a transient failure) and adds them once a
second to ``service_calls`` (one row per service and flush, shared by every process). The same
flush judges: a running service whose share of transient failures over the window reaches the
threshold (with enough calls) opens its breaker; a half-open service closes on a success and
reopens on a failure. The cool-down and the probe are the sweep's (orchestrator/kernel/release.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from models.db import transaction
from models.services import BREAKER_OPEN, HALF_OPEN, RUNNING, ServiceCalls
from orchestrator.kernel import holds, service_states
from orchestrator.messaging.envelopes import ReplyOutcome
from orchestrator.ops.config import settings

log = logging.getLogger(__name__)

ACTOR = "breaker"
FLUSH_S = 1.0
Counts = dict[str, list[int]]  # service -> [healthy, transient] since the last flush

_lock = threading.Lock()
_counts: Counts = {}
_flusher: tuple[int, threading.Thread] | None = None


def observe(command: str, outcome: ReplyOutcome, *, held: bool = False) -> None:
    """One reply of ``command``'s service (cheap: a counter; the flush writes it)."""
    transient = held or outcome is ReplyOutcome.RETRYING
    with _lock:
        _counts.setdefault(holds.service_of(command), [0, 0])[int(transient)] += 1
    _ensure_flusher()


def _ensure_flusher() -> None:
    global _flusher
    if _flusher is not None and _flusher[0] == os.getpid() and _flusher[1].is_alive():
        return
    with _lock:
        if _flusher is None or _flusher[0] != os.getpid() or not _flusher[1].is_alive():
            thread = threading.Thread(target=_flush_forever, name="breaker", daemon=True)
            _flusher = (os.getpid(), thread)
            thread.start()


def _flush_forever() -> None:
    while True:
        time.sleep(FLUSH_S)
        flush()


def take() -> Counts:
    global _counts
    with _lock:
        taken, _counts = _counts, {}
    return taken


def put_back(taken: Counts) -> None:
    with _lock:
        for service, (ok, bad) in taken.items():
            counts = _counts.setdefault(service, [0, 0])
            counts[0] += ok
            counts[1] += bad


def flush() -> list[str]:
    """Write the counts and judge the services they are about. Returns the services closed."""
    taken = take()
    if not taken:
        return []
    try:
        with transaction() as session:
            closed = record_and_judge(session, taken)
    except Exception as exc:
        # Kept for the next flush: an outage's last failures may be all the evidence there is.
        log.warning("breaker: could not record %d service(s)' calls: %s", len(taken), exc)
        put_back(taken)
        return []
    for service in closed:
        service_states.kick(service)
    return closed


def record_and_judge(session: Session, taken: Counts) -> list[str]:
    rows = [
        {"service": s, "flushed_at": sa.func.now(), "ok": ok, "transient": bad}
        for s, (ok, bad) in sorted(taken.items())  # sorted: two flushes lock rows in one order
    ]
    stmt = insert(ServiceCalls).values(rows)
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["service", "flushed_at"],  # two processes' flushes begun at once
            set_={
                "ok": ServiceCalls.ok + stmt.excluded.ok,
                "transient": ServiceCalls.transient + stmt.excluded.transient,
            },
        )
    )
    return judge(session, taken)


def judge(session: Session, taken: Counts) -> list[str]:
    cfg = settings()
    states = holds.not_running(session)
    rates = service_states.failure_rates(session)
    closed = []
    for service, (ok, bad) in sorted(taken.items()):
        hold = states.get(service)
        state = hold.state if hold else RUNNING
        if state == RUNNING:
            calls, failures = rates.get(service, (0, 0))
            if calls >= cfg.breaker_min_calls and failures >= cfg.breaker_threshold * calls:
                note = (
                    f"{failures} of {calls} calls failed transiently in {cfg.breaker_window_s:g}s"
                )
                service_states.change(
                    session,
                    service,
                    BREAKER_OPEN,
                    action="breaker_open",
                    actor=ACTOR,
                    note=note,
                    when=(RUNNING,),
                )
        elif state == HALF_OPEN:
            if bad:
                service_states.change(
                    session,
                    service,
                    BREAKER_OPEN,
                    action="breaker_reopened",
                    actor=ACTOR,
                    note="the probe failed",
                    when=(HALF_OPEN,),
                )
            elif ok and service_states.change(
                session,
                service,
                RUNNING,
                action="breaker_closed",
                actor=ACTOR,
                note="the probe succeeded",
                when=(HALF_OPEN,),
            ):
                closed.append(service)
    return closed
