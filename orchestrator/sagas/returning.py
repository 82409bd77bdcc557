"""Starting a return: the order's ``confirmed -> returning`` (step 0, ``orders.begin_return``), the
return saga and its first command, in one transaction; idempotency keys scoped to the route.

The conditional update decides between concurrent returns of one order: the second waits on the
order's row lock, finds it ``returning`` and is refused, so one order never has two return sagas
in flight. After an aborted return the order is ``confirmed`` again and may be returned again.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from models.enums import OrderStatus
from models.orders import IdempotencyKey, Order
from orchestrator.kernel import engine
from orchestrator.sagas.once import (
    Backlogged,
    IdempotencyInFlight,
    IdempotencyMismatch,
    start_once,
)
from orchestrator.sagas.returns import RETURN_SAGA

RETURN_SCOPE = "return"  # idempotency keys of POST /orders/<id>/return

__all__ = [
    "Backlogged",
    "IdempotencyInFlight",
    "IdempotencyMismatch",
    "NotReturnable",
    "OrderNotFound",
    "ReturnStarted",
    "start_return",
]


class OrderNotFound(LookupError):
    pass


class NotReturnable(Exception):
    """The order is not confirmed (pending, cancelled, failed, returning or returned)."""

    def __init__(self, status: OrderStatus) -> None:
        super().__init__(f"the order is {status.value}; only a confirmed order can be returned")
        self.status = status


@dataclass(frozen=True)
class ReturnStarted:
    order_id: uuid.UUID
    saga_id: uuid.UUID
    created: bool
    status: OrderStatus


def _begin_return(session: Session, order_id: uuid.UUID) -> None:
    """Step 0: ``confirmed -> returning``, or say why not."""
    moved = session.scalar(
        sa.update(Order)
        .where(Order.id == order_id, Order.status == OrderStatus.CONFIRMED)
        .values(status=OrderStatus.RETURNING, updated_at=sa.func.now())
        .returning(Order.id)
    )
    if moved is None:
        status = session.scalar(sa.select(Order.status).where(Order.id == order_id))
        if status is None:
            raise OrderNotFound(str(order_id))
        raise NotReturnable(status)


def _started_before(session: Session, row: IdempotencyKey) -> ReturnStarted:
    assert row.saga_id is not None
    status = session.scalar(sa.select(Order.status).where(Order.id == row.order_id))
    assert status is not None
    return ReturnStarted(row.order_id, row.saga_id, created=False, status=status)


def start_return(
    order_id: uuid.UUID,
    reason: str | None,
    faults: dict[str, str] | None = None,
    key: str | None = None,
    fingerprint: str = "",
) -> ReturnStarted:
    """Start the order's return saga, or return the one an earlier request with ``key`` started."""

    def start(session: Session) -> tuple[ReturnStarted, uuid.UUID, uuid.UUID]:
        _begin_return(session, order_id)
        context = {"order_id": str(order_id), "reason": reason, "faults": faults or {}}
        saga_id = engine.start_saga(
            session, RETURN_SAGA.name, str(order_id), context, detail=f"return of order {order_id}"
        )
        return ReturnStarted(order_id, saga_id, True, OrderStatus.RETURNING), order_id, saga_id

    # NotReturnable: a concurrent first request with this key may have started the return that
    # made the order ``returning`` while we waited on its row.
    return start_once(RETURN_SCOPE, key, fingerprint, start, _started_before, (NotReturnable,))
