"""Starting a saga at most once per idempotency key, under backpressure, in one transaction.

Shared by ``POST /orders`` (sagas/placing.py) and ``POST /orders/<id>/return`` (sagas/returning.py);
keys are scoped to their route. The key row is claimed in the transaction that starts the saga, so
one key never makes two sagas: a second request with the key waits on the first one's row lock (at
most ``lock_timeout``, then it is "in flight"), and a request that lost the race to commit rolls
back whole and answers what the winner made.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from models.db import transaction
from models.orders import IdempotencyKey
from orchestrator.messaging import outbox
from orchestrator.ops.config import settings

T = TypeVar("T")


class Backlogged(Exception):
    """The outbox holds more unsent commands than its limit: refuse new work for now."""


class IdempotencyMismatch(Exception):
    """The key was used before with another body."""


class IdempotencyInFlight(Exception):
    """The first request with this key is still being written."""


class _LostRace(Exception):
    pass


_backlog_checked = {"at": -1.0, "over": False}
BACKLOG_CHECK_S = 0.2


def backlogged(session: Session | Connection) -> bool:
    """Is the outbox over its limit? Counted at most every BACKLOG_CHECK_S per process: the
    count is the most expensive query of a request, and backpressure need not be exact."""
    now = time.monotonic()
    if now - _backlog_checked["at"] >= BACKLOG_CHECK_S:
        limit = settings().outbox_limit
        _backlog_checked.update(at=now, over=outbox.backlog(session, limit) > limit)
    return bool(_backlog_checked["over"])


def start_once(
    scope: str,
    key: str | None,
    fingerprint: str,
    start: Callable[[Session], tuple[T, uuid.UUID, uuid.UUID]],
    earlier: Callable[[Session, IdempotencyKey], T],
    refusals: tuple[type[Exception], ...] = (),
) -> T:
    """``start(session)`` -> (answer, order id, saga id) in one transaction with the key's claim;
    or ``earlier(session, key_row)``, the answer of the request that used ``key`` first.

    A refusal (one of ``refusals``) raised by ``start`` may be the effect of a concurrent first
    request with the same key (the one we waited on): its answer is given instead.
    """
    try:
        with transaction() as session:
            if key is not None:
                # A concurrent first request holding this key makes us wait at most this long.
                session.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
                found = _earlier(session, scope, key, fingerprint, earlier)
                if found is not None:
                    return found
            if backlogged(session):
                raise Backlogged()
            answer, order_id, saga_id = start(session)
            if key is not None and not _claim(session, scope, key, fingerprint, order_id, saga_id):
                raise _LostRace()
            return answer
    except _LostRace:
        # Another request with the key committed first; our transaction rolled back whole.
        with transaction() as session:
            found = _earlier(session, scope, key or "", fingerprint, earlier)
            assert found is not None
            return found
    except refusals:
        if key is not None:
            with transaction() as session:
                found = _earlier(session, scope, key, fingerprint, earlier)
            if found is not None:
                return found
        raise
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == "55P03":  # lock_not_available
            raise IdempotencyInFlight(key) from exc
        raise


def _earlier(
    session: Session,
    scope: str,
    key: str,
    fingerprint: str,
    answer: Callable[[Session, IdempotencyKey], T],
) -> T | None:
    row = session.get(IdempotencyKey, (scope, key))
    if row is None:
        return None
    if row.fingerprint != fingerprint:
        raise IdempotencyMismatch(key)
    return answer(session, row)


def _claim(
    session: Session,
    scope: str,
    key: str,
    fingerprint: str,
    order_id: uuid.UUID,
    saga_id: uuid.UUID,
) -> bool:
    claimed = session.scalar(
        insert(IdempotencyKey)
        .values(scope=scope, key=key, fingerprint=fingerprint, order_id=order_id, saga_id=saga_id)
        .on_conflict_do_nothing(index_elements=["scope", "key"])
        .returning(IdempotencyKey.key)
    )
    return claimed is not None
