"""Releasing held commands: at ``SAGA_RESUME_RATE`` once their service runs again, and one probe
at a time while its breaker is half open.

A release deletes the held outbox row and dispatches the step anew in the saga's transaction
(``engine.dispatch_again``): then it is an attempt, with a fresh step deadline, and the saga's
deadline moves on by the time held. A held row whose saga has moved on (an operator compensated
it meanwhile) is dropped. A drain runs in a thread of an orchestrator process, beside its batch
consumer (whose replies must not wait for the drain's paced sleeps); one drain per service at a
time (an advisory lock), so two orchestrators do not double the rate. A resume asks for one
(``service_states.kick``: a ``saga.release`` message to the orchestrators), and the sweep starts
one whenever a running service still has held commands (a drain lost with its process).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from models.db import get_engine, run_in_transaction, transaction
from models.outbox import OutboxMessage
from models.services import BREAKER_OPEN, HALF_OPEN, ServiceCalls, ServiceState
from orchestrator.kernel import breaker, engine, holds, service_states
from orchestrator.messaging.celery_app import app
from orchestrator.ops import process_metrics
from orchestrator.ops.config import settings
from orchestrator.ops.logs import log_context
from orchestrator.registry import TimelineEvent

log = logging.getLogger(__name__)

_LOCK_SPACE = 0x5A6A  # advisory lock key space of the drains (the second key: the service)
_OUTBOX = OutboxMessage.__table__.c


def release_one(service: str, *, probe: bool = False) -> bool:
    """Release the oldest held command of ``service``. False: none held, or it must stay held."""

    def work(session: Session) -> bool:
        hold = holds.not_running(session).get(service)
        if hold is not None and not probe:
            return False  # paused again meanwhile
        row = session.execute(
            sa.select(_OUTBOX.id, _OUTBOX.saga_id, _OUTBOX.task, _OUTBOX.envelope)
            .where(_OUTBOX.queue == service, _OUTBOX.held_at.is_not(None))
            .where(_OUTBOX.sent_at.is_(None))
            .order_by(_OUTBOX.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if row is None:
            return False
        session.execute(sa.delete(OutboxMessage).where(OutboxMessage.id == row.id))
        saga = engine.lock_saga(session, row.saga_id) if row.saga_id else None
        if saga is not None:
            why = "the breaker's probe" if probe else f"{service} resumed"
            with log_context(saga_id=saga.id, step=row.task):
                _release(session, saga, row.task, row.envelope, why)
        return True

    released = run_in_transaction(work)
    if released:
        process_metrics.RELEASED.labels(service).inc()
    return released


def _release(session: Session, saga: Any, command: str, envelope: dict[str, Any], why: str) -> None:
    definition = engine.registered_of(saga).definition
    index, kind = definition.by_command(command)
    request_id = uuid.UUID(str(envelope["request_id"]))
    now = engine.utcnow()
    if not engine.awaits(saga, index, kind, request_id):
        log.info("held %s dropped: the saga moved on", command)
        saga.held_since = None
        return
    held_s = (now - saga.held_since).total_seconds() if saga.held_since else 0.0
    if saga.held_since is not None:
        saga.deadline_at += now - saga.held_since
    engine.record(
        session,
        saga,
        TimelineEvent.STEP_RELEASED,
        step=command,
        detail=f"{why} after {held_s:.1f}s held",
    )
    engine.dispatch_again(session, saga, index, kind, now, probe=why.startswith("the breaker"))
    log.info("released %s after %.1fs held", command, held_s)


def drain(service: str) -> int:
    """Release ``service``'s held commands at the resume rate, until none is left or it is paused
    again; 0 at once if another drain has it in hand."""
    rate = settings().resume_rate
    released = 0
    with get_engine().connect() as conn:
        key = sa.func.hashtext(service)
        if not conn.scalar(sa.select(sa.func.pg_try_advisory_lock(_LOCK_SPACE, key))):
            return 0  # another drain has it in hand
        conn.commit()
        try:
            start = time.monotonic()
            while release_one(service):
                released += 1
                pause = start + released / rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            return released
        finally:
            conn.execute(sa.select(sa.func.pg_advisory_unlock(_LOCK_SPACE, key)))
            conn.commit()
            if released:
                log.info("released %d held command(s) of %s", released, service)


_drains: dict[str, threading.Thread] = {}
_drains_lock = threading.Lock()
_drains_pid = {"pid": 0}


def drain_in_background(service: str) -> None:
    """Start ``service``'s drain in a thread of this process, unless one runs here already."""
    with _drains_lock:
        if _drains_pid["pid"] != os.getpid():  # a forked child has none of its parent's threads
            _drains.clear()
            _drains_pid["pid"] = os.getpid()
        running = _drains.get(service)
        if running is not None and running.is_alive():
            return
        thread = threading.Thread(
            target=_drain_logged, args=(service,), name=f"release-{service}", daemon=True
        )
        _drains[service] = thread
        thread.start()


def _drain_logged(service: str) -> None:
    try:
        drain(service)
    except Exception as exc:  # the sweep starts another for what is left
        log.warning("releasing %s's held commands stopped: %s", service, exc)


@app.task(name=service_states.RELEASE_TASK)
def release_task(service: str) -> None:
    """A release asked for (the path of one message a task, ``SAGA_BATCH_MAX=0``)."""
    drain_in_background(service)


def sweep_holds() -> int:
    """The sweep's part (beat): probe services whose breaker cooled down, ask for the release of
    running services that still have held commands, forget old breaker evidence."""
    cfg = settings()
    with transaction() as session:
        cooled = list(
            session.scalars(
                sa.select(ServiceState.service)
                .where(ServiceState.state.in_([BREAKER_OPEN, HALF_OPEN]))
                .where(ServiceState.since < sa.func.now() - _seconds(cfg.breaker_cooldown_s))
            )
        )
        for service in cooled:
            service_states.change(
                session,
                service,
                HALF_OPEN,
                action="half_open",
                actor=breaker.ACTOR,
                note="cool-down over: one probe goes through",
                when=(BREAKER_OPEN, HALF_OPEN),
            )
        waiting = list(
            session.scalars(
                sa.select(_OUTBOX.queue)
                .where(_OUTBOX.held_at.is_not(None), _OUTBOX.sent_at.is_(None))
                .distinct()
            )
        )
        not_running = holds.not_running(session)
        session.execute(
            sa.delete(ServiceCalls).where(
                ServiceCalls.flushed_at < sa.func.now() - _seconds(2 * cfg.breaker_window_s)
            )
        )
    probes = sum(release_one(service, probe=True) for service in cooled)
    for service in waiting:
        if service not in not_running:
            drain_in_background(service)
    return probes


def _seconds(s: float) -> sa.ColumnElement[Any]:
    return sa.func.make_interval(0, 0, 0, 0, 0, 0, s)
