"""A participant's record of its effect: one row per saga, claimed once, then read under a lock.

``claim`` inserts the saga's row unless it exists. A concurrent claim of the same saga waits on
the primary key until the first commits, so exactly one of them applies the effect.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from orchestrator.messaging.envelopes import Command

Row = TypeVar("Row")


def claim(session: Session, model: type[Any], command: Command, **values: Any) -> bool:
    """Insert the saga's row; False if one exists already (read it with ``locked``)."""
    inserted = session.scalar(
        insert(model)
        .values(saga_id=command.saga_id, order_id=command.typed_payload().business_key, **values)
        .on_conflict_do_nothing(index_elements=["saga_id"])
        .returning(model.saga_id)
    )
    return inserted is not None


def locked(session: Session, model: type[Row], command: Command) -> Row:
    """The saga's existing row, locked for the rest of the transaction."""
    row = session.get(model, command.saga_id, with_for_update=True, populate_existing=True)
    assert row is not None, f"no {model.__name__} for saga {command.saga_id}"
    return row
