"""Participant services as operators and the circuit breaker see them: paused or running.

``service_states`` holds one row per service that was ever paused (no row: running);
``service_audit`` every pause, resume and breaker move; ``service_calls`` the replies of each
service, one row per flush of an orchestrator process (the breaker's sliding window).
"""

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base

RUNNING = "running"
PAUSED = "paused"
BREAKER_OPEN = "breaker_open"
HALF_OPEN = "half_open"
STATES = (RUNNING, PAUSED, BREAKER_OPEN, HALF_OPEN)


class ServiceState(Base):
    __tablename__ = "service_states"
    __table_args__ = (
        sa.CheckConstraint(
            "state IN ('running', 'paused', 'breaker_open', 'half_open')", name="state"
        ),
    )

    service: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    state: Mapped[str] = mapped_column(sa.String(16))
    since: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    by: Mapped[str | None] = mapped_column(sa.String(255))
    note: Mapped[str | None] = mapped_column(sa.Text)
    hold_compensations: Mapped[bool] = mapped_column(server_default=sa.true())


class ServiceAudit(Base):
    __tablename__ = "service_audit"

    id: Mapped[int] = mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    service: Mapped[str] = mapped_column(sa.String(64), index=True)
    # pause, resume, breaker_open, half_open, breaker_closed, breaker_reopened
    action: Mapped[str] = mapped_column(sa.String(32))
    actor: Mapped[str] = mapped_column(sa.String(255))
    note: Mapped[str | None] = mapped_column(sa.Text)
    held: Mapped[int] = mapped_column(server_default="0")  # commands held at that moment
    at: Mapped[datetime] = mapped_column(server_default=sa.func.now())


class ServiceCalls(Base):
    """Replies of one service counted by one flush (``flushed_at``: its transaction's start, so
    a change of state cuts the window exactly): what the breaker's failure rate is computed from."""

    __tablename__ = "service_calls"

    service: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    flushed_at: Mapped[datetime] = mapped_column(primary_key=True)
    ok: Mapped[int] = mapped_column(server_default="0")
    transient: Mapped[int] = mapped_column(server_default="0")
