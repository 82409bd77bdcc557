"""Placing an order: backpressure, idempotency keys, and the saga start, in one statement."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from models.catalog import Product
from models.db import get_engine
from models.enums import OrderStatus
from models.orders import IdempotencyKey, Order, OrderLine
from models.outbox import OutboxMessage
from models.sagas import Saga, SagaEvent, SagaStep
from orchestrator.kernel import engine, holds, one_statement
from orchestrator.kernel.one_statement import Also
from orchestrator.messaging import fastpath, outbox
from orchestrator.sagas.once import (
    Backlogged,
    IdempotencyInFlight,
    IdempotencyMismatch,
    backlogged,
    start_once,
)
from orchestrator.sagas.order import ORDER_SAGA

__all__ = [
    "Backlogged",
    "IdempotencyInFlight",
    "IdempotencyMismatch",
    "NewOrder",
    "Placement",
    "UnknownSku",
    "place_order",
    "start_order",
]

# ---------------------------------------------------------------- the order and its saga


class UnknownSku(ValueError):
    def __init__(self, skus: list[str]) -> None:
        super().__init__(", ".join(skus))
        self.skus = skus


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

    @property
    def ids(self) -> tuple[uuid.UUID, uuid.UUID]:
        return self.order_id, self.saga_id


# Prices seen in the catalogue, per process: the statement that writes an order checks that
# each is still the catalogue's (its guard) and, if one changed, is run again with fresh ones.
_prices: dict[str, int] = {}
_ORDERS = cast(sa.Table, Order.__table__)
_LINES = cast(sa.Table, OrderLine.__table__)
_SAGAS = cast(sa.Table, Saga.__table__)
_STEPS = cast(sa.Table, SagaStep.__table__)
_EVENTS = cast(sa.Table, SagaEvent.__table__)
_OUTBOX = cast(sa.Table, OutboxMessage.__table__)
_PRICES_HOLD = (
    "(SELECT count(*) FROM products p JOIN unnest(CAST(:skus AS text[]), CAST(:prices AS int[]))"
    " AS c(sku, price) ON p.sku = c.sku AND p.price_cents = c.price) = :lines"
)
# Without the fast path the relay is woken at once, as outbox.enqueue does.
_WAKE_RELAY = Also(f"SELECT pg_notify('{outbox.CHANNEL}', '')", gated=True)


def _catalogue_prices(conn: Any, skus: list[str], fresh: bool) -> dict[str, int]:
    if fresh or any(sku not in _prices for sku in skus):
        found = conn.execute(
            sa.select(Product.sku, Product.price_cents).where(Product.sku.in_(skus))
        )
        _prices.update({sku: price for sku, price in found})
        unknown = [sku for sku in skus if sku not in _prices]
        if unknown:
            raise UnknownSku(unknown)
    return {sku: _prices[sku] for sku in skus}


@dataclass(frozen=True)
class Written:
    started: Started
    rows: list[Any]  # the outbox rows, for the fast path once committed


def write_order(conn: Any, new: NewOrder, marks: list[fastpath.Mark] | None = None) -> Written:
    """Write the order (step 0, ``orders.create``), its lines, its saga, the saga's steps,
    timeline and first command in ONE statement on ``conn`` (one_statement.py); ``marks``: the
    process's waiting sent marks, carried by the same statement. The command is held if its
    service is paused (holds.seen: the guard checks the states it was dispatched by)."""
    skus = [sku for sku, _ in new.items]
    for fresh in (False, True):
        prices = _catalogue_prices(conn, skus, fresh)
        holding, holds_seen = holds.seen(conn, fresh)
        now = engine.utcnow()
        order_id = uuid.uuid4()
        total = sum(prices[sku] * qty for sku, qty in new.items)
        context = {
            "order_id": str(order_id),
            "items": [{"sku": sku, "quantity": qty} for sku, qty in new.items],
            "total_cents": total,
            "card_token": new.card_token,
            "faults": new.faults or {},
        }
        start = engine.saga_start(
            ORDER_SAGA.name,
            str(order_id),
            context,
            holding=holding,
            detail=f"order {order_id}",
            now=now,
        )
        commands = start.rows
        rows = [row for row, held in commands if not held]  # to publish once committed
        order = {"id": order_id, "customer_id": new.customer_id, "status": OrderStatus.PENDING,
                 "reason": None, "total_cents": total, "card_last4": new.card_token[-4:],
                 "created_at": now, "updated_at": now}
        lines = [{"order_id": order_id, "sku": sku, "quantity": qty, "price_cents": prices[sku]}
                 for sku, qty in new.items]
        also = [] if fastpath.enabled() else [_WAKE_RELAY]
        if marks:
            also.append(Also(fastpath.MARK_SENT_SQL + " RETURNING 1", fastpath.mark_params(marks)))
            marks = None  # carried, whether or not the guard holds
        written = one_statement.write(
            conn,
            [(_ORDERS, [order]), (_LINES, lines), (_SAGAS, [start.saga]), (_STEPS, start.steps),
             (_EVENTS, start.events),
             (_OUTBOX, [outbox.columns(row, held=held) for row, held in commands])],
            guard=(f"{_PRICES_HOLD} AND {holds.SEEN_GUARD}",
                   {"skus": skus, "prices": [prices[s] for s in skus], "lines": len(skus),
                    **holds_seen}),
            also=also,
        )
        if written:
            return Written(Started(order_id, start.saga_id), rows)
    raise RuntimeError(
        "the catalogue's prices or the services' states changed twice while the order was written"
    )


def start_order(session: Session, new: NewOrder) -> Started:
    """Write the order and start its saga in the caller's transaction; its command is published
    after the commit (the fast path's hook) or by the relay."""
    written = write_order(session, new)
    if fastpath.enabled():
        session.info.setdefault(fastpath.PENDING_KEY, []).extend(written.rows)
    return written.started


def _place_now(new: NewOrder) -> Placement:
    """No key: the one statement in autocommit mode is the whole transaction (one round trip
    after the pool's ping), then the command goes to the fast path."""
    with get_engine().connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        if backlogged(conn):
            raise Backlogged()
        marks = fastpath.take_marks()
        try:
            written = write_order(conn, new, marks)
        except BaseException:
            fastpath.give_back_marks(marks)  # maybe carried (a lost connection): harmless twice
            raise
    if fastpath.enabled():
        fastpath.publish_committed(written.rows)
    return Placement(*written.started.ids, created=True)


def order_saga_of(session: Session, order_id: uuid.UUID) -> Saga | None:
    return session.scalars(
        sa.select(Saga).where(
            Saga.business_key == str(order_id), Saga.definition == ORDER_SAGA.name
        )
    ).one_or_none()


# ---------------------------------------------------------------- placing, once per key

ORDERS_SCOPE = "orders"  # idempotency keys of POST /orders


@dataclass(frozen=True)
class Placement:
    order_id: uuid.UUID
    saga_id: uuid.UUID
    created: bool


def _placed_before(session: Session, row: IdempotencyKey) -> Placement:
    saga = order_saga_of(session, row.order_id)
    assert saga is not None
    return Placement(row.order_id, saga.id, created=False)


def place_order(new: NewOrder, key: str | None = None, fingerprint: str = "") -> Placement:
    """Start the order's saga, or return the order an earlier request with ``key`` made."""
    if key is None:
        return _place_now(new)

    def start(session: Session) -> tuple[Placement, uuid.UUID, uuid.UUID]:
        started = start_order(session, new)
        return Placement(started.order_id, started.saga_id, True), *started.ids

    return start_once(ORDERS_SCOPE, key, fingerprint, start, _placed_before)
