"""Each participant's own records: the effect and its outcome under one unique key per saga.

Because the key is the saga id, a redelivered or re-sent command finds the recorded outcome and
changes nothing, and a compensation that arrives first leaves a marker that fences a late action.
"""

import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, enum_column
from models.enums import ChargeStatus, ReservationStatus


class Reservation(Base):
    __tablename__ = "reservations"

    saga_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    order_id: Mapped[uuid.UUID] = mapped_column(index=True)
    status: Mapped[ReservationStatus] = mapped_column(enum_column(ReservationStatus))
    # [{"sku": ..., "quantity": ...}]: what to give back on release.
    lines: Mapped[list[dict[str, Any]]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())


class Charge(Base):
    __tablename__ = "charges"
    __table_args__ = (sa.CheckConstraint("amount_cents >= 0", name="amount_not_negative"),)

    # One charge per saga, enforced by the key itself.
    saga_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    order_id: Mapped[uuid.UUID] = mapped_column(index=True)
    status: Mapped[ChargeStatus] = mapped_column(enum_column(ChargeStatus))
    amount_cents: Mapped[int]
    card_last4: Mapped[str] = mapped_column(sa.String(4))
    created_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    refunded_at: Mapped[datetime | None]
