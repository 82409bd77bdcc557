"""Helpers of the web tier: place orders through the app and move their sagas in-process.

No worker runs in this tier, so a test that needs a completed, failed or stuck saga feeds the real
engine the reply a participant would have sent (or moves a deadline into the past).
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import sqlalchemy as sa
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from models.db import transaction
from models.deadletters import DeadLetter
from models.enums import DeadLetterState
from models.sagas import SagaStep
from orchestrator.kernel import engine
from orchestrator.messaging.envelopes import ReplyOutcome
from tests.web.conftest import valid_order


def body(response: TestResponse) -> Any:
    """The JSON of a response (asserting there is some)."""
    data = response.get_json(silent=True)
    assert data is not None, response.get_data(as_text=True)[:500]
    return data


def code(response: TestResponse) -> str:
    """The ``error.code`` of a JSON error answer."""
    return str(body(response)["error"]["code"])


def place(client: FlaskClient, **overrides: Any) -> dict[str, str]:
    """A new order through POST /orders; returns its order_id and saga_id."""
    response = client.post("/orders", json=valid_order(**overrides))
    assert response.status_code == 202, response.get_data(as_text=True)
    placed: dict[str, str] = body(response)
    return placed


def answer(saga_id: str, outcome: ReplyOutcome, error: str | None = None) -> str:
    """Apply the reply the awaited participant would send; returns the saga's new state."""
    with transaction() as session:
        saga = engine.lock_saga(session, uuid.UUID(saga_id))
        assert saga is not None
        kind = engine.current_kind(saga)
        phase = saga.steps[saga.current_step].phase(kind)
        definition = engine.registered_of(saga).definition
        command = engine.command_of(definition, saga.current_step, kind)
        request_id, attempt = phase.request_id, phase.attempts
        assert request_id is not None
        engine.on_reply(session, saga, command, request_id, attempt, outcome, error=error)
        return saga.state.value


def complete(saga_id: str) -> None:
    for _ in range(3):
        answer(saga_id, ReplyOutcome.SUCCEEDED)


def make_stuck(saga_id: str) -> None:
    """As if the current step's deadline had passed with no reply (no sweeper runs here)."""
    with transaction() as session:
        session.execute(
            sa.update(SagaStep)
            .where(SagaStep.saga_id == uuid.UUID(saga_id), SagaStep.deadline_at.is_not(None))
            .values(deadline_at=sa.func.now() - sa.text("interval '1 second'"))
        )


def dead_letter(
    saga_id: str | None, body: bytes, step: str | None = "payment.charge", queue: str = "payment"
) -> int:
    """A row as the orchestrator's intake records it (its replay publishes ``body`` again)."""
    with transaction() as session:
        row = DeadLetter(
            saga_id=uuid.UUID(saga_id) if saga_id else None,
            step=step,
            request_id=None,
            queue=queue,
            reason="rejected: retries exhausted (test)",
            state=DeadLetterState.DEAD,
            exchange="saga",
            routing_key=queue,
            headers={"task": step or "?"},
            properties={"content_type": "application/json", "content_encoding": "utf-8"},
            body=body,
            fingerprint=uuid.uuid4().hex,
        )
        session.add(row)
        session.flush()
        return row.id


def command_body(saga_id: str, card_token: str, extra: str = "") -> bytes:
    """A Celery message body carrying a payment.charge envelope (args, kwargs, embed)."""
    envelope = {
        "type": "payment.charge",
        "version": 1,
        "saga_id": saga_id,
        "request_id": str(uuid.uuid4()),
        "step": "payment.charge",
        "attempt": 1,
        "sent_at": "2024-01-01T00:00:00+00:00",
        "payload": {
            "order_id": str(uuid.uuid4()),
            "amount_cents": 100,
            "card_token": card_token,
            "note": extra,
            "retry": {"attempts": 3, "base_s": 0.05, "max_s": 0.2},
        },
    }
    return json.dumps([[envelope], {}, {}]).encode()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def backend_of(engine: sa.Engine) -> int:
    """The PostgreSQL backend of the connection ``engine``'s pool hands out next."""
    with engine.connect() as conn:
        return int(conn.scalar(sa.text("SELECT pg_backend_pid()")) or 0)


def terminate_backend(database_url: str, pid: int) -> None:
    """Kill one backend, as a database restart or an administrator would."""
    other = sa.create_engine(database_url, poolclass=sa.NullPool)
    with other.connect() as conn:
        assert conn.scalar(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    other.dispose()
