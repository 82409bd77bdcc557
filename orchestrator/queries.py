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
from models.enums import SagaState
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


def list_sagas(
    session: Session,
    state: str | None,
    q: str | None,
    cursor: Cursor | None,
    definition: str | None = None,
    held: bool | None = None,
) -> tuple[list[dict[str, Any]], Cursor | None]:
    """Newest first, PAGE_SIZE a page, keyset-paginated on (created_at, id). ``held``: only the
    sagas whose command waits for a paused service (True) or only the others (False)."""
    current = (
        sa.select(SagaStep.name)
        .where(SagaStep.saga_id == Saga.id, SagaStep.idx == Saga.current_step)
        .scalar_subquery()
    )
    query = sa.select(Saga, current.label("current_name"), _current_deadline().label("deadline"))
    if state == "stuck":
        query = query.where(_stuck_clause())
    elif state:
        query = query.where(Saga.state == SagaState(state))
    if definition:
        query = query.where(Saga.definition == definition)
    if held is not None:
        query = query.where(Saga.held_since.is_not(None) if held else Saga.held_since.is_(None))
    if q:
        try:
            ident = uuid.UUID(q.strip())
        except ValueError:
            return [], None
        query = query.where(sa.or_(Saga.id == ident, Saga.business_key == str(ident)))
    if cursor:
        query = query.where(
            sa.tuple_(Saga.created_at, Saga.id) < (cursor.created_at, cursor.saga_id)
        )
    query = query.order_by(Saga.created_at.desc(), Saga.id.desc()).limit(PAGE_SIZE + 1)
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
