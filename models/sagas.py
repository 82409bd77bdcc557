"""Saga instances, the state of each step and its compensation, and the timeline of events.

A saga is generic: a definition (name and version), a business key (for the shop's sagas, the
order id) and a context. The action and the compensation of a step keep the same attempt state,
read and written through one ``Phase`` value whichever half it is.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from models.base import Base, enum_column
from models.enums import CompensationStatus, Reason, SagaState, StepStatus


class Saga(Base):
    __tablename__ = "sagas"
    __table_args__ = (
        sa.Index("ix_sagas_state_created", "state", "created_at"),
        sa.Index("ix_sagas_business_key", "business_key", "definition"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    # What the saga is about (the order id for the shop's sagas); one key may have many sagas.
    business_key: Mapped[str] = mapped_column(sa.String(64))
    definition: Mapped[str] = mapped_column(sa.String(64))
    definition_version: Mapped[int] = mapped_column(server_default="1")
    state: Mapped[SagaState] = mapped_column(enum_column(SagaState))
    reason: Mapped[Reason | None] = mapped_column(enum_column(Reason))
    # Index of the step (or compensation, when compensating) in hand.
    current_step: Mapped[int]
    # Everything later commands need (lines, total, card token, injected faults); never shown.
    context: Mapped[dict[str, Any]] = mapped_column(JSONB)
    deadline_at: Mapped[datetime]
    # Since when its command in hand waits for a paused service (None: not held); the saga's
    # deadline moves on by the time held when it is released.
    held_since: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())

    steps: Mapped[list[SagaStep]] = relationship(order_by="SagaStep.idx", lazy="selectin")


class SagaStep(Base):
    """One forward step and its compensation; both halves share the row."""

    __tablename__ = "saga_steps"
    __table_args__ = (
        sa.Index(
            "ix_saga_steps_running_deadline",
            "deadline_at",
            postgresql_where=sa.text("deadline_at IS NOT NULL"),
        ),
    )

    saga_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("sagas.id"), primary_key=True)
    idx: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(64))
    status: Mapped[StepStatus] = mapped_column(enum_column(StepStatus))
    attempts: Mapped[int] = mapped_column(default=0)
    # Attempts made before the current budget began (an operator retry grants a fresh budget
    # while the count goes on).
    attempts_base: Mapped[int] = mapped_column(default=0, server_default="0")
    request_id: Mapped[uuid.UUID | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(sa.Text)
    compensation: Mapped[str | None] = mapped_column(sa.String(64))
    comp_status: Mapped[CompensationStatus | None] = mapped_column(enum_column(CompensationStatus))
    comp_attempts: Mapped[int] = mapped_column(default=0)
    comp_attempts_base: Mapped[int] = mapped_column(default=0, server_default="0")
    comp_request_id: Mapped[uuid.UUID | None]
    comp_started_at: Mapped[datetime | None]
    comp_finished_at: Mapped[datetime | None]
    comp_error: Mapped[str | None] = mapped_column(sa.Text)
    # Set while this row's action or compensation is in flight; the sweeper scans it.
    deadline_at: Mapped[datetime | None]

    def phase(self, kind: PhaseKind) -> Phase:
        return Phase(self, kind)


PhaseKind = Literal["action", "compensation"]
T = TypeVar("T")


class _Field(Generic[T]):
    """One attempt-state field of a phase: the action's column, or the compensation's twin."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, phase: Phase, owner: type | None = None) -> T:
        value: T = getattr(phase.row, phase.prefix + self.name)
        return value

    def __set__(self, phase: Phase, value: T) -> None:
        setattr(phase.row, phase.prefix + self.name, value)


class Phase:
    """The attempt state of one half of a step, the same for an action and a compensation."""

    status: _Field[Any] = _Field()
    attempts: _Field[int] = _Field()
    attempts_base: _Field[int] = _Field()
    request_id: _Field[uuid.UUID | None] = _Field()
    started_at: _Field[datetime | None] = _Field()
    finished_at: _Field[datetime | None] = _Field()
    error: _Field[str | None] = _Field()

    def __init__(self, row: SagaStep, kind: PhaseKind) -> None:
        self.row, self.kind = row, kind
        self.prefix = "" if kind == "action" else "comp_"

    @property
    def event_prefix(self) -> str:
        """``step`` or ``compensation``: how the timeline names this half's events."""
        return "step" if self.kind == "action" else "compensation"


class SagaEvent(Base):
    __tablename__ = "saga_events"

    id: Mapped[int] = mapped_column(sa.BigInteger, sa.Identity(), primary_key=True)
    saga_id: Mapped[uuid.UUID] = mapped_column(sa.ForeignKey("sagas.id"), index=True)
    at: Mapped[datetime] = mapped_column(server_default=sa.func.clock_timestamp())
    event: Mapped[str] = mapped_column(sa.String(40))
    step: Mapped[str | None] = mapped_column(sa.String(64))
    attempt: Mapped[int | None]
    detail: Mapped[str | None] = mapped_column(sa.Text)
    actor: Mapped[str | None] = mapped_column(sa.String(64))
