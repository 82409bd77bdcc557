"""Messages drained from the dead-letter queues, kept for the operator to replay or discard."""

import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, enum_column
from models.enums import DeadLetterState


class DeadLetter(Base):
    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    saga_id: Mapped[uuid.UUID | None] = mapped_column(index=True)
    step: Mapped[str | None] = mapped_column(sa.String(64))
    request_id: Mapped[uuid.UUID | None]
    queue: Mapped[str] = mapped_column(sa.String(64))
    reason: Mapped[str] = mapped_column(sa.Text)
    at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    state: Mapped[DeadLetterState] = mapped_column(enum_column(DeadLetterState))
    # The original message, so a replay re-publishes it byte for byte.
    exchange: Mapped[str] = mapped_column(sa.String(128))
    routing_key: Mapped[str] = mapped_column(sa.String(128))
    headers: Mapped[dict[str, Any]] = mapped_column(JSONB)
    properties: Mapped[dict[str, Any]] = mapped_column(JSONB)
    body: Mapped[bytes] = mapped_column(sa.LargeBinary)
    # The broker's message id of the dead copy: the intake records each one once.
    fingerprint: Mapped[str] = mapped_column(sa.String(64), unique=True)
    resolved_at: Mapped[datetime | None]
    resolved_by: Mapped[str | None] = mapped_column(sa.String(64))
