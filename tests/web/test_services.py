"""The services console and the holding of commands, in-process: pause and resume, bad input,
CSRF, and what a pause does to a saga's next command (held, no attempt, no deadline) and a resume
(released: an attempt, a fresh deadline, the saga's deadline moved on)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask.testing import FlaskClient

from models.db import transaction
from models.outbox import OutboxMessage
from models.services import ServiceAudit, ServiceState
from orchestrator.kernel import engine, release, service_states
from orchestrator.messaging.envelopes import ReplyOutcome
from tests.web.conftest import csrf_token
from tests.web.drive import answer, body, code, make_stuck, place
from web.schemas import MAX_NOTE

JSON = {"Accept": "application/json"}


@pytest.fixture(autouse=True)
def every_service_running() -> Iterator[None]:
    """A pause must not outlive its test (the tier's other tests place orders)."""
    yield
    with transaction() as session:
        session.execute(sa.update(ServiceState).values(state="running"))


def state(service: str) -> str:
    with transaction() as session:
        return service_states.state_of(session, service).state


def audit_count() -> int:
    with transaction() as session:
        return int(session.scalar(sa.select(sa.func.count()).select_from(ServiceAudit)) or 0)


def services(client: FlaskClient, headers: dict[str, str]) -> dict[str, Any]:
    listed = body(client.get("/admin/services", headers={**headers, **JSON}))
    return {s["service"]: s for s in listed["services"]}


def test_services_lists_every_service_of_the_registry(
    client: FlaskClient, admin_headers: dict
) -> None:
    listed = services(client, admin_headers)
    assert set(listed) == {"inventory", "payment", "orders"}
    assert all(s["state"] == "running" for s in listed.values())
    page = client.get("/admin/services", headers=admin_headers)
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert 'data-service="payment"' in page.get_data(as_text=True)


def test_pause_then_resume_by_json(client: FlaskClient, admin_headers: dict) -> None:
    h = {**admin_headers, **JSON}
    r = client.post("/admin/services/payment/pause", json={"note": "provider down"}, headers=h)
    assert r.status_code == 202 and body(r) == {"service": "payment", "state": "paused"}
    shown = services(client, admin_headers)["payment"]
    assert shown["state"] == "paused" and shown["note"] == "provider down"
    assert shown["by"] and shown["hold_compensations"] is True
    assert client.post("/admin/services/payment/pause", json={}, headers=h).status_code == 409
    r = client.post("/admin/services/payment/resume", json={}, headers=h)
    assert r.status_code == 202 and body(r)["state"] == "running"
    r = client.post("/admin/services/payment/resume", json={}, headers=h)
    assert r.status_code == 409 and code(r) == "not_applicable"


@pytest.mark.parametrize(
    "payload",
    [
        {"hold_compensations": "no"},
        {"hold_compensations": 1},
        {"note": "x" * (MAX_NOTE + 1)},
        {"note": "a\x00b"},
        {"note": 5},
        {"unknown": True},
    ],
)
def test_bad_input_is_422_and_changes_nothing(
    client: FlaskClient, admin_headers: dict, payload: dict[str, Any]
) -> None:
    before = audit_count()
    r = client.post("/admin/services/payment/pause", json=payload, headers=admin_headers)
    assert r.status_code == 422 and code(r) == "validation_failed"
    assert state("payment") == "running" and audit_count() == before


def test_malformed_and_unknown_are_4xx(client: FlaskClient, admin_headers: dict) -> None:
    before = audit_count()
    h = {**admin_headers, "Content-Type": "application/json"}
    assert client.post("/admin/services/payment/pause", data="{", headers=h).status_code == 400
    assert client.post("/admin/services/payment/pause", data="[]", headers=h).status_code == 400
    r = client.post("/admin/services/nosuch/pause", json={}, headers=admin_headers)
    assert r.status_code == 404 and code(r) == "not_found"
    r = client.post("/admin/services/payment/pause", data="x", headers={
        **admin_headers, "Content-Type": "text/plain"})
    assert r.status_code == 415
    assert client.post("/admin/services/payment/pause", json={}).status_code == 401
    assert state("payment") == "running" and audit_count() == before


def test_a_form_needs_its_csrf_token(client: FlaskClient, admin_headers: dict) -> None:
    before = audit_count()
    r = client.post("/admin/services/payment/pause", data={"note": "x"}, headers=admin_headers)
    assert r.status_code == 400 and state("payment") == "running" and audit_count() == before
    token = csrf_token(client, "/admin/services", admin_headers)
    r = client.post(
        "/admin/services/payment/pause",
        data={"csrf_token": token, "note": "by form", "hold_compensations": "false"},
        headers=admin_headers,
    )
    assert r.status_code == 303 and r.headers["Location"].endswith("/admin/services")
    shown = services(client, admin_headers)["payment"]
    assert shown["state"] == "paused" and shown["hold_compensations"] is False
    r = client.post("/admin/services/payment/resume", data={"csrf_token": token},
                    headers=admin_headers)
    assert r.status_code == 303 and state("payment") == "running"


def _charge(saga_id: str) -> dict[str, Any]:
    with transaction() as session:
        saga = engine.lock_saga(session, uuid.UUID(saga_id))
        assert saga is not None
        row = saga.steps[2]
        rows = session.execute(
            sa.select(OutboxMessage.held_at, OutboxMessage.sent_at)
            .where(OutboxMessage.saga_id == saga.id, OutboxMessage.task == "payment.charge")
        ).all()
        return {
            "attempts": row.attempts, "deadline": row.deadline_at, "held_since": saga.held_since,
            "saga_deadline": saga.deadline_at, "rows": rows, "status": row.status.value,
        }


def test_a_paused_service_holds_the_command_and_a_release_dispatches_it(
    client: FlaskClient, admin_headers: dict
) -> None:
    h = {**admin_headers, **JSON}
    assert client.post("/admin/services/payment/pause", json={}, headers=h).status_code == 202
    saga_id = place(client)["saga_id"]
    answer(saga_id, ReplyOutcome.SUCCEEDED)  # inventory reserved: payment.charge comes next
    held = _charge(saga_id)
    assert held["status"] == "running" and held["attempts"] == 0 and held["deadline"] is None
    assert held["held_since"] is not None
    assert [r.held_at is not None for r in held["rows"]] == [True]
    listed = body(client.get("/admin/sagas", query_string={"held": "true"}, headers=h))
    assert saga_id in {s["saga_id"] for s in listed["sagas"]}
    assert all(s["held"] for s in listed["sagas"])
    assert not release.release_one("payment"), "still paused: nothing is released"

    assert client.post("/admin/services/payment/resume", json={}, headers=h).status_code == 202
    assert release.release_one("payment")
    sent = _charge(saga_id)
    assert sent["attempts"] == 1 and sent["deadline"] is not None and sent["held_since"] is None
    assert sent["saga_deadline"] > held["saga_deadline"]
    assert [r.held_at is None for r in sent["rows"]] == [True], "the held row gave way to a new one"
    detail = body(client.get(f"/admin/sagas/{saga_id}", headers=h))
    events = [e["event"] for e in detail["timeline"]]
    assert events.index("step.held") < events.index("step.released") < len(events)
    assert events.count("step.dispatched") == 2  # inventory.reserve, then payment.charge once


def test_a_transient_failure_while_paused_is_held_again_and_not_counted(
    client: FlaskClient, admin_headers: dict
) -> None:
    h = {**admin_headers, **JSON}
    saga_id = place(client)["saga_id"]
    answer(saga_id, ReplyOutcome.SUCCEEDED)  # payment.charge dispatched (attempt 1)
    assert client.post("/admin/services/payment/pause", json={}, headers=h).status_code == 202
    with transaction() as session:
        saga = engine.lock_saga(session, uuid.UUID(saga_id))
        assert saga is not None
        phase = saga.steps[2].phase("action")
        assert phase.request_id is not None
        result = engine.on_reply(session, saga, "payment.charge", phase.request_id, 1,
                                 ReplyOutcome.RETRYING, error="provider down", held=True)
    assert result.startswith("held")
    again = _charge(saga_id)
    assert again["deadline"] is None and again["held_since"] is not None
    with transaction() as session:
        saga = engine.lock_saga(session, uuid.UUID(saga_id))
        assert saga is not None
        step = saga.steps[2]
        assert step.attempts - step.attempts_base == 0, "the failed attempt is given back"
        assert engine.on_deadline(session, saga, engine.utcnow()) is None


def test_an_attempt_lost_while_paused_is_held_again_not_counted(
    client: FlaskClient, admin_headers: dict
) -> None:
    """The breaker's probe (or an attempt in flight at a pause) that gets no reply before its
    deadline waits again instead of spending the step's budget."""
    h = {**admin_headers, **JSON}
    saga_id = place(client)["saga_id"]
    answer(saga_id, ReplyOutcome.SUCCEEDED)  # payment.charge dispatched (attempt 1)
    assert client.post("/admin/services/payment/pause", json={}, headers=h).status_code == 202
    make_stuck(saga_id)
    with transaction() as session:
        saga = engine.lock_saga(session, uuid.UUID(saga_id))
        assert saga is not None
        assert engine.on_deadline(session, saga, engine.utcnow()) == "held again"
        step = saga.steps[2]
        assert step.attempts - step.attempts_base == 0 and step.deadline_at is None
        assert saga.held_since is not None
