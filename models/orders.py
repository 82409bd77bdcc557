"""Orders, their lines, and the idempotency keys that map a client's retry to its first order."""

import uuid
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, relationship

from models.base import Base, enum_column
from models.enums import OrderStatus, Reason


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = (
        sa.CheckConstraint("total_cents > 0", name="total_positive"),
        sa.Index("ix_orders_created", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    customer_id: Mapped[str] = mapped_column(sa.String(64))
    status: Mapped[OrderStatus] = mapped_column(enum_column(OrderStatus))
    reason: Mapped[Reason | None] = mapped_column(enum_column(Reason))
    total_cents: Mapped[int]
    card_last4: Mapped[str] = mapped_column(sa.String(4))
    created_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())

    lines: Mapped[list["OrderLine"]] = relationship(order_by="OrderLine.sku", lazy="selectin")


class OrderLine(Base):
    __tablename__ = "order_lines"
    __table_args__ = (sa.CheckConstraint("quantity BETWEEN 1 AND 1000", name="quantity_range"),)

    order_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("orders.id"), primary_key=True)
    sku: Mapped[str] = mapped_column(sa.ForeignKey("products.sku"), primary_key=True)
    quantity: Mapped[int]
    price_cents: Mapped[int]


class IdempotencyKey(Base):
    """One key never makes two orders (or two returns): the primary key serializes concurrent
    first requests. A key is scoped to its route: ``orders`` or ``return``."""

    __tablename__ = "idempotency_keys"

    scope: Mapped[str] = mapped_column(sa.String(16), primary_key=True, server_default="orders")
    key: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    # sha256 of the canonical JSON body: same value, any key order or spacing.
    fingerprint: Mapped[str] = mapped_column(sa.String(64))
    order_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("orders.id"))
    # The saga the first request started (a return's; an order's is found by its order id).
    saga_id: Mapped[uuid.UUID | None]
    created_at: Mapped[datetime] = mapped_column(server_default=sa.func.now(), index=True)
