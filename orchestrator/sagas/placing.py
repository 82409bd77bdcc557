"""Placing an order: backpressure, idempotency keys, and the saga start, in one transaction."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import cast

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from models.catalog import Product
from models.db import transaction
from models.enums import OrderStatus
from models.orders import IdempotencyKey, Order, OrderLine
from models.sagas import Saga
from orchestrator.kernel import engine
from orchestrator.messaging import outbox
from orchestrator.ops.config import settings
from orchestrator.sagas.order import ORDER_SAGA

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


def start_order(session: Session, new: NewOrder) -> Started:
    """Write the order (step 0, ``orders.create``) and start its saga, in the caller's transaction."""
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
    now = engine.utcnow()
    order_id = uuid.uuid4()
    total = sum(prices[sku] * qty for sku, qty in new.items)
    # Core INSERTs, never ORM objects added to the session: the unit of work for these rows
    # was about 30 % of the web's CPU per order.
    session.execute(
        sa.insert(cast(sa.Table, Order.__table__)),
        [
            {
                "id": order_id,
                "customer_id": new.customer_id,
                "status": OrderStatus.PENDING,
                "reason": None,
                "total_cents": total,
                "card_last4": new.card_token[-4:],
                "created_at": now,
                "updated_at": now,
            }
        ],
    )
    session.execute(
        sa.insert(cast(sa.Table, OrderLine.__table__)),
        [
            {"order_id": order_id, "sku": sku, "quantity": qty, "price_cents": prices[sku]}
            for sku, qty in new.items
        ],
    )
    context = {
        "order_id": str(order_id),
        "items": [{"sku": sku, "quantity": qty} for sku, qty in new.items],
        "total_cents": total,
        "card_token": new.card_token,
        "faults": new.faults or {},
    }
    saga_id = engine.start_saga(
        session, ORDER_SAGA.name, str(order_id), context, detail=f"order {order_id}", now=now
    )
    return Started(order_id, saga_id)


def order_saga_of(session: Session, order_id: uuid.UUID) -> Saga | None:
    return session.scalars(
        sa.select(Saga).where(
            Saga.business_key == str(order_id), Saga.definition == ORDER_SAGA.name
        )
    ).one_or_none()


# ---------------------------------------------------------------- placing, once per key


class Backlogged(Exception):
    """The outbox holds more unsent commands than its limit: refuse new work for now."""


class IdempotencyMismatch(Exception):
    pass


class IdempotencyInFlight(Exception):
    pass


@dataclass(frozen=True)
class Placement:
    order_id: uuid.UUID
    saga_id: uuid.UUID
    created: bool


_backlog_checked = {"at": -1.0, "over": False}
BACKLOG_CHECK_S = 0.2


def backlogged(session: Session) -> bool:
    """Is the outbox over its limit? Counted at most every BACKLOG_CHECK_S per process: the
    count is the most expensive query of an order, and backpressure need not be exact."""
    now = time.monotonic()
    if now - _backlog_checked["at"] >= BACKLOG_CHECK_S:
        limit = settings().outbox_limit
        _backlog_checked.update(at=now, over=outbox.backlog(session, limit) > limit)
    return bool(_backlog_checked["over"])


ORDERS_SCOPE = "orders"  # idempotency keys of POST /orders


def _existing(session: Session, key: str, fingerprint: str) -> Placement | None:
    row = session.get(IdempotencyKey, (ORDERS_SCOPE, key))
    if row is None:
        return None
    if row.fingerprint != fingerprint:
        raise IdempotencyMismatch(key)
    saga = order_saga_of(session, row.order_id)
    assert saga is not None
    return Placement(row.order_id, saga.id, created=False)


def place_order(new: NewOrder, key: str | None = None, fingerprint: str = "") -> Placement:
    """Start the order's saga, or return the order an earlier request with ``key`` made."""
    try:
        with transaction() as session:
            if key is not None:
                # A concurrent first request holding this key makes us wait at most this long.
                session.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
                found = _existing(session, key, fingerprint)
                if found:
                    return found
            if backlogged(session):
                raise Backlogged()
            started = start_order(session, new)
            if key is not None:
                claimed = session.scalar(
                    insert(IdempotencyKey)
                    .values(
                        scope=ORDERS_SCOPE,
                        key=key,
                        fingerprint=fingerprint,
                        order_id=started.order_id,
                        saga_id=started.saga_id,
                    )
                    .on_conflict_do_nothing(index_elements=["scope", "key"])
                    .returning(IdempotencyKey.key)
                )
                if claimed is None:
                    raise _LostRace()
            return Placement(started.order_id, started.saga_id, created=True)
    except _LostRace:
        # Another request with the key committed first; our transaction rolled back whole.
        with transaction() as session:
            found = _existing(session, key or "", fingerprint)
            assert found is not None
            return found
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == "55P03":  # lock_not_available
            raise IdempotencyInFlight(key) from exc
        raise


class _LostRace(Exception):
    pass
