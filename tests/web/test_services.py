"""The services console and the holding of commands, in-process: pause and resume, bad input,
CSRF, and what a pause does to a saga's next command (held, no attempt, no deadline) and a resume
(released: an attempt, a fresh deadline, the saga's deadline moved on); the dispatch points of the
batched paths: the web's one-statement order, a batch of replies, a compensation."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from models.db import transaction
from models.outbox import OutboxMessage
from models.sagas import SagaEvent
from models.services import ServiceAudit, ServiceState
from orchestrator.kernel import breaker, engine, release, replies, service_states
from orchestrator.messaging import fastpath
from orchestrator.messaging.envelopes import (
    ReplyOutcome,
    ReplyPayload,
    make_reply,
    parse_command,
    parse_reply,
)
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


def _first_command(saga_id: str) -> dict[str, Any]:
    """The order saga's first command (inventory.reserve: the web did step 0 itself), as the
    web's one statement wrote it."""
    with transaction() as session:
        saga = engine.lock_saga(session, uuid.UUID(saga_id))
        assert saga is not None
        rows = session.execute(
            sa.select(OutboxMessage.held_at)
            .where(OutboxMessage.saga_id == saga.id, OutboxMessage.task == "inventory.reserve")
            .order_by(OutboxMessage.id)
        ).all()
        events = session.scalars(
            sa.select(SagaEvent.event).where(SagaEvent.saga_id == saga.id).order_by(SagaEvent.id)
        ).all()
        step = saga.steps[1]
        return {"attempts": step.attempts, "deadline": step.deadline_at,
                "held_since": saga.held_since, "held": [r.held_at is not None for r in rows],
                "events": list(events)}


def test_the_web_s_one_statement_order_is_held_when_its_first_service_is_paused(
    client: FlaskClient, admin_headers: dict
) -> None:
    """The web writes an order in one statement with no read before it: it dispatches by the
    states it read last, and the guard catches a pause it has not seen (the states are read
    again, the order written held)."""
    h = {**admin_headers, **JSON}
    before = _first_command(place(client)["saga_id"])  # the process has seen "all running"
    assert before["held"] == [False] and before["attempts"] == 1
    assert client.post("/admin/services/inventory/pause", json={}, headers=h).status_code == 202
    saga_id = place(client)["saga_id"]
    held = _first_command(saga_id)
    assert held["held"] == [True], "the stale view of the states was caught by the guard"
    assert held["attempts"] == 0 and held["deadline"] is None and held["held_since"] is not None
    assert held["events"][-1] == "step.held" and "step.dispatched" not in held["events"]
    assert not release.release_one("inventory")

    assert client.post("/admin/services/inventory/resume", json={}, headers=h).status_code == 202
    assert release.release_one("inventory")
    sent = _first_command(saga_id)
    assert sent["held"] == [False] and sent["attempts"] == 1 and sent["held_since"] is None
    assert sent["events"][-3:] == ["step.held", "step.released", "step.dispatched"]
    placed_after = _first_command(place(client)["saga_id"])  # seen running again: sent at once
    assert placed_after["held"] == [False]


def _reserved_replies(saga_ids: list[str]) -> list[Any]:
    """inventory.reserve's success for each saga, as the batch consumer reads them."""
    with transaction() as session:
        envelopes = session.scalars(
            sa.select(OutboxMessage.envelope).where(
                OutboxMessage.saga_id.in_([uuid.UUID(s) for s in saga_ids]),
                OutboxMessage.task == "inventory.reserve",
            )
        ).all()
    succeeded = ReplyPayload(outcome=ReplyOutcome.SUCCEEDED)
    return [parse_reply(make_reply(parse_command(e), 1, succeeded)) for e in envelopes]


def test_a_batch_of_replies_publishes_no_held_command(
    client: FlaskClient, admin_headers: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The orchestrator's batch (replies.apply_batch) hands its commands to the batch consumer's
    publish: a held one is not among them, and waits in the outbox."""
    monkeypatch.setattr(fastpath, "enabled", lambda: True)  # this tier publishes nothing itself
    h = {**admin_headers, **JSON}
    first, *others = [place(client)["saga_id"] for _ in range(4)]
    applied = replies.apply_batch(_reserved_replies([first]))
    assert [m.task for m in applied.publish] == ["payment.charge"], "running: it goes out"
    assert client.post("/admin/services/payment/pause", json={}, headers=h).status_code == 202
    applied = replies.apply_batch(_reserved_replies(others))
    assert applied.refused == {} and len(applied.results) == 3
    assert applied.publish == [], "nothing to publish: every payment.charge is held"
    assert {_charge(s)["rows"][0].held_at is not None for s in others} == {True}


def _refunds(saga_id: str) -> list[bool]:
    with transaction() as session:
        rows = session.execute(
            sa.select(OutboxMessage.held_at).where(
                OutboxMessage.saga_id == uuid.UUID(saga_id), OutboxMessage.task == "payment.refund"
            )
        ).all()
        return [r.held_at is not None for r in rows]


@pytest.mark.parametrize("hold_compensations", [True, False])
def test_a_compensation_is_held_unless_the_pause_lets_compensations_through(
    client: FlaskClient, admin_headers: dict, hold_compensations: bool
) -> None:
    h = {**admin_headers, **JSON}
    saga_id = place(client)["saga_id"]
    answer(saga_id, ReplyOutcome.SUCCEEDED)  # inventory.reserve: payment.charge dispatched
    r = client.post("/admin/services/payment/pause", headers=h,
                    json={"hold_compensations": hold_compensations})
    assert r.status_code == 202
    with transaction() as session:
        engine.operator_action(session, uuid.UUID(saga_id), "compensate", "test", None)
    assert _refunds(saga_id) == [hold_compensations]


def test_calls_flushed_before_a_resume_stay_out_of_the_breaker_s_window(app: Flask) -> None:
    """A resume starts a clean window, even when a flush committed in the same second before it
    (the breaker must judge what came after: 4 failures of 4 calls, not 4 of 16)."""
    with transaction() as session:
        breaker.record_and_judge(session, {"payment": [12, 0]})
    with transaction() as session:
        service_states.pause(session, "payment", "admin", None)
    with transaction() as session:
        service_states.resume(session, "payment", "admin", None)
    with transaction() as session:
        breaker.record_and_judge(session, {"payment": [0, 4]})
    with transaction() as session:
        assert service_states.failure_rates(session)["payment"] == (4, 4)


def test_a_flush_that_fails_keeps_its_counts_for_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    breaker.take()
    breaker.put_back({"payment": [1, 2]})

    def down(session: Any, taken: Any) -> list[str]:
        raise sa.exc.OperationalError("INSERT", {}, Exception("connection lost"))

    monkeypatch.setattr(breaker, "record_and_judge", down)
    assert breaker.flush() == []
    assert breaker.take() == {"payment": [1, 2]}
