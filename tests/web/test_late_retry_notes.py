"""A participant's "retrying" note overtaken by a later attempt's reply (two orchestrator
processes took the two replies at once) changes no state, but the failed attempt stays in the
timeline, at the time it happened, once."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from flask.testing import FlaskClient

from models.db import transaction
from orchestrator import queries
from orchestrator.kernel import engine
from orchestrator.messaging.envelopes import ReplyOutcome
from tests.web.drive import place

RESERVE = "inventory.reserve"
# The timeline of a reserve that failed twice and then succeeded, whatever order the notes came in.
THREE_ATTEMPTS = [
    ("step.dispatched", RESERVE, 1),
    ("step.failed", RESERVE, 1),
    ("step.retried", RESERVE, 2),
    ("step.failed", RESERVE, 2),
    ("step.retried", RESERVE, 3),
    ("step.succeeded", RESERVE, 3),
]


def _reply(saga_id: str, outcome: ReplyOutcome, attempt: int, sent_at: datetime) -> str:
    """The reserve step's reply for ``attempt``, as the reply task hands it to the engine."""
    with transaction() as session:
        saga = engine.lock_saga(session, uuid.UUID(saga_id))
        assert saga is not None
        index = engine.registered_of(saga).definition.index(RESERVE)
        request_id = saga.steps[index].phase("action").request_id
        assert request_id is not None
        return engine.on_reply(
            session,
            saga,
            RESERVE,
            request_id,
            attempt,
            outcome,
            error="transient: boom",
            retry_in_s=0.1,
            sent_at=sent_at,
        )


def _events(saga_id: str) -> list[tuple[Any, ...]]:
    with transaction() as session:
        rows = queries.timeline(session, uuid.UUID(saga_id))
    return [(e["event"], e["step"], e["attempt"]) for e in rows if e["step"] == RESERVE]


def test_a_retry_note_overtaken_by_the_next_attempt_keeps_its_failure_in_order(
    client: FlaskClient,
) -> None:
    saga_id = place(client)["saga_id"]
    assert _reply(saga_id, ReplyOutcome.RETRYING, 1, datetime.now(UTC)) == "retrying"
    note_sent_at = datetime.now(UTC)  # attempt 2 failed and said so...
    # ...but attempt 3's success is applied first.
    succeeded = _reply(saga_id, ReplyOutcome.SUCCEEDED, 3, datetime.now(UTC))
    assert succeeded.startswith("succeeded")
    late = _reply(saga_id, ReplyOutcome.RETRYING, 2, note_sent_at)
    assert late.startswith("ignored (overtaken")
    again = _reply(saga_id, ReplyOutcome.RETRYING, 2, note_sent_at)
    assert again == "ignored (not awaited: late or duplicate)"  # a duplicate adds nothing

    assert _events(saga_id) == THREE_ATTEMPTS
    with transaction() as session:
        saga = engine.lock_saga(session, uuid.UUID(saga_id))
        assert saga is not None
        # The late note moved nothing: the saga is on the next step, the attempts are 3.
        index = engine.registered_of(saga).definition.index(RESERVE)
        assert saga.current_step == index + 1
        assert saga.steps[index].phase("action").attempts == 3


def test_a_retry_note_overtaken_by_the_next_attempts_note_keeps_the_timeline_in_order(
    client: FlaskClient,
) -> None:
    """Seen in CI: attempt 2's "retrying" note was applied before attempt 1's; the step still ran,
    so both were awaited, and the late one was recorded after it, at the orchestrator's time."""
    saga_id = place(client)["saga_id"]
    first_sent_at = datetime.now(UTC)  # attempt 1 failed and said so...
    # ...but attempt 2's note is applied first.
    assert _reply(saga_id, ReplyOutcome.RETRYING, 2, datetime.now(UTC)) == "retrying"
    late = _reply(saga_id, ReplyOutcome.RETRYING, 1, first_sent_at)
    assert late.startswith("ignored (overtaken")
    assert _reply(saga_id, ReplyOutcome.SUCCEEDED, 3, datetime.now(UTC)).startswith("succeeded")

    assert _events(saga_id) == THREE_ATTEMPTS
