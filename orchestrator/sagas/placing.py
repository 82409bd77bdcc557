"""Placing an order: backpressure, idempotency keys, and the saga start, in one transaction."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from models.db import transaction
from models.orders import IdempotencyKey
from models.sagas import Saga
from orchestrator.kernel import engine
from orchestrator.messaging import outbox
from orchestrator.ops.config import settings


class Backlogged(Exception):
    """The outbox holds more unsent commands than its limit: refuse new work for now."""


class IdempotencyMismatch(Exception):
    pass


class IdempotencyInFlight(Exception):
    pass


@dataclass(frozen=True)
class Placement:
    order_id: uuid.UUID
    saga_id: uuid.UUID
    created: bool


_backlog_checked = {"at": -1.0, "over": False}
BACKLOG_CHECK_S = 0.2


def _backlogged(session: Session) -> bool:
    """Is the outbox over its limit? Counted at most every BACKLOG_CHECK_S per process: the
    count is the most expensive query of an order, and backpressure need not be exact."""
    now = time.monotonic()
    if now - _backlog_checked["at"] >= BACKLOG_CHECK_S:
        limit = settings().outbox_limit
        _backlog_checked.update(at=now, over=outbox.backlog(session, limit) > limit)
    return bool(_backlog_checked["over"])


def _existing(session: Session, key: str, fingerprint: str) -> Placement | None:
    row = session.get(IdempotencyKey, key)
    if row is None:
        return None
    if row.fingerprint != fingerprint:
        raise IdempotencyMismatch(key)
    saga_id = session.scalar(sa.select(Saga.id).where(Saga.order_id == row.order_id))
    assert saga_id is not None
    return Placement(row.order_id, saga_id, created=False)


def place_order(new: engine.NewOrder, key: str | None = None, fingerprint: str = "") -> Placement:
    """Start the order's saga, or return the order an earlier request with ``key`` made."""
    try:
        with transaction() as session:
            if key is not None:
                # A concurrent first request holding this key makes us wait at most this long.
                session.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
                found = _existing(session, key, fingerprint)
                if found:
                    return found
            if _backlogged(session):
                raise Backlogged()
            started = engine.start_order(session, new)
            if key is not None:
                claimed = session.scalar(
                    insert(IdempotencyKey)
                    .values(key=key, fingerprint=fingerprint, order_id=started.order_id)
                    .on_conflict_do_nothing(index_elements=["key"])
                    .returning(IdempotencyKey.key)
                )
                if claimed is None:
                    raise _LostRace()
            return Placement(started.order_id, started.saga_id, created=True)
    except _LostRace:
        # Another request with the key committed first; our transaction rolled back whole.
        with transaction() as session:
            found = _existing(session, key or "", fingerprint)
            assert found is not None
            return found
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == "55P03":  # lock_not_available
            raise IdempotencyInFlight(key) from exc
        raise


class _LostRace(Exception):
    pass
