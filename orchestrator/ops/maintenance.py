"""Housekeeping: drop what no longer matters (``sagactl prune``)."""

from __future__ import annotations

import sqlalchemy as sa

from models.db import transaction
from models.deadletters import DeadLetter
from models.enums import DeadLetterState
from models.orders import IdempotencyKey
from models.outbox import OutboxMessage


def prune(days: float) -> dict[str, int]:
    cutoff = sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, days * 86400)
    with transaction() as session:
        outbox = session.execute(
            sa.delete(OutboxMessage).where(
                OutboxMessage.sent_at.is_not(None), OutboxMessage.sent_at < cutoff
            )
        )
        letters = session.execute(
            sa.delete(DeadLetter).where(
                DeadLetter.state != DeadLetterState.DEAD, DeadLetter.resolved_at < cutoff
            )
        )
        keys = session.execute(sa.delete(IdempotencyKey).where(IdempotencyKey.created_at < cutoff))
    return {
        "outbox": _rows(outbox),
        "dead_letters": _rows(letters),
        "idempotency_keys": _rows(keys),
    }


def _rows(result: object) -> int:
    """How many rows a DELETE removed (a CursorResult's rowcount)."""
    return int(getattr(result, "rowcount", 0))
