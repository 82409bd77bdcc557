"""The read side: what the order page, the products list and the admin console show."""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from models.catalog import Product
from models.enums import Reason, SagaState
from models.operations import Operation, OperationItem
from models.orders import Order
from models.sagas import Saga, SagaEvent, SagaStep
from orchestrator.kernel import engine
from orchestrator.sagas.order import ORDER_SAGA

RETURN_SAGA_NAME = "return"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def products(session: Session) -> list[dict[str, Any]]:
    rows = session.scalars(sa.select(Product).order_by(Product.sku))
    return [
        {
            "sku": p.sku,
            "name": p.name,
            "price_cents": p.price_cents,
            "available": p.available,
            "reserved": p.reserved,
            "sold": p.sold,
        }
        for p in rows
    ]


def known_skus(session: Session, skus: list[str]) -> set[str]:
    return set(session.scalars(sa.select(Product.sku).where(Product.sku.in_(skus))))


def step_views(saga: Saga) -> list[dict[str, Any]]:
    views = []
    for row in saga.steps:
        compensation = None
        if row.compensation:
            compensation = {
                "name": row.compensation,
                "status": (row.comp_status.value if row.comp_status else "pending"),
                "attempts": row.comp_attempts,
                "error": row.comp_error,
                "started_at": _iso(row.comp_started_at),
                "finished_at": _iso(row.comp_finished_at),
            }
        views.append(
            {
                "name": row.name,
                "status": row.status.value,
                "attempts": row.attempts,
                "started_at": _iso(row.started_at),
                "finished_at": _iso(row.finished_at),
                "error": row.error,
                "deadline_at": _iso(row.deadline_at),
                "compensation": compensation,
            }
        )
    return views


def timeline(session: Session, saga_id: uuid.UUID) -> list[dict[str, Any]]:
    events = session.scalars(
        sa.select(SagaEvent)
        .where(SagaEvent.saga_id == saga_id)
        .order_by(SagaEvent.at, SagaEvent.id)
    )
    return [
        {
            "at": _iso(e.at),
            "event": e.event,
            "step": e.step,
            "attempt": e.attempt,
            "detail": e.detail,
            "actor": e.actor,
        }
        for e in events
    ]


def saga_view(session: Session, saga: Saga) -> dict[str, Any]:
    return {
        "saga_id": str(saga.id),
        "state": saga.state.value,
        "stuck": engine.is_stuck(saga),
        "definition": saga.definition,
        "definition_version": saga.definition_version,
        "steps": step_views(saga),
        "timeline": timeline(session, saga.id),
    }


def order_view(session: Session, order_id: uuid.UUID) -> dict[str, Any] | None:
    order = session.get(Order, order_id)
    if order is None:
        return None
    sagas = session.scalars(
        sa.select(Saga).where(Saga.business_key == str(order_id)).order_by(Saga.created_at)
    ).all()
    saga = next(s for s in sagas if s.definition == ORDER_SAGA.name)
    return {
        "order_id": str(order.id),
        "customer_id": order.customer_id,
        "status": order.status.value,
        "reason": order.reason.value if order.reason else None,
        "total_cents": order.total_cents,
        "card_last4": order.card_last4,
        "created_at": _iso(order.created_at),
        "items": [
            {"sku": line.sku, "quantity": line.quantity, "price_cents": line.price_cents}
            for line in order.lines
        ],
        "saga": saga_view(session, saga),
        "returns": [saga_view(session, s) for s in sagas if s.definition == RETURN_SAGA_NAME],
    }


# ---------------------------------------------------------------- admin lists

PAGE_SIZE = 50
STATES = ("stuck", *(s.value for s in SagaState))


def _current_deadline() -> Any:
    return (
        sa.select(SagaStep.deadline_at)
        .where(SagaStep.saga_id == Saga.id, SagaStep.idx == Saga.current_step)
        .scalar_subquery()
    )


def _stuck_clause() -> Any:
    return sa.and_(
        Saga.state.in_([SagaState.RUNNING, SagaState.COMPENSATING]),
        _current_deadline() < sa.func.now(),
    )


def counts(session: Session) -> dict[str, int]:
    by_state = dict(
        session.execute(sa.select(Saga.state, sa.func.count()).group_by(Saga.state)).all()
    )
    result = {state.value: int(by_state.get(state, 0)) for state in SagaState}
    result["stuck"] = int(session.scalar(sa.select(sa.func.count()).where(_stuck_clause())) or 0)
    return result


@dataclass(frozen=True)
class Cursor:
    created_at: datetime
    saga_id: uuid.UUID

    def encode(self) -> str:
        raw = json.dumps([self.created_at.isoformat(), str(self.saga_id)]).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @staticmethod
    def decode(text: str) -> Cursor:
        """Raises ValueError on anything that is not a cursor this code made."""
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            created, saga_id = json.loads(raw)
            return Cursor(datetime.fromisoformat(created), uuid.UUID(saga_id))
        except Exception as exc:
            raise ValueError("invalid cursor") from exc


@dataclass(frozen=True)
class SagaFilter:
    """What the admin list selects, and so what a bulk operation by filter acts on.

    ``state`` is a saga state or "stuck"; ``step`` is the name of the saga's current step;
    ``created_after``/``created_before`` bound its creation (inclusive, exclusive); ``q`` (an order
    or saga id) is the list's search box; ``held``: only the sagas whose command waits for a paused
    service (True) or only the others (False).
    """

    state: str | None = None
    reason: str | None = None
    step: str | None = None
    definition: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    q: str | None = None
    held: bool | None = None


def _current_name() -> Any:
    return (
        sa.select(SagaStep.name)
        .where(SagaStep.saga_id == Saga.id, SagaStep.idx == Saga.current_step)
        .scalar_subquery()
    )


def _matching(query: Any, wanted: SagaFilter) -> Any:
    """``query`` (of sagas) narrowed to the sagas ``wanted`` selects."""
    if wanted.state == "stuck":
        query = query.where(_stuck_clause())
    elif wanted.state:
        query = query.where(Saga.state == SagaState(wanted.state))
    if wanted.reason:
        query = query.where(Saga.reason == Reason(wanted.reason))
    if wanted.step:
        query = query.where(_current_name() == wanted.step)
    if wanted.definition:
        query = query.where(Saga.definition == wanted.definition)
    if wanted.created_after:
        query = query.where(Saga.created_at >= wanted.created_after)
    if wanted.created_before:
        query = query.where(Saga.created_at < wanted.created_before)
    if wanted.held is not None:
        query = query.where(Saga.held_since.is_not(None) if wanted.held else Saga.held_since.is_(None))
    if wanted.q:
        try:
            ident = uuid.UUID(wanted.q.strip())
        except ValueError:
            return query.where(sa.false())  # not an id: nothing is about it
        query = query.where(sa.or_(Saga.id == ident, Saga.business_key == str(ident)))
    return query


NEWEST_FIRST = (Saga.created_at.desc(), Saga.id.desc())


def list_sagas(
    session: Session, wanted: SagaFilter, cursor: Cursor | None
) -> tuple[list[dict[str, Any]], Cursor | None]:
    """Newest first, PAGE_SIZE a page, keyset-paginated on (created_at, id)."""
    query = _matching(
        sa.select(Saga, _current_name().label("current_name"), _current_deadline().label("deadline")),
        wanted,
    )
    if cursor:
        query = query.where(
            sa.tuple_(Saga.created_at, Saga.id) < (cursor.created_at, cursor.saga_id)
        )
    query = query.order_by(*NEWEST_FIRST).limit(PAGE_SIZE + 1)
    rows = session.execute(query).all()
    now = engine.utcnow()
    items = [
        {
            "saga_id": str(saga.id),
            "order_id": saga.business_key,
            "definition": saga.definition,
            "definition_version": saga.definition_version,
            "state": saga.state.value,
            "stuck": (not saga.state.final) and deadline is not None and deadline < now,
            "held": saga.held_since is not None,
            "current_step": name,
            "reason": saga.reason.value if saga.reason else None,
            "created_at": _iso(saga.created_at),
            "updated_at": _iso(saga.updated_at),
        }
        for saga, name, deadline in rows[:PAGE_SIZE]
    ]
    next_cursor = None
    if len(rows) > PAGE_SIZE:
        last = rows[PAGE_SIZE - 1][0]
        next_cursor = Cursor(last.created_at, last.id)
    return items, next_cursor


def matching(wanted: SagaFilter, *columns: Any) -> Any:
    """A select of ``columns`` (the saga's id if none) over the sagas ``wanted`` selects: what a
    bulk operation counts, samples and copies into its work list."""
    return _matching(sa.select(*(columns or (Saga.id,))), wanted)


def _order_of(session: Session, business_key: str) -> Order | None:
    """The order a shop saga is about (a saga of another kind has none)."""
    try:
        return session.get(Order, uuid.UUID(business_key))
    except ValueError:
        return None


def saga_detail(session: Session, saga_id: uuid.UUID) -> dict[str, Any] | None:
    saga = session.get(Saga, saga_id)
    if saga is None:
        return None
    order = _order_of(session, saga.business_key)
    view = saga_view(session, saga)
    view.update(
        {
            "order_id": saga.business_key,
            "order_status": order.status.value if order else None,
            "customer_id": order.customer_id if order else None,
            "reason": saga.reason.value if saga.reason else None,
            "created_at": _iso(saga.created_at),
            "updated_at": _iso(saga.updated_at),
            "current_step": saga.steps[saga.current_step].name,
        }
    )
    return view


# ---------------------------------------------------------------- bulk operations

OPERATIONS_PAGE = 50


def _operation_state(op: Operation) -> str:
    if op.finished_at is not None:
        return "done"
    return "running" if op.started_at is not None else "pending"


def _operation_view(op: Operation, results: dict[str, int]) -> dict[str, Any]:
    return {
        "operation_id": str(op.id),
        "action": op.action,
        "actor": op.actor,
        "note": op.note,
        "filter": op.filter,
        "state": _operation_state(op),
        "total": op.total,
        "done": op.done,
        "results": results,
        "created_at": _iso(op.created_at),
        "started_at": _iso(op.started_at),
        "finished_at": _iso(op.finished_at),
    }


def _results(session: Session, ids: list[uuid.UUID]) -> dict[uuid.UUID, dict[str, int]]:
    """Per operation: how many of its sagas answered each status so far."""
    rows = session.execute(
        sa.select(OperationItem.operation_id, OperationItem.status, sa.func.count())
        .where(OperationItem.operation_id.in_(ids), OperationItem.status.is_not(None))
        .group_by(OperationItem.operation_id, OperationItem.status)
    )
    found: dict[uuid.UUID, dict[str, int]] = {i: {} for i in ids}
    for operation_id, status, n in rows:
        found[operation_id][str(status)] = int(n)
    return found


def operations(session: Session) -> list[dict[str, Any]]:
    """The latest bulk operations, newest first, with their progress."""
    ops = session.scalars(
        sa.select(Operation).order_by(Operation.created_at.desc()).limit(OPERATIONS_PAGE)
    ).all()
    results = _results(session, [op.id for op in ops])
    return [_operation_view(op, results[op.id]) for op in ops]


def operation_detail(session: Session, operation_id: uuid.UUID) -> dict[str, Any] | None:
    """One operation with every saga's result, in the order it acts on them."""
    op = session.get(Operation, operation_id)
    if op is None:
        return None
    items = session.scalars(
        sa.select(OperationItem)
        .where(OperationItem.operation_id == operation_id)
        .order_by(OperationItem.position)
    )
    view = _operation_view(op, _results(session, [op.id])[op.id])
    view["items"] = [
        {"saga_id": str(i.saga_id), "status": i.status, "state": i.state, "at": _iso(i.acted_at)}
        for i in items
    ]
    return view
