"""Bulk operations: one operator's action on every saga a filter selected, and its work list.

The items are the work list: written with the operation (the sagas the filter matched at that
moment) and advanced one by one, each in the transaction that acts on its saga, so a saga is
acted on at most once per operation and a runner that dies mid-way loses nothing.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base


class Operation(Base):
    __tablename__ = "operations"
    __table_args__ = (sa.Index("ix_operations_created_at", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    action: Mapped[str] = mapped_column(sa.String(16))  # retry | compensate
    actor: Mapped[str] = mapped_column(sa.String(64))
    note: Mapped[str | None] = mapped_column(sa.Text)
    # The filter as the operator sent it (validated), for the record.
    filter: Mapped[dict[str, Any]] = mapped_column(JSONB)
    total: Mapped[int]
    done: Mapped[int] = mapped_column(default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class OperationItem(Base):
    """One saga of an operation: pending (``status`` null) until the runner acts on it."""

    __tablename__ = "operation_items"
    __table_args__ = (
        # The runner's claim: the next pending item of an operation, in list order.
        sa.Index(
            "ix_operation_items_pending",
            "operation_id",
            "position",
            postgresql_where=sa.text("status IS NULL"),
        ),
    )

    operation_id: Mapped[uuid.UUID] = mapped_column(
        sa.ForeignKey("operations.id"), primary_key=True
    )
    saga_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    position: Mapped[int]  # the admin list's order: newest first
    status: Mapped[int | None] = mapped_column(sa.SmallInteger)  # 202 | 404 | 409, as one by one
    state: Mapped[str | None] = mapped_column(sa.String(24))  # the saga's state after acting
    acted_at: Mapped[datetime | None]
