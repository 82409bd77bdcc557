"""The imperative shell around the state machine: lock, advance, persist, write the outbox.

Every transition of a saga runs in one transaction that first locks the saga row, so transitions
of one saga are serialized across any number of orchestrator processes. The commands a transition
produces are outbox rows in that same transaction: they are sent if and only if the state change
committed. A reply is applied only if its request id is the one the saga waits for.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session, joinedload

from models.catalog import Product
from models.enums import CompensationStatus, OrderStatus, Reason, SagaState, StepStatus
from models.orders import Order, OrderLine
from models.sagas import Saga, SagaEvent, SagaStep
from orchestrator.kernel.machine import (
    CompensationParked,
    CompensationSucceeded,
    Dispatch,
    Event,
    NotApplicable,
    OperatorCompensate,
    OperatorRetry,
    RetryPolicy,
    SagaDefinition,
    Snapshot,
    StepFailed,
    StepSucceeded,
    StepView,
    advance,
    initial,
)
from orchestrator.messaging import outbox
from orchestrator.messaging.envelopes import ReplyOutcome, RetrySpec, make_command
from orchestrator.ops.config import settings
from orchestrator.sagas.order import DEFINITIONS, ORDER_SAGA, REFUSAL_REASON, build_payload

log = logging.getLogger(__name__)

_EVENTS = cast(sa.Table, SagaEvent.__table__)

Kind = Literal["action", "compensation"]


class UnknownSku(ValueError):
    def __init__(self, skus: list[str]) -> None:
        super().__init__(", ".join(skus))
        self.skus = skus


class SagaNotFound(LookupError):
    pass


def utcnow() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------- policies


def retry_policy(definition: SagaDefinition, index: int, kind: Kind) -> RetryPolicy:
    cfg = settings()
    step = definition.steps[index]
    if kind == "action":
        return step.retry or RetryPolicy(cfg.retry_attempts, cfg.retry_base_s, cfg.retry_max_s)
    return step.compensation_retry or RetryPolicy(
        cfg.compensation_attempts, cfg.retry_base_s, cfg.retry_max_s
    )


def step_timeout_s(definition: SagaDefinition, index: int) -> float:
    return definition.steps[index].timeout_s or settings().step_timeout_s


# ---------------------------------------------------------------- starting a saga


@dataclass(frozen=True)
class NewOrder:
    customer_id: str
    items: list[tuple[str, int]]
    card_token: str
    faults: dict[str, str] | None = None


@dataclass(frozen=True)
class Started:
    order_id: uuid.UUID
    saga_id: uuid.UUID


def start_order(session: Session, new: NewOrder) -> Started:
    """Write the order, its saga and the saga's first command, in the caller's transaction."""
    skus = [sku for sku, _ in new.items]
    prices: dict[str, int] = {
        sku: price
        for sku, price in session.execute(
            sa.select(Product.sku, Product.price_cents).where(Product.sku.in_(skus))
        )
    }
    unknown = [sku for sku in skus if sku not in prices]
    if unknown:
        raise UnknownSku(unknown)
    now = utcnow()
    order_id, saga_id = uuid.uuid4(), uuid.uuid4()
    total = sum(prices[sku] * qty for sku, qty in new.items)
    order = Order(
        id=order_id,
        customer_id=new.customer_id,
        status=OrderStatus.PENDING,
        total_cents=total,
        card_last4=new.card_token[-4:],
        created_at=now,
        updated_at=now,
    )
    lines = [
        OrderLine(order_id=order_id, sku=sku, quantity=qty, price_cents=prices[sku])
        for sku, qty in new.items
    ]
    snap, dispatches = initial(ORDER_SAGA)
    saga = Saga(
        id=saga_id,
        order_id=order_id,
        definition=ORDER_SAGA.name,
        state=snap.state,
        current_step=snap.current,
        context={
            "order_id": str(order_id),
            "items": [{"sku": sku, "quantity": qty} for sku, qty in new.items],
            "total_cents": total,
            "card_token": new.card_token,
            "faults": new.faults or {},
        },
        deadline_at=now + timedelta(seconds=settings().saga_deadline_s),
        created_at=now,
        updated_at=now,
    )
    saga.steps = [
        SagaStep(
            saga_id=saga_id,
            idx=i,
            name=step.name,
            status=view.status,
            attempts=0,
            attempts_base=0,
            compensation=step.compensation,
            comp_status=view.comp_status,
            comp_attempts=0,
            comp_attempts_base=0,
            finished_at=now if view.status is StepStatus.SUCCEEDED else None,
        )
        for i, (step, view) in enumerate(zip(ORDER_SAGA.steps, snap.steps, strict=True))
    ]
    record(session, saga, "saga.started", detail=f"order {order_id}")
    _dispatch(session, saga, ORDER_SAGA, dispatches, now)  # fills in the first step's request
    # The new rows go in with Core INSERTs, never added to the session: the ORM unit of work for
    # these seven objects was about 30 % of the web's CPU per order.
    _insert(session, [order])
    _insert(session, lines)
    _insert(session, [saga])
    _insert(session, saga.steps)
    log.info("saga started", extra={"saga_id": str(saga_id), "order_id": str(order_id)})
    return Started(order_id, saga_id)


def _insert(session: Session, rows: list[Any]) -> None:
    """INSERT new (transient) mapped objects of one class, every column as set on them."""
    table = cast(sa.Table, type(rows[0]).__table__)
    session.execute(
        sa.insert(table), [{c.key: getattr(row, c.key) for c in table.columns} for row in rows]
    )


# ---------------------------------------------------------------- loading and recording


def lock_saga(session: Session, saga_id: uuid.UUID, *, skip_locked: bool = False) -> Saga | None:
    """The saga row, locked for this transaction: the one point that serializes transitions."""
    query = (
        sa.select(Saga)
        .options(joinedload(Saga.steps))  # one round trip for the saga and its steps
        .where(Saga.id == saga_id)
        .with_for_update(of=Saga, skip_locked=skip_locked)
    )
    return session.scalars(query).unique().one_or_none()


EVENTS_KEY = "saga.events"


def record(
    session: Session,
    saga: Saga,
    event: str,
    *,
    step: str | None = None,
    attempt: int | None = None,
    detail: str | None = None,
    actor: str | None = None,
) -> None:
    """Add an event to the saga's timeline; the transaction's events are written at its commit."""
    session.info.setdefault(EVENTS_KEY, []).append(
        {
            "saga_id": saga.id,
            "event": event,
            "step": step,
            "attempt": attempt,
            "detail": detail,
            "actor": actor,
        }
    )


@sa.event.listens_for(Session, "before_commit")
def _write_events(session: Session) -> None:
    # One multi-row INSERT per transaction instead of one ORM object per event (the unit of work
    # was a third of the orchestrator's CPU). The flush first: the events reference the saga.
    rows = session.info.pop(EVENTS_KEY, None)
    if rows:
        session.flush()
        session.execute(sa.insert(_EVENTS), rows)


@sa.event.listens_for(Session, "after_rollback")
def _forget_events(session: Session) -> None:
    session.info.pop(EVENTS_KEY, None)


def snapshot_of(saga: Saga) -> Snapshot:
    return Snapshot(
        state=saga.state,
        current=saga.current_step,
        steps=tuple(StepView(row.status, row.comp_status) for row in saga.steps),
        reason=saga.reason,
    )


def awaits(
    saga: Saga,
    index: int,
    kind: Kind,
    request_id: uuid.UUID | None = None,
    *,
    success: bool = False,
) -> bool:
    """Is the saga waiting for this step's action (or compensation), and for this request?

    A parked compensation still takes a late *success* of its last request: the work was done
    after it gave up waiting, and the saga carries on compensating instead of staying parked.
    """
    row = saga.steps[index]
    if saga.current_step != index:
        return False
    if kind == "action":
        waiting = saga.state is SagaState.RUNNING and row.status is StepStatus.RUNNING
        awaited = row.request_id
    else:
        waiting = (
            saga.state is SagaState.COMPENSATING and row.comp_status is CompensationStatus.RUNNING
        ) or (
            success
            and saga.state is SagaState.FAILED
            and row.comp_status is CompensationStatus.PARKED
        )
        awaited = row.comp_request_id
    return waiting and (request_id is None or request_id == awaited)


# ---------------------------------------------------------------- transitions


def transition(session: Session, saga: Saga, event: Event, now: datetime | None = None) -> None:
    """Advance the saga by one event; persist the result, its timeline and its commands."""
    now = now or utcnow()
    definition = DEFINITIONS[saga.definition]
    before = snapshot_of(saga)
    after, dispatches = advance(definition, before, event)
    _persist(session, saga, definition, before, after, now)
    _dispatch(session, saga, definition, dispatches, now)


def _persist(
    session: Session,
    saga: Saga,
    definition: SagaDefinition,
    before: Snapshot,
    after: Snapshot,
    now: datetime,
) -> None:
    for i, (old, new) in enumerate(zip(before.steps, after.steps, strict=True)):
        row = saga.steps[i]
        if old.status is not new.status:
            row.status = new.status
            if new.status in (StepStatus.SUCCEEDED, StepStatus.FAILED):
                row.finished_at, row.deadline_at = now, None
            if new.status is StepStatus.SUCCEEDED:
                row.error = None  # earlier attempts' errors stay in the timeline
                record(session, saga, "step.succeeded", step=row.name, attempt=row.attempts)
        if old.comp_status is not new.comp_status:
            row.comp_status = new.comp_status
            if new.comp_status in (CompensationStatus.SUCCEEDED, CompensationStatus.PARKED):
                row.comp_finished_at, row.deadline_at = now, None
            if new.comp_status is CompensationStatus.SUCCEEDED:
                row.comp_error = None
                record(
                    session,
                    saga,
                    "compensation.succeeded",
                    step=row.compensation,
                    attempt=row.comp_attempts,
                )
            elif new.comp_status is CompensationStatus.PARKED:
                record(
                    session,
                    saga,
                    "compensation.parked",
                    step=row.compensation,
                    attempt=row.comp_attempts,
                    detail="waiting for an operator",
                )
    saga.current_step = after.current
    saga.reason = after.reason
    saga.updated_at = now
    if after.state is not before.state:
        saga.state = after.state
        if after.state.final:
            record(session, saga, f"saga.{after.state.value}", detail=_reason_text(saga))
        _order_follows(session, saga, after.state, now)


def _order_follows(session: Session, saga: Saga, state: SagaState, now: datetime) -> None:
    """A parked saga fails its order; un-parking makes it pending again until compensation ends.

    Confirm and cancel are the orders service's own steps; only these two moves are the engine's.
    """
    if state is SagaState.FAILED:
        # From pending, or from confirmed when a late confirm landed after the step timed out.
        values: dict[str, Any] = {"status": OrderStatus.FAILED, "reason": saga.reason}
        sources = [OrderStatus.PENDING, OrderStatus.CONFIRMED]
    elif state is SagaState.COMPENSATING:
        values, sources = {"status": OrderStatus.PENDING}, [OrderStatus.FAILED]
    else:
        return
    session.execute(
        sa.update(Order)
        .where(Order.id == saga.order_id, Order.status.in_(sources))
        .values(updated_at=now, **values)
    )


def _reason_text(saga: Saga) -> str | None:
    return f"reason {saga.reason.value}" if saga.reason else None


def _dispatch(
    session: Session,
    saga: Saga,
    definition: SagaDefinition,
    dispatches: list[Dispatch],
    now: datetime,
) -> None:
    for d in dispatches:
        row = saga.steps[d.index]
        step = definition.steps[d.index]
        policy = retry_policy(definition, d.index, d.kind)
        deadline = now + timedelta(seconds=step_timeout_s(definition, d.index))
        if d.kind == "action":
            assert step.action is not None
            command = step.action
            if d.fresh or row.request_id is None:
                row.request_id = uuid.uuid4()
                row.started_at = row.started_at or now
            row.attempts += 1
            attempt, request_id = row.attempts, row.request_id
            record(session, saga, "step.dispatched", step=command, attempt=attempt)
        else:
            assert step.compensation is not None
            command = step.compensation
            if d.fresh or row.comp_request_id is None:
                row.comp_request_id = uuid.uuid4()
                row.comp_started_at = row.comp_started_at or now
            row.comp_attempts += 1
            attempt, request_id = row.comp_attempts, row.comp_request_id
            record(session, saga, "compensation.dispatched", step=command, attempt=attempt)
        row.deadline_at = deadline
        payload = build_payload(
            command,
            saga.context,
            RetrySpec(attempts=policy.attempts, base_s=policy.base_s, max_s=policy.max_s),
            saga.reason,
        )
        envelope = make_command(
            command,
            saga_id=saga.id,
            request_id=request_id,
            step=step.name,
            attempt=attempt,
            payload=payload,
        )
        outbox.enqueue(session, command, envelope)


# ---------------------------------------------------------------- replies


def on_reply(
    session: Session,
    saga: Saga,
    command: str,
    request_id: uuid.UUID,
    attempt: int,
    outcome: ReplyOutcome,
    *,
    error: str | None = None,
    retry_in_s: float | None = None,
) -> str:
    """Apply one participant reply to a locked saga. Returns what happened, for the log."""
    definition = DEFINITIONS[saga.definition]
    index, kind = definition.by_command(command)
    if not awaits(saga, index, kind, request_id, success=outcome is ReplyOutcome.SUCCEEDED):
        return "ignored (not awaited: late or duplicate)"
    row = saga.steps[index]
    now = utcnow()
    if kind == "action":
        row.attempts = max(row.attempts, attempt)
    else:
        row.comp_attempts = max(row.comp_attempts, attempt)
    prefix = "step" if kind == "action" else "compensation"
    if outcome is ReplyOutcome.RETRYING:
        delay = retry_in_s or 0.0
        record(session, saga, f"{prefix}.failed", step=command, attempt=attempt, detail=error)
        record(
            session,
            saga,
            "step.retried",
            step=command,
            attempt=attempt + 1,
            detail=f"next attempt in {delay:.2f}s",
        )
        _set_error(row, kind, error)
        if kind == "action":
            row.attempts = max(row.attempts, attempt + 1)
        else:
            row.comp_attempts = max(row.comp_attempts, attempt + 1)
        row.deadline_at = now + timedelta(seconds=delay + step_timeout_s(definition, index))
        saga.updated_at = now
        return "retrying"
    if outcome is ReplyOutcome.SUCCEEDED:
        event: Event = StepSucceeded(index) if kind == "action" else CompensationSucceeded(index)
    else:
        record(session, saga, f"{prefix}.failed", step=command, attempt=attempt, detail=error)
        _set_error(row, kind, error)
        if kind == "action":
            event = StepFailed(index, REFUSAL_REASON[command], partial=False)
        else:
            event = CompensationParked(index)
    transition(session, saga, event, now)
    return f"{outcome.value}: saga {saga.state.value}"


def on_exhausted(
    session: Session,
    saga: Saga,
    command: str,
    request_id: uuid.UUID | None,
    why: str,
    *,
    cause: str,
    reason: Reason,
    attempt: int | None = None,
) -> bool:
    """The step or compensation gave up (dead-lettered, or past its deadline with no budget left).

    An action turns the saga back (it may have partly taken effect); a compensation parks.
    """
    definition = DEFINITIONS[saga.definition]
    index, kind = definition.by_command(command)
    if not awaits(saga, index, kind, request_id):
        return False
    row = saga.steps[index]
    # A dead letter may overtake the "retrying" replies of the attempts before it.
    if attempt is not None and kind == "action":
        row.attempts = max(row.attempts, attempt)
    elif attempt is not None:
        row.comp_attempts = max(row.comp_attempts, attempt)
    attempt = row.attempts if kind == "action" else row.comp_attempts
    record(session, saga, cause, step=command, attempt=attempt, detail=why)
    _set_error(row, kind, why)
    if kind == "action":
        transition(session, saga, StepFailed(index, reason, partial=True))
    else:
        record(session, saga, "compensation.failed", step=command, attempt=attempt, detail=why)
        transition(session, saga, CompensationParked(index))
    return True


def _set_error(row: SagaStep, kind: Kind, error: str | None) -> None:
    if kind == "action":
        row.error = error
    else:
        row.comp_error = error


# ---------------------------------------------------------------- operator actions


def is_stuck(saga: Saga, now: datetime | None = None) -> bool:
    if saga.state.final:
        return False
    deadline = saga.steps[saga.current_step].deadline_at
    return deadline is not None and deadline < (now or utcnow())


def operator_action(
    session: Session, saga_id: uuid.UUID, action: str, actor: str, note: str | None
) -> SagaState:
    """Retry (resume a stuck or parked saga) or compensate (abort a running one), with a record."""
    saga = lock_saga(session, saga_id)
    if saga is None:
        raise SagaNotFound(str(saga_id))
    if action == "retry":
        if not (saga.state is SagaState.FAILED or is_stuck(saga)):
            raise NotApplicable(f"only a stuck or failed saga can be retried (it is {saga.state})")
        record(session, saga, "operator.retry", actor=actor, detail=note)
        current = saga.steps[saga.current_step]
        if saga.state is SagaState.RUNNING:
            current.attempts_base = current.attempts
        else:
            current.comp_attempts_base = current.comp_attempts
        transition(session, saga, OperatorRetry())
    elif action == "compensate":
        if saga.state is not SagaState.RUNNING:
            raise NotApplicable(f"only a running saga can be compensated (it is {saga.state})")
        record(session, saga, "operator.compensate", actor=actor, detail=note)
        current = saga.steps[saga.current_step]
        record(
            session,
            saga,
            "step.failed",
            step=current.name,
            attempt=current.attempts,
            detail="aborted by operator",
        )
        transition(session, saga, OperatorCompensate())
    else:
        raise ValueError(f"unknown action {action!r}")
    return saga.state


# ---------------------------------------------------------------- deadlines


def on_deadline(session: Session, saga: Saga, now: datetime) -> str | None:
    """The sweeper's move for a saga past a deadline: re-send within the budget, else give up."""
    if saga.state.final:
        return None
    definition = DEFINITIONS[saga.definition]
    index = saga.current_step
    kind: Kind = "action" if saga.state is SagaState.RUNNING else "compensation"
    row = saga.steps[index]
    command = definition.steps[index].action if kind == "action" else row.compensation
    assert command is not None
    request_id = row.request_id if kind == "action" else row.comp_request_id
    if kind == "action" and saga.deadline_at < now:
        on_exhausted(
            session,
            saga,
            command,
            request_id,
            "the saga's deadline passed",
            cause="step.timed_out",
            reason=Reason.TIMEOUT,
        )
        return "saga deadline"
    if row.deadline_at is None or row.deadline_at >= now:
        return None
    # Attempts of the current budget (an operator retry starts a fresh one).
    if kind == "action":
        attempts = row.attempts - row.attempts_base
    else:
        attempts = row.comp_attempts - row.comp_attempts_base
    if attempts < retry_policy(definition, index, kind).attempts:
        record(
            session,
            saga,
            "step.timed_out",
            step=command,
            attempt=attempts,
            detail="no reply before the deadline; sending again",
        )
        _dispatch(session, saga, definition, [Dispatch(index, kind, fresh=False)], now)
        saga.updated_at = now
        return "re-sent"
    on_exhausted(
        session,
        saga,
        command,
        request_id,
        "no reply before the deadline, no attempts left",
        cause="step.timed_out",
        reason=Reason.TIMEOUT,
    )
    return "gave up"
