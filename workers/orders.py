"""The order service: confirm an order (its reserved stock becomes sold); cancel it; end a return
(``returning -> returned``) or abort it (``returning -> confirmed``).

Run: ``sagactl worker orders``. The order's own status is the idempotency record.
"""

import sqlalchemy as sa
from sqlalchemy.orm import Session, lazyload

from models.enums import OrderStatus, ReservationStatus
from models.orders import Order
from models.participants import Reservation
from orchestrator.messaging.celery_app import app
from orchestrator.messaging.envelopes import CancelPayload, Command, OrderPayload
from workers import stock
from workers.participant import Result, participant

__all__ = ["abort_return", "app", "cancel", "complete_return", "confirm"]


_ORDERS, _RESERVATIONS = "orders.locked", "reservations.locked"  # Session.info: locked rows by id
# Built once, ids bound per transaction (a statement built per batch cost more than its rows).
_LOCK_ORDERS = (
    sa.select(Order)
    .where(Order.id.in_(sa.bindparam("ids", expanding=True)))
    .order_by(Order.id)
    .with_for_update()
    .options(lazyload(Order.lines))  # no handler reads them
    .execution_options(populate_existing=True)
)
_LOCK_RESERVATIONS = (
    sa.select(Reservation)
    .where(Reservation.saga_id.in_(sa.bindparam("ids", expanding=True)))
    .order_by(Reservation.saga_id)
    .with_for_update()
    .execution_options(populate_existing=True)
)


def lock_orders(session: Session, commands: list[Command]) -> None:
    """Before any handler of a batch runs: the stock that confirms sell (products first, as every
    stock mover locks them), then every order of the batch, then the confirms' reservations, each
    kind in one statement in id order; the handlers find them in the session instead of asking
    the database again once per command."""
    confirms = [c for c in commands if c.type == "orders.confirm"]
    if confirms:
        stock.lock_for(session, confirms)
    order_ids = sorted({_payload(c).order_id for c in commands})
    orders = session.scalars(_LOCK_ORDERS, {"ids": order_ids})
    session.info[_ORDERS] = {order.id: order for order in orders}
    sagas = sorted({c.saga_id for c in confirms})
    reservations = session.scalars(_LOCK_RESERVATIONS, {"ids": sagas}).all() if sagas else []
    session.info[_RESERVATIONS] = {r.saga_id: r for r in reservations}


def _payload(command: Command) -> OrderPayload:
    payload = command.typed_payload()
    assert isinstance(payload, OrderPayload), command.type  # every orders.* command's is one
    return payload


def _order(session: Session, payload: OrderPayload) -> Order:
    order: Order | None = session.info[_ORDERS].get(payload.order_id)
    if order is None:
        raise LookupError(f"order {payload.order_id} does not exist")
    return order


_CONFIRMED_OR_AFTER = (OrderStatus.CONFIRMED, OrderStatus.RETURNING, OrderStatus.RETURNED)


@participant("orders.confirm", prepare=lock_orders)
def confirm(session: Session, command: Command, payload: OrderPayload) -> Result:
    order = _order(session, payload)
    # Confirmed, or past it: a return may start as soon as the order is confirmed, before this
    # command's reply is applied, so a redelivered confirm can find the order returning.
    if order.status in _CONFIRMED_OR_AFTER:
        return Result(True)
    reservation: Reservation | None = session.info[_RESERVATIONS].get(command.saga_id)
    sold = reservation is not None and reservation.status is ReservationStatus.SOLD
    if sold and order.status is OrderStatus.PENDING:
        # An earlier attempt of this confirm sold the saga's stock, then the saga parked after
        # the confirm's deadline (order failed) and an operator retried it (pending again): the
        # sale is the record, the order is confirmed.
        order.status = OrderStatus.CONFIRMED
        order.reason = None
        order.updated_at = sa.func.now()
        return Result(True, applied_now=True)
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


@participant("orders.cancel", prepare=lock_orders)
def cancel(session: Session, command: Command, payload: CancelPayload) -> Result:
    order = _order(session, payload)
    if order.status is OrderStatus.CANCELLED:
        return Result(True)
    order.status = OrderStatus.CANCELLED
    order.reason = payload.reason
    order.updated_at = sa.func.now()
    return Result(True, applied_now=True)


@participant("orders.complete_return", prepare=lock_orders)
def complete_return(session: Session, command: Command, payload: OrderPayload) -> Result:
    order = _order(session, payload)
    if order.status is OrderStatus.RETURNED:
        return Result(True)
    if order.status is not OrderStatus.RETURNING:
        return Result(False, f"fenced: the order is {order.status}, not returning")
    order.status = OrderStatus.RETURNED
    order.updated_at = sa.func.now()
    return Result(True, applied_now=True)


@participant("orders.abort_return", prepare=lock_orders)
def abort_return(session: Session, command: Command, payload: OrderPayload) -> Result:
    """abort_return_if_returning: the order is confirmed again (nothing to undo otherwise)."""
    order = _order(session, payload)
    if order.status is not OrderStatus.RETURNING:
        return Result(True)
    order.status = OrderStatus.CONFIRMED
    order.updated_at = sa.func.now()
    return Result(True, applied_now=True)
