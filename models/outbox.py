"""Commands committed with the state change that caused them, published later by the relay."""

import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base


class OutboxMessage(Base):
    __tablename__ = "outbox"
    __table_args__ = (
        sa.Index(
            "ix_outbox_unsent", "id", postgresql_where=sa.text("sent_at IS NULL AND held_at IS NULL")
        ),
        sa.Index(
            "ix_outbox_held",
            "queue",
            "id",
            postgresql_where=sa.text("held_at IS NOT NULL AND sent_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    # Doubles as the Celery task id: a republished row is recognisably the same message.
    message_id: Mapped[uuid.UUID] = mapped_column(unique=True)
    saga_id: Mapped[uuid.UUID | None] = mapped_column(index=True)
    task: Mapped[str] = mapped_column(sa.String(64))
    queue: Mapped[str] = mapped_column(sa.String(64))
    headers: Mapped[dict[str, Any]] = mapped_column(JSONB)
    envelope: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    sent_at: Mapped[datetime | None] = mapped_column(index=True)
    # Set while the command waits for its paused service (orchestrator/kernel/holds.py): the
    # relay, the fast path and the sweeper leave it unsent until the release dispatches it anew.
    held_at: Mapped[datetime | None]
