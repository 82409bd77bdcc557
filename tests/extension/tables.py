"""The loyalty services' own records (a real service would add them to models/ with a migration;
the test creates them in its sandbox database)."""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Award(Base):
    """One row per saga: the points awarded (or ``voided``: revoked before any award came)."""

    __tablename__ = "ext_awards"

    saga_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    member: Mapped[str] = mapped_column(sa.String(64))
    points: Mapped[int]
    status: Mapped[str] = mapped_column(sa.String(16))  # awarded | revoked | voided
    bonus: Mapped[int] = mapped_column(default=0)


class Posting(Base):
    """One row per saga: the ledger posting (or its refusal)."""

    __tablename__ = "ext_postings"

    saga_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    cost_cents: Mapped[int]
    accepted: Mapped[bool]


def create(engine: sa.Engine) -> None:
    Base.metadata.create_all(engine)
