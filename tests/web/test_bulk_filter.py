"""Bulk actions by filter through the app: the dry run, the recorded operation, bad filters, the
console's dry-run-then-confirm forms, and the runner (called here in-process: no worker runs in
this tier; tests/integration/test_bulk_operations.py runs it in the real orchestrator)."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from flask.testing import FlaskClient

from models.db import transaction
from models.operations import Operation, OperationItem
from models.sagas import SagaEvent
from orchestrator.kernel import operations
from orchestrator.messaging.envelopes import ReplyOutcome
from tests.integration.helpers import gaps_s
from tests.web.conftest import csrf_token
from tests.web.drive import answer, body, code, complete, place

JSON = {"Accept": "application/json"}
BULK = "/admin/sagas/bulk"


@pytest.fixture(autouse=True)
def _nothing_pending() -> None:
    """Operations of earlier tests are done: each test counts what its own runner does."""
    operations.run(budget_s=60)


def parked(client: FlaskClient) -> str:
    """A declined card whose stock release is then refused: failed (parked), reason
    payment_declined, current step inventory.reserve (the parked release's)."""
    saga_id = place(client)["saga_id"]
    answer(saga_id, ReplyOutcome.SUCCEEDED)
    answer(saga_id, ReplyOutcome.FAILED, "card declined")
    assert answer(saga_id, ReplyOutcome.FAILED, "release refused") == "failed"
    return saga_id


def since() -> str:
    """Now, as a filter's created_after: only the sagas this test makes from here on."""
    return datetime.now(UTC).isoformat()


def listed_ids(client: FlaskClient, headers: dict, **query: str) -> list[str]:
    """Every saga id the admin list shows under ``query``, all pages."""
    ids: list[str] = []
    params = dict(query)
    while True:
        page = body(client.get("/admin/sagas", query_string=params, headers={**headers, **JSON}))
        ids += [s["saga_id"] for s in page["sagas"]]
        if not page["next"]:
            return ids
        params["cursor"] = page["next"]


def written() -> tuple[int, int]:
    with transaction() as session:
        ops = session.scalar(sa.select(sa.func.count()).select_from(Operation))
        items = session.scalar(sa.select(sa.func.count()).select_from(OperationItem))
    return int(ops or 0), int(items or 0)


def post(client: FlaskClient, headers: dict, **fields: Any) -> Any:
    return client.post(BULK, headers=headers, json=fields)


def operation(client: FlaskClient, headers: dict, operation_id: str) -> dict[str, Any]:
    got: dict[str, Any] = body(
        client.get(f"/admin/operations/{operation_id}", headers={**headers, **JSON})
    )
    return got


def bulk_events(saga_id: str, operation_id: str) -> int:
    with transaction() as session:
        return int(
            session.scalar(
                sa.select(sa.func.count())
                .select_from(SagaEvent)
                .where(
                    SagaEvent.saga_id == uuid.UUID(saga_id),
                    SagaEvent.event == "operator.bulk",
                    SagaEvent.detail.contains(operation_id),
                )
            )
            or 0
        )


def test_the_dry_run_counts_what_the_list_shows_and_the_run_acts_on_the_same(
    client: FlaskClient, admin_headers: dict
) -> None:
    start = since()
    failed = [parked(client) for _ in range(3)]
    other = place(client)["saga_id"]  # running: the filter leaves it out
    wanted = {"state": "failed", "reason": "payment_declined", "created_after": start}
    before = written()
    preview = body(post(client, admin_headers, action="retry", filter=wanted, dry_run=True))
    assert written() == before, "a dry run writes nothing"
    shown = listed_ids(client, admin_headers, **wanted)
    assert preview == {"count": 3, "sample": shown} and set(shown) == set(failed)

    started = post(client, admin_headers, action="retry", filter=wanted, note="provider back")
    assert started.status_code == 202
    operation_id = body(started)["operation_id"]
    op = operation(client, admin_headers, operation_id)
    assert (op["total"], op["done"], op["state"]) == (preview["count"], 0, "pending")
    assert (op["action"], op["note"], op["actor"]) == ("retry", "provider back", "admin")
    assert op["filter"]["reason"] == "payment_declined" and op["filter"]["state"] == "failed"
    assert [i["saga_id"] for i in op["items"]] == shown  # the list's order
    assert {i["status"] for i in op["items"]} == {None}

    assert operations.run(budget_s=10) == 3
    op = operation(client, admin_headers, operation_id)
    assert (op["done"], op["state"], op["results"]) == (3, "done", {"202": 3})
    assert {i["state"] for i in op["items"]} == {"compensating"}
    for saga_id in failed:
        assert bulk_events(saga_id, operation_id) == 1
    assert bulk_events(other, operation_id) == 0
    # Run again: nothing is pending, nothing acts twice.
    assert operations.run(budget_s=1) == 0
    assert all(bulk_events(s, operation_id) == 1 for s in failed)
    listed = body(client.get("/admin/operations", headers={**admin_headers, **JSON}))
    assert listed["operations"][0]["operation_id"] == operation_id


def test_a_saga_that_changed_meanwhile_answers_409_and_is_left_alone(
    client: FlaskClient, admin_headers: dict
) -> None:
    start = since()
    a, b = parked(client), parked(client)
    wanted = {"state": "failed", "created_after": start}
    operation_id = body(post(client, admin_headers, action="retry", filter=wanted))["operation_id"]
    # Between the request and the runner, an operator retries one of them by hand.
    assert client.post(f"/admin/sagas/{a}/retry", json={}, headers=admin_headers).status_code == 202
    operations.run(budget_s=10)
    results = {
        i["saga_id"]: i["status"] for i in operation(client, admin_headers, operation_id)["items"]
    }
    assert results == {a: 409, b: 202}
    assert bulk_events(a, operation_id) == 0


def test_a_filter_that_matches_nothing_acts_on_nothing(
    client: FlaskClient, admin_headers: dict
) -> None:
    place(client)
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    wanted = {"state": "running", "created_after": future}
    assert body(post(client, admin_headers, action="compensate", filter=wanted, dry_run=True)) == {
        "count": 0,
        "sample": [],
    }
    operation_id = body(post(client, admin_headers, action="compensate", filter=wanted))[
        "operation_id"
    ]
    op = operation(client, admin_headers, operation_id)
    assert (op["total"], op["done"], op["state"], op["items"]) == (0, 0, "done", [])
    assert op["finished_at"] is not None


def test_bad_filters_are_422_with_details_and_write_nothing(
    client: FlaskClient, admin_headers: dict
) -> None:
    saga_id = place(client)["saga_id"]
    cases: list[tuple[str, dict[str, Any]]] = [  # the field the details name, the body
        ("body", {"saga_ids": [saga_id], "filter": {"state": "failed"}}),
        ("body", {}),
        ("body", {"saga_ids": [saga_id], "dry_run": True}),
        ("filter", {"filter": {}}),
        (
            "filter",
            {"filter": {"created_after": "2026-12-02T00:00Z", "created_before": "2026-12-01"}},
        ),
        ("filter.state", {"filter": {"state": "asleep"}}),
        ("filter.reason", {"filter": {"reason": "bad_luck"}}),
        ("filter.definition", {"filter": {"definition": "no-such-saga"}}),
        ("filter.step", {"filter": {"step": "payment.teleport"}}),
        ("filter.created_after", {"filter": {"created_after": "yesterday"}}),
        ("filter.created_before", {"filter": {"created_before": 1733000000}}),
        ("filter.q", {"filter": {"state": "failed", "q": saga_id}}),
        ("dry_run", {"filter": {"state": "failed"}, "dry_run": "yes"}),
    ]
    before = written()
    for field, sent in cases:
        response = client.post(BULK, json={"action": "retry", **sent}, headers=admin_headers)
        assert response.status_code == 422, (field, response.get_data(as_text=True))
        assert code(response) == "validation_failed"
        named = [d["field"] for d in body(response)["error"]["details"]]
        assert field in named, (field, named)
    assert written() == before
    assert (
        body(client.get(f"/admin/sagas/{saga_id}", headers={**admin_headers, **JSON}))["state"]
        == "running"
    )


def test_the_list_filters_by_reason_step_and_creation_time(
    client: FlaskClient, admin_headers: dict
) -> None:
    start = since()
    failed = parked(client)
    done = place(client)["saga_id"]
    complete(done)
    h = admin_headers
    assert listed_ids(client, h, reason="payment_declined", created_after=start) == [failed]
    assert listed_ids(client, h, step="inventory.reserve", state="failed", created_after=start) == [
        failed
    ]
    assert listed_ids(client, h, step="orders.confirm", created_after=start) == [done]
    end = since()
    assert set(listed_ids(client, h, created_after=start, created_before=end)) == {failed, done}
    assert listed_ids(client, h, created_after=end) == []
    rows = body(
        client.get("/admin/sagas", query_string={"created_after": start}, headers={**h, **JSON})
    )
    assert {r["definition_version"] for r in rows["sagas"]} == {1}
    for bad in (
        {"reason": "nope"},
        {"step": "nope.nope"},
        {"created_after": "soon"},
        {"created_after": end, "created_before": end},
    ):
        response = client.get("/admin/sagas", query_string=bad, headers={**h, **JSON})
        assert response.status_code == 400, bad


def _hidden_fields(html: str, form_id: str) -> dict[str, str]:
    form = html.split(f'id="{form_id}"', 1)[1].split("</form>", 1)[0]
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', form))


def test_the_console_counts_first_and_acts_only_on_confirm(
    client: FlaskClient, admin_headers: dict
) -> None:
    start = since()
    failed = [parked(client), parked(client)]
    query = {"state": "failed", "reason": "payment_declined", "created_after": start}
    page = client.get("/admin/sagas", query_string=query, headers=admin_headers)
    html = page.get_data(as_text=True)
    assert 'id="bulk-filter"' in html
    fields = _hidden_fields(html, "bulk-filter")
    assert fields["dry_run"] == "1" and fields["filter.reason"] == "payment_declined"
    assert fields["filter.created_after"] == start and fields["csrf_token"]
    before = written()
    preview = client.post(
        BULK, data={**fields, "action": "retry", "note": "by form"}, headers=admin_headers
    )
    assert preview.status_code == 200 and preview.mimetype == "text/html"
    shown = preview.get_data(as_text=True)
    assert 'data-count="2"' in shown and 'id="bulk-confirm"' in shown
    assert all(saga_id in shown for saga_id in failed)
    assert written() == before, "the count is a dry run"

    confirm = _hidden_fields(shown, "bulk-confirm-form")
    assert "dry_run" not in confirm and confirm["note"] == "by form"
    for token in (None, "forged-token"):  # the confirm button's form is CSRF-protected
        forged = {k: v for k, v in confirm.items() if k != "csrf_token"}
        if token:
            forged["csrf_token"] = token
        assert client.post(BULK, data=forged, headers=admin_headers).status_code == 400
    assert written() == before
    done = client.post(BULK, data=confirm, headers=admin_headers)
    assert done.status_code == 303
    location = done.headers["Location"]
    assert location.startswith("/admin/operations/")
    op = operation(client, admin_headers, location.rsplit("/", 1)[1])
    assert op["total"] == 2 and op["note"] == "by form"
    assert {k for k, v in op["filter"].items() if v} == {"state", "reason", "created_after"}
    page = client.get(location, headers=admin_headers).get_data(as_text=True)
    assert 'id="operation-items"' in page and 'http-equiv="refresh"' in page  # still running
    listing = client.get("/admin/operations", headers=admin_headers).get_data(as_text=True)
    assert op["operation_id"] in listing


def test_the_filter_forms_need_their_csrf_token(client: FlaskClient, admin_headers: dict) -> None:
    fields = {"action": "retry", "filter.state": "failed", "dry_run": "1"}
    before = written()
    for token in (None, "forged-token"):
        data = {**fields, **({"csrf_token": token} if token else {})}
        assert client.post(BULK, data=data, headers=admin_headers).status_code == 400
        real = {k: v for k, v in data.items() if k != "dry_run"}
        assert client.post(BULK, data=real, headers=admin_headers).status_code == 400
    assert written() == before
    token = csrf_token(client, "/admin/sagas", admin_headers)
    bad = {**fields, "csrf_token": token, "filter.created_after": "not a date"}
    response = client.post(BULK, data=bad, headers={**admin_headers, **JSON})
    assert response.status_code == 422
    assert [d["field"] for d in body(response)["error"]["details"]] == ["filter.created_after"]


def test_the_runner_keeps_the_rate_bound(
    client: FlaskClient, admin_headers: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    rate = 4.0  # slower than this machine acts, so only the bound can explain the gaps
    monkeypatch.setattr(operations, "settings", lambda: SimpleNamespace(bulk_rate=rate))
    start = since()
    for _ in range(5):
        parked(client)
    wanted = {"state": "failed", "created_after": start}
    operation_id = body(post(client, admin_headers, action="retry", filter=wanted))["operation_id"]
    assert operations.run(budget_s=10) == 5
    items = operation(client, admin_headers, operation_id)["items"]
    gaps = gaps_s([i["at"] for i in items])
    assert min(gaps) >= 1 / rate - 0.001, gaps


def test_one_runner_at_a_time(client: FlaskClient, admin_headers: dict) -> None:
    """A second sweep (or orchestrator) finds the runner's lock taken and leaves at once."""
    start = since()
    parked(client)
    post(client, admin_headers, action="retry", filter={"state": "failed", "created_after": start})
    from models.db import get_engine

    with get_engine().connect() as held:
        assert held.scalar(sa.select(sa.func.pg_try_advisory_lock(operations.RUNNER_LOCK)))
        assert operations.run(budget_s=2) == 0
        held.scalar(sa.select(sa.func.pg_advisory_unlock(operations.RUNNER_LOCK)))
    assert operations.run(budget_s=5) == 1
