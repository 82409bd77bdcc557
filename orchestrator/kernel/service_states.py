"""A participant service's state (running, paused, breaker_open, half_open): every change of it,
by an operator or by the breaker, goes through ``change`` (the row, the audit, a log line, a metric).

No row means running. A resume (by an operator, or the breaker closing) asks for the held commands
to be released at ``SAGA_RESUME_RATE`` (orchestrator/kernel/release.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from models.outbox import OutboxMessage
from models.services import (
    BREAKER_OPEN,
    HALF_OPEN,
    PAUSED,
    RUNNING,
    ServiceAudit,
    ServiceCalls,
    ServiceState,
)
from orchestrator import registry
from orchestrator.kernel import holds
from orchestrator.ops import process_metrics
from orchestrator.ops.config import settings

log = logging.getLogger(__name__)


class UnknownService(LookupError):
    pass


class AlreadyInState(RuntimeError):
    pass


def known(service: str) -> None:
    if service not in registry.current().services:
        raise UnknownService(service)


def state_of(session: Session, service: str, *, lock: bool = False) -> ServiceState:
    """The service's row, created running when it has none (locked for this transaction)."""
    session.execute(
        insert(ServiceState).values(service=service, state=RUNNING).on_conflict_do_nothing()
    )
    query = sa.select(ServiceState).where(ServiceState.service == service)
    if lock:
        query = query.with_for_update()
    row = session.scalars(query.execution_options(populate_existing=True)).one()
    return row


def held_count(session: Session, service: str) -> int:
    return int(
        session.scalar(
            sa.select(sa.func.count())
            .select_from(OutboxMessage)
            .where(OutboxMessage.queue == service)
            .where(OutboxMessage.held_at.is_not(None), OutboxMessage.sent_at.is_(None))
        )
        or 0
    )


def change(
    session: Session,
    service: str,
    to: str,
    *,
    action: str,
    actor: str,
    note: str | None = None,
    hold_compensations: bool = True,
    when: tuple[str, ...] | None = None,
) -> bool:
    """Move ``service`` to state ``to`` if it is in one of ``when`` (any other state: False)."""
    row = state_of(session, service, lock=True)
    if when is not None and row.state not in when:
        return False
    was = row.state
    row.state, row.since, row.by, row.note = to, sa.func.now(), actor, note
    row.hold_compensations = hold_compensations
    held = held_count(session, service)
    session.add(ServiceAudit(service=service, action=action, actor=actor, note=note, held=held))
    session.flush()
    holds.forget(session)  # this transaction's own dispatches see the new state
    process_metrics.SERVICE_CHANGES.labels(service, to).inc()
    log.warning(
        "service %s: %s -> %s (%s by %s%s), %d command(s) held",
        service,
        was,
        to,
        action,
        actor,
        f": {note}" if note else "",
        held,
    )
    return True


def pause(
    session: Session, service: str, actor: str, note: str | None, hold_compensations: bool = True
) -> None:
    known(service)
    if not change(
        session,
        service,
        PAUSED,
        action="pause",
        actor=actor,
        note=note,
        hold_compensations=hold_compensations,
        when=(RUNNING, BREAKER_OPEN, HALF_OPEN),
    ):
        raise AlreadyInState(f"{service} is already paused")


def resume(session: Session, service: str, actor: str, note: str | None) -> None:
    """Back to running (also closes an open breaker); the caller kicks the release after commit."""
    known(service)
    if not change(
        session,
        service,
        RUNNING,
        action="resume",
        actor=actor,
        note=note,
        when=(PAUSED, BREAKER_OPEN, HALF_OPEN),
    ):
        raise AlreadyInState(f"{service} is already running")


def failure_rates(session: Session) -> dict[str, tuple[int, int]]:
    """Per service, (calls, transient failures) over the breaker's window, counted from its last
    change of state at the earliest: a resumed service starts with a clean window. A flush is
    stamped with its transaction's start, so the calls a flush begun before the change counted
    stay out, even when it committed in the same second (they were observed before the change)."""
    window = sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, settings().breaker_window_s)
    since = sa.func.greatest(window, ServiceState.since)
    rows = session.execute(
        sa.select(
            ServiceCalls.service,
            sa.func.sum(ServiceCalls.ok + ServiceCalls.transient),
            sa.func.sum(ServiceCalls.transient),
        )
        .outerjoin(ServiceState, ServiceState.service == ServiceCalls.service)
        .where(ServiceCalls.flushed_at >= sa.func.coalesce(since, window))
        .group_by(ServiceCalls.service)
    )
    return {service: (int(calls or 0), int(bad or 0)) for service, calls, bad in rows}


@dataclass(frozen=True)
class ServiceView:
    service: str
    state: str
    since: datetime | None
    by: str | None
    note: str | None
    hold_compensations: bool
    held: int
    calls: int
    failures: int

    @property
    def failure_rate(self) -> float:
        return round(self.failures / self.calls, 4) if self.calls else 0.0


def overview(session: Session) -> list[ServiceView]:
    """Every participant service of the registry, as the services page shows it."""
    rows = {r.service: r for r in session.scalars(sa.select(ServiceState))}
    rates = failure_rates(session)
    held = dict(
        session.execute(
            sa.select(OutboxMessage.queue, sa.func.count())
            .where(OutboxMessage.held_at.is_not(None), OutboxMessage.sent_at.is_(None))
            .group_by(OutboxMessage.queue)
        ).all()
    )
    views = []
    for name in sorted(registry.current().services):
        row = rows.get(name)
        calls, failures = rates.get(name, (0, 0))
        views.append(
            ServiceView(
                service=name,
                state=row.state if row else RUNNING,
                since=row.since if row else None,
                by=row.by if row else None,
                note=row.note if row else None,
                hold_compensations=row.hold_compensations if row else True,
                held=int(held.get(name, 0)),
                calls=calls,
                failures=failures,
            )
        )
    return views


RELEASE_TASK = "saga.release"


def kick(service: str) -> None:
    """Ask an orchestrator to release ``service``'s held commands (after the resume committed);
    if the broker does not take it, the next sweep asks again."""
    from orchestrator.messaging.celery_app import app

    try:
        app.send_task(RELEASE_TASK, args=[service])
    except Exception as exc:
        log.warning("could not ask for %s's release now (%s); the sweep will", service, exc)
