"""The inventory service: reserve every line of an order or none; release what was reserved; take
a returned order's sold stock back into ``available``.

Run: ``sagactl worker inventory``. The reservation row, keyed by saga id, is both the effect's
record and its idempotency key. Every command may move stock, so each transaction locks its
products first (``stock.lock_for``).
"""

import sqlalchemy as sa
from sqlalchemy.orm import Session

from models.enums import Reason, ReservationStatus
from models.participants import Reservation
from orchestrator.messaging.celery_app import app
from orchestrator.messaging.envelopes import Command, OrderPayload, ReservePayload
from workers import records, stock
from workers.participant import Result, participant

__all__ = ["app", "release", "reserve", "return_stock"]


def _as_result(row: Reservation) -> Result:
    if row.status in (ReservationStatus.RESERVED, ReservationStatus.SOLD):
        return Result(True)
    if row.status is ReservationStatus.REJECTED:
        return Result(False, Reason.OUT_OF_STOCK.value)
    return Result(False, "fenced: released before this reserve arrived")


@participant("inventory.reserve", prepare=stock.lock_for)
def reserve(session: Session, command: Command, payload: ReservePayload) -> Result:
    lines = [line.model_dump() for line in payload.items]
    if not records.claim(
        session, Reservation, command, status=ReservationStatus.RESERVED, lines=lines
    ):
        return _as_result(records.locked(session, Reservation, command))
    try:
        stock.reserve(session, lines)  # every line or none
    except stock.Shortage:
        session.execute(
            sa.update(Reservation)
            .where(Reservation.saga_id == command.saga_id)
            .values(status=ReservationStatus.REJECTED)
        )
        return Result(False, Reason.OUT_OF_STOCK.value, applied_now=True)
    return Result(True, applied_now=True)


@participant("inventory.release", prepare=stock.lock_for)
def release(session: Session, command: Command, payload: OrderPayload) -> Result:
    """release_if_reserved: gives back reserved (or sold) stock; fences a reserve not yet seen."""
    if records.claim(session, Reservation, command, status=ReservationStatus.VOIDED, lines=[]):
        return Result(True, applied_now=True)
    row = records.locked(session, Reservation, command)
    bucket = {ReservationStatus.RESERVED: "reserved", ReservationStatus.SOLD: "sold"}.get(
        row.status
    )
    if bucket is None:
        return Result(True)
    stock.move(session, row.lines, bucket, "available")
    row.status = ReservationStatus.RELEASED
    row.updated_at = sa.func.now()
    return Result(True, applied_now=True)


@participant("inventory.return_stock", prepare=stock.lock_for)
def return_stock(session: Session, command: Command, payload: OrderPayload) -> Result:
    """A returned order's sold stock becomes available again (not a restock: no total changes)."""
    row = session.scalars(
        sa.select(Reservation)
        .where(
            Reservation.order_id == payload.order_id,
            Reservation.status.in_([ReservationStatus.SOLD, ReservationStatus.RETURNED]),
        )
        .with_for_update()
    ).first()
    if row is None:
        return Result(False, "no sold stock of this order to take back")
    if row.status is ReservationStatus.RETURNED:
        return Result(True)  # a redelivery: taken back already
    stock.move(session, row.lines, "sold", "available")
    row.status = ReservationStatus.RETURNED
    row.updated_at = sa.func.now()
    return Result(True, applied_now=True)
