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
            sa.delete(OutboxMessage).where(OutboxMessage.sent_at.is_not(None),
                                           OutboxMessage.sent_at < cutoff))
        letters = session.execute(
            sa.delete(DeadLetter).where(DeadLetter.state != DeadLetterState.DEAD,
                                        DeadLetter.resolved_at < cutoff))
        keys = session.execute(sa.delete(IdempotencyKey).where(IdempotencyKey.created_at < cutoff))
    return {"outbox": outbox.rowcount, "dead_letters": letters.rowcount,  # type: ignore[attr-defined]
            "idempotency_keys": keys.rowcount}  # type: ignore[attr-defined]
