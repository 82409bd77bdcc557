"""A saga locked after another transaction's commit comes with the steps that commit wrote; a saga
locked twice in one transaction is one row (the batch path's rows are plain, not ORM objects).

Seen in CI: with the steps joined to the locked saga in one statement, a batch that waited on the
lock got the saga's new row but its steps as they were before the other batch's commit, applied a
retry note that batch had already overtaken, and wrote the stale steps back.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import sqlalchemy as sa
from flask.testing import FlaskClient

from models.db import get_engine, transaction
from orchestrator.kernel import engine
from tests.web.drive import place


def _wait_for_a_lock_waiter(timeout_s: float = 10.0) -> None:
    """Until a backend of this database waits on a lock (the second transaction, on the saga)."""
    deadline = time.monotonic() + timeout_s
    probe = sa.create_engine(get_engine().url, poolclass=sa.NullPool)
    try:
        while time.monotonic() < deadline:
            with probe.connect() as conn:
                if conn.scalar(sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                )):
                    return
            time.sleep(0.02)
    finally:
        probe.dispose()
    raise AssertionError("the second transaction never waited on the saga's lock")


def _attempts(saga: Any) -> list[int]:
    return [step.attempts for step in saga.steps]


def test_a_lock_that_waited_reads_the_steps_the_holder_committed(client: FlaskClient) -> None:
    saga_id = uuid.UUID(place(client)["saga_id"])
    seen: dict[str, Any] = {}
    locked = threading.Event()

    def second() -> None:
        locked.wait(10)
        with transaction() as session:
            seen["waiter"] = _attempts(engine.lock_sagas(session, [saga_id])[saga_id])

    waiter = threading.Thread(target=second)
    waiter.start()
    with transaction() as session:
        saga = engine.lock_sagas(session, [saga_id])[saga_id]
        running = engine.registered_of(saga).definition.index("inventory.reserve")
        saga.steps[running].attempts = 3
        saga.updated_at = engine.utcnow()
        seen["holder"] = _attempts(saga)
        locked.set()
        _wait_for_a_lock_waiter()
    waiter.join(10)
    assert seen["waiter"] == seen["holder"]


def test_a_saga_locked_twice_in_one_transaction_is_one_row_written_once(
    client: FlaskClient,
) -> None:
    saga_id = uuid.UUID(place(client)["saga_id"])
    with transaction() as session:
        first = engine.lock_sagas(session, [saga_id])[saga_id]
        running = engine.registered_of(first).definition.index("inventory.reserve")
        first.steps[running].attempts = 7
        again = engine.lock_sagas(session, [saga_id])[saga_id]
        assert again is first  # not a second copy read back without the change
    with transaction() as session:
        saga = engine.lock_sagas(session, [saga_id])[saga_id]
        assert saga.steps[running].attempts == 7
