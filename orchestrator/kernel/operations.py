"""Bulk operations by filter: recorded with their work list, then acted on at a bounded rate.

``start`` writes, in the caller's transaction, the operation and one item per saga the filter
matches (the admin list's query, copied by one INSERT ... SELECT). Beat's sweep then calls ``run``:
one runner at a time (a session advisory lock, which PostgreSQL drops with the connection of a
killed runner) acts on the pending items oldest operation first, at most ``SAGA_BULK_RATE`` a
second, each in a transaction of its own that also writes the item's result. A crash at any line
leaves an item pending (rolled back with its action) or done (committed with it): a restarted
runner carries on where the last one stopped, and no saga is acted on twice by one operation.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from models.db import get_engine, run_in_transaction
from models.enums import SagaState
from models.operations import Operation, OperationItem
from models.sagas import Saga
from orchestrator import queries
from orchestrator.kernel import engine
from orchestrator.kernel.machine import NotApplicable
from orchestrator.ops.config import settings
from orchestrator.ops.logs import log_context
from orchestrator.registry import TimelineEvent

log = logging.getLogger(__name__)

# pg_advisory_lock's key for "the operations runner" (any constant no other code uses).
RUNNER_LOCK = 0x5A6A_0B01
SAMPLE = 10


def act(
    session: Session, saga_id: uuid.UUID, action: str, actor: str, note: str | None
) -> tuple[int, SagaState | None]:
    """An operator's retry or compensate of one saga as an HTTP status: 202 with its new state,
    404 no such saga, 409 the action does not apply to it now."""
    try:
        return 202, engine.operator_action(session, saga_id, action, actor, note)
    except engine.SagaNotFound:
        return 404, None
    except NotApplicable:
        return 409, None


def preview(session: Session, wanted: queries.SagaFilter) -> tuple[int, list[uuid.UUID]]:
    """A dry run: how many sagas the filter selects, and the first of them as the list shows."""
    selected = queries.matching(wanted)
    count = session.scalar(sa.select(sa.func.count()).select_from(selected.subquery()))
    sample = session.scalars(selected.order_by(*queries.NEWEST_FIRST).limit(SAMPLE))
    return int(count or 0), list(sample)


def start(
    session: Session,
    action: str,
    wanted: queries.SagaFilter,
    recorded: dict[str, Any],
    actor: str,
    note: str | None,
) -> uuid.UUID:
    """Record an operation and its work list (``recorded``: the filter as the operator sent it)."""
    operation_id = uuid.uuid4()
    session.execute(
        sa.insert(Operation).values(
            id=operation_id, action=action, actor=actor, note=note, filter=recorded, total=0
        )
    )
    ranked = queries.matching(
        wanted,
        sa.literal(operation_id, sa.Uuid()),
        Saga.id,
        sa.func.row_number().over(order_by=queries.NEWEST_FIRST),
    )
    session.execute(
        sa.insert(OperationItem).from_select(["operation_id", "saga_id", "position"], ranked)
    )
    total = session.scalar(
        sa.select(sa.func.count()).where(OperationItem.operation_id == operation_id)
    )
    # An operation that matched nothing is done as soon as it is recorded.
    finished = {"finished_at": sa.func.now()} if total == 0 else {}
    session.execute(
        sa.update(Operation).where(Operation.id == operation_id).values(total=total, **finished)
    )
    log.info("operation %s: %s on %d sagas by %s", operation_id, action, total, actor)
    return operation_id


def _act_on_next() -> datetime | None:
    """Act on the next pending item, its result written in the same transaction; returns when
    (None: nothing is pending)."""

    def work(session: Session) -> datetime | None:
        row = session.execute(
            sa.select(OperationItem, Operation)
            .join(Operation, Operation.id == OperationItem.operation_id)
            .where(OperationItem.status.is_(None))
            .order_by(Operation.created_at, Operation.id, OperationItem.position)
            .limit(1)
            .with_for_update(of=OperationItem, skip_locked=True)
        ).first()
        if row is None:
            return None
        item, operation = row
        with log_context(saga_id=item.saga_id, operation_id=operation.id):
            status, state = act(
                session, item.saga_id, operation.action, operation.actor, operation.note
            )
            if status == 202:
                saga = session.get(Saga, item.saga_id)  # locked by the action, in the session
                assert saga is not None
                engine.record(
                    session,
                    saga,
                    TimelineEvent.OPERATOR_BULK,
                    actor=operation.actor,
                    detail=f"operation {operation.id} ({operation.action})",
                )
            now = engine.utcnow()
            item.status, item.state, item.acted_at = status, state.value if state else None, now
            operation.done += 1
            operation.started_at = operation.started_at or now
            if operation.done >= operation.total:
                operation.finished_at = now
            log.info("operation %s: %s answered %d", operation.id, operation.action, status)
        return now

    return run_in_transaction(work)


def _pending() -> bool:
    """Anything to do (the partial index of pending items answers it)?"""
    with get_engine().connect() as conn:
        pending = sa.exists().where(OperationItem.status.is_(None))
        return bool(conn.scalar(sa.select(pending)))


def _last_acted() -> datetime | None:
    """The last action of any runner, among operations not finished a minute ago (older ones
    cannot bound the rate any more)."""
    recent = sa.or_(
        Operation.finished_at.is_(None),
        Operation.finished_at > sa.func.now() - sa.text("interval '1 minute'"),
    )
    with get_engine().connect() as conn:
        last: datetime | None = conn.scalar(
            sa.select(sa.func.max(OperationItem.acted_at))
            .join(Operation, Operation.id == OperationItem.operation_id)
            .where(recent)
        )
        return last


def _run_locked(budget_s: float) -> int:
    interval = 1.0 / settings().bulk_rate
    until = time.monotonic() + budget_s
    # Paced from the last action of any runner, so a restart or the next sweep keeps the rate.
    last = _last_acted()
    acted = 0
    while True:
        wait = 0.0 if last is None else interval - (engine.utcnow() - last).total_seconds()
        if time.monotonic() + max(wait, 0.0) >= until:
            return acted
        if wait > 0:
            time.sleep(wait)  # the rate bound itself
        at = _act_on_next()
        if at is None:
            return acted
        last, acted = at, acted + 1


def run(budget_s: float) -> int:
    """Act on pending operation items for up to ``budget_s`` seconds; returns how many. Another
    runner holding the lock (a second orchestrator or sweep): returns 0 at once."""
    if not _pending():
        return 0
    with get_engine().connect() as conn:
        if not conn.scalar(sa.select(sa.func.pg_try_advisory_lock(RUNNER_LOCK))):
            return 0
        conn.commit()  # the lock is the session's and outlives this transaction
        try:
            return _run_locked(budget_s)
        finally:
            conn.execute(sa.select(sa.func.pg_advisory_unlock(RUNNER_LOCK)))
            conn.commit()
