"""The periodic sweep (run by beat): sagas past a deadline, outbox rows the relay left unsent, and
the pending sagas of bulk operations (kernel/operations.py), one sweep interval's worth."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import sqlalchemy as sa

from models.db import run_in_transaction, transaction
from models.enums import SagaState
from models.outbox import OutboxMessage
from models.sagas import Saga, SagaStep
from orchestrator.kernel import engine, operations, release
from orchestrator.messaging import outbox
from orchestrator.ops import process_metrics
from orchestrator.ops.config import settings

log = logging.getLogger(__name__)

# A bulk operation gets one sweep interval per sweep, but never near the task time limits
# (a long SAGA_SWEEP_S must not get the sweep killed mid-slice).
BULK_SLICE_MAX_S = 30.0


@dataclass
class SweepReport:
    sagas_acted_on: int = 0
    outbox_relayed: int = 0
    bulk_acted: int = 0
    probes: int = 0  # held commands let through to a half-open service


def overdue_saga_ids(limit: int = 500) -> list[uuid.UUID]:
    now = engine.utcnow()
    current = sa.and_(SagaStep.saga_id == Saga.id, SagaStep.idx == Saga.current_step)
    with transaction() as session:
        step_overdue = (
            sa.select(Saga.id)
            .join(SagaStep, current)
            .where(Saga.state.in_([SagaState.RUNNING, SagaState.COMPENSATING]))
            .where(SagaStep.deadline_at < now)
        )
        # A held saga's deadline moves on when it is released (orchestrator/kernel/release.py).
        saga_overdue = sa.select(Saga.id).where(
            Saga.state == SagaState.RUNNING, Saga.deadline_at < now, Saga.held_since.is_(None)
        )
        return list(session.scalars(sa.union(step_overdue, saga_overdue).limit(limit)))


def _act(saga_id: uuid.UUID) -> bool:
    def work(session: sa.orm.Session) -> bool:
        # skip_locked: another sweeper (or a reply) has it in hand; the next sweep looks again.
        saga = engine.lock_saga(session, saga_id, skip_locked=True)
        if saga is None:
            return False
        done = engine.on_deadline(session, saga, engine.utcnow())
        if done:
            log.warning("deadline: %s", done, extra={"saga_id": str(saga_id)})
        return done is not None

    return run_in_transaction(work)


def relay_stale_outbox() -> int:
    """Publish rows a sweep interval past the relay's grace: the relay is down or was killed."""
    age = settings().sweep_s + settings().outbox_grace_s
    with transaction() as session:
        stale = session.scalar(
            sa.select(sa.func.count())
            .select_from(OutboxMessage)
            .where(*outbox.UNSENT)
            .where(
                OutboxMessage.created_at
                < sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, age)
            )
        )
    if not stale:
        return 0
    publisher = outbox.ConfirmingPublisher(settings().broker_url, source="sweeper")
    try:
        total = 0
        while True:
            with transaction() as session:
                sent = outbox.relay_once(session, publisher, min_age_s=age)
            total += sent
            if sent < outbox.BATCH:
                return total
    finally:
        publisher.close()


def sweep() -> SweepReport:
    report = SweepReport()
    with process_metrics.SWEEP_DURATION.time():
        for saga_id in overdue_saga_ids():
            report.sagas_acted_on += _act(saga_id)
        report.outbox_relayed = relay_stale_outbox()
        report.probes = release.sweep_holds()
    # Outside the timed part: a bulk operation fills the interval on purpose (its rate bound).
    report.bulk_acted = operations.run(budget_s=min(settings().sweep_s, BULK_SLICE_MAX_S))
    process_metrics.SWEEPS.inc()
    process_metrics.SWEEP_ACTIONS.labels("deadline").inc(report.sagas_acted_on)
    process_metrics.SWEEP_ACTIONS.labels("outbox").inc(report.outbox_relayed)
    process_metrics.SWEEP_ACTIONS.labels("bulk").inc(report.bulk_acted)
    return report
