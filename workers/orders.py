"""The order service: confirm an order (its reserved stock becomes sold); cancel it; end a return
(``returning -> returned``) or abort it (``returning -> confirmed``).

Run: ``sagactl worker orders``. The order's own status is the idempotency record.
"""

import sqlalchemy as sa
from sqlalchemy.orm import Session

from models.enums import OrderStatus, ReservationStatus
from models.orders import Order
from models.participants import Reservation
from orchestrator.messaging.celery_app import app
from orchestrator.messaging.envelopes import CancelPayload, Command, OrderPayload
from workers import stock
from workers.participant import Result, participant

__all__ = ["abort_return", "app", "cancel", "complete_return", "confirm"]


def _order(session: Session, payload: OrderPayload) -> Order:
    order = session.get(Order, payload.order_id, with_for_update=True, populate_existing=True)
    if order is None:
        raise LookupError(f"order {payload.order_id} does not exist")
    return order


_CONFIRMED_OR_AFTER = (OrderStatus.CONFIRMED, OrderStatus.RETURNING, OrderStatus.RETURNED)


@participant("orders.confirm", prepare=stock.lock_for)
def confirm(session: Session, command: Command, payload: OrderPayload) -> Result:
    order = _order(session, payload)
    # Confirmed, or past it: a return may start as soon as the order is confirmed, before this
    # command's reply is applied, so a redelivered confirm can find the order returning.
    if order.status in _CONFIRMED_OR_AFTER:
        return Result(True)
    reservation = session.get(Reservation, command.saga_id, with_for_update=True)
    if (
        order.status is not OrderStatus.PENDING
        or reservation is None
        or (reservation.status is not ReservationStatus.RESERVED)
    ):
        return Result(False, "fenced: the order is no longer pending with stock reserved")
    stock.move(session, reservation.lines, "reserved", "sold")
    reservation.status = ReservationStatus.SOLD
    order.status = OrderStatus.CONFIRMED
    order.updated_at = sa.func.now()
    return Result(True, applied_now=True)


@participant("orders.cancel")
def cancel(session: Session, command: Command, payload: CancelPayload) -> Result:
    order = _order(session, payload)
    if order.status is OrderStatus.CANCELLED:
        return Result(True)
    order.status = OrderStatus.CANCELLED
    order.reason = payload.reason
    order.updated_at = sa.func.now()
    return Result(True, applied_now=True)


@participant("orders.complete_return")
def complete_return(session: Session, command: Command, payload: OrderPayload) -> Result:
    order = _order(session, payload)
    if order.status is OrderStatus.RETURNED:
        return Result(True)
    if order.status is not OrderStatus.RETURNING:
        return Result(False, f"fenced: the order is {order.status}, not returning")
    order.status = OrderStatus.RETURNED
    order.updated_at = sa.func.now()
    return Result(True, applied_now=True)


@participant("orders.abort_return")
def abort_return(session: Session, command: Command, payload: OrderPayload) -> Result:
    """abort_return_if_returning: the order is confirmed again (nothing to undo otherwise)."""
    order = _order(session, payload)
    if order.status is not OrderStatus.RETURNING:
        return Result(True)
    order.status = OrderStatus.CONFIRMED
    order.updated_at = sa.func.now()
    return Result(True, applied_now=True)
