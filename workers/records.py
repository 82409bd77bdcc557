"""A participant's record of its effect: one row per saga, claimed once, then read under a lock.

``claim`` inserts the saga's row unless it exists. A concurrent claim of the same saga waits on
the primary key until the first commits, so exactly one of them applies the effect.
"""

from __future__ import annotations

from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from orchestrator.messaging.envelopes import Command

Row = TypeVar("Row")


def claim(session: Session, model: type[Any], command: Command, **values: Any) -> bool:
    """Insert the saga's row; False if one exists already (read it with ``locked``)."""
    row = {"saga_id": command.saga_id, "order_id": command.typed_payload().business_key, **values}
    inserted = session.execute(_claim_statement(model, tuple(row)), row).scalar()
    return inserted is not None


_CLAIMS: dict[tuple[type[Any], tuple[str, ...]], Any] = {}


def _claim_statement(model: type[Any], columns: tuple[str, ...]) -> Any:
    # Built once per model and set of columns, values bound at execution: building and
    # cache-keying a fresh ORM insert per command was a third of the payment worker's CPU.
    key = (model, columns)
    if key not in _CLAIMS:
        table = model.__table__
        _CLAIMS[key] = (
            insert(table)
            .values({name: sa.bindparam(name) for name in columns})
            .on_conflict_do_nothing(index_elements=["saga_id"])
            .returning(table.c.saga_id)
        )
    return _CLAIMS[key]


def locked(session: Session, model: type[Row], command: Command) -> Row:
    """The saga's existing row, locked for the rest of the transaction."""
    row = session.get(model, command.saga_id, with_for_update=True, populate_existing=True)
    assert row is not None, f"no {model.__name__} for saga {command.saga_id}"
    return row
