"""POST /orders/<order_id>/return in the web tier: the answers, the conditional update, the scope
of an Idempotency-Key, the form; every answer checked against the OpenAPI description."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from models.db import transaction
from models.enums import OrderStatus
from models.orders import Order
from orchestrator.messaging.envelopes import ReplyOutcome
from tests.web.conftest import csrf_token, valid_order
from tests.web.drive import answer, body, code, complete, place
from tests.web.test_openapi import Checker

PATH = "/orders/{order_id}/return"
JSON = {"Accept": "application/json"}


@pytest.fixture(scope="module")
def check(app: Flask) -> Checker:
    spec: dict[str, Any] = app.test_client().get("/openapi.json").json or {}
    return Checker(spec)


def order_becomes(order_id: str, status: str) -> None:
    """What the orders service does to the order (no worker runs in this tier)."""
    with transaction() as session:
        session.execute(
            sa.update(Order)
            .where(Order.id == uuid.UUID(order_id))
            .values(status=OrderStatus(status))
        )


def confirmed(client: FlaskClient) -> dict[str, str]:
    placed = place(client)
    complete(placed["saga_id"])
    order_becomes(placed["order_id"], "confirmed")
    return placed


def ret(client: FlaskClient, order_id: str, json: Any = None, **kw: Any) -> Any:
    return client.post(f"/orders/{order_id}/return", json=json if json is not None else {}, **kw)


def order(client: FlaskClient, order_id: str) -> dict[str, Any]:
    view: dict[str, Any] = body(client.get(f"/orders/{order_id}", headers=JSON))
    return view


def test_a_confirmed_order_starts_one_return_saga(client: FlaskClient, check: Checker) -> None:
    placed = confirmed(client)
    response = ret(client, placed["order_id"], {"reason": "too small"})
    started = check(response, PATH, "post")
    assert response.status_code == 202
    assert response.headers["Location"] == f"/orders/{placed['order_id']}"
    assert (started["order_id"], started["status"]) == (placed["order_id"], "returning")
    view = order(client, placed["order_id"])
    assert view["status"] == "returning"
    [saga] = view["returns"]
    assert (saga["saga_id"], saga["definition"], saga["definition_version"]) == (
        started["saga_id"],
        "return",
        1,
    )
    assert [s["name"] for s in saga["steps"]] == [
        "orders.begin_return",
        "payment.return_refund",
        "inventory.return_stock",
        "orders.complete_return",
    ]
    assert saga["steps"][1]["status"] == "running"
    again = ret(client, placed["order_id"])
    check(again, PATH, "post")
    assert (again.status_code, code(again)) == (409, "not_returnable")


@pytest.mark.parametrize("how", ["pending", "cancelled", "returned"])
def test_an_order_that_is_not_confirmed_is_not_returnable(
    client: FlaskClient, check: Checker, how: str
) -> None:
    placed = place(client)
    if how == "cancelled":
        answer(placed["saga_id"], ReplyOutcome.FAILED, "out of stock")
        answer(placed["saga_id"], ReplyOutcome.SUCCEEDED)
        order_becomes(placed["order_id"], "cancelled")
    elif how == "returned":
        placed = confirmed(client)
        saga_id = body(ret(client, placed["order_id"]))["saga_id"]
        for _ in range(3):
            answer(saga_id, ReplyOutcome.SUCCEEDED)
        order_becomes(placed["order_id"], "returned")
    assert order(client, placed["order_id"])["status"] == how
    response = ret(client, placed["order_id"])
    check(response, PATH, "post")
    assert (response.status_code, code(response)) == (409, "not_returnable")


def test_an_unknown_order_is_404(client: FlaskClient, check: Checker) -> None:
    for ident in (str(uuid.uuid4()), "not-a-uuid"):
        response = ret(client, ident)
        assert response.status_code == 404
    check(ret(client, str(uuid.uuid4())), PATH, "post")


def test_a_refused_refund_aborts_the_return_and_a_new_one_may_start(client: FlaskClient) -> None:
    placed = confirmed(client)
    first = body(ret(client, placed["order_id"]))["saga_id"]
    assert answer(first, ReplyOutcome.FAILED, "no charge") == "compensating"
    assert answer(first, ReplyOutcome.SUCCEEDED) == "compensated"  # orders.abort_return
    order_becomes(placed["order_id"], "confirmed")
    second = ret(client, placed["order_id"])
    assert second.status_code == 202 and body(second)["saga_id"] != first
    assert [r["state"] for r in order(client, placed["order_id"])["returns"]] == [
        "compensated",
        "running",
    ]


def test_concurrent_returns_of_one_order_make_one_saga(app: Flask) -> None:
    client = app.test_client()
    placed = confirmed(client)

    def one(_: int) -> int:
        return int(ret(app.test_client(), placed["order_id"]).status_code)

    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = sorted(pool.map(one, range(6)))
    assert statuses == [202, 409, 409, 409, 409, 409]
    assert len(order(client, placed["order_id"])["returns"]) == 1


def test_an_idempotency_key_is_scoped_to_its_route(client: FlaskClient, check: Checker) -> None:
    key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    placed = client.post("/orders", json=valid_order(), headers=key)
    assert placed.status_code == 202
    complete(body(placed)["saga_id"])
    order_id = body(placed)["order_id"]
    order_becomes(order_id, "confirmed")
    first = ret(client, order_id, {"reason": "broken"}, headers=key)  # the same key, another route
    assert first.status_code == 202
    replay = ret(client, order_id, {"reason": "broken"}, headers=key)
    check(replay, PATH, "post")
    assert replay.status_code == 200 and body(replay)["saga_id"] == body(first)["saga_id"]
    other = ret(client, order_id, {"reason": "other"}, headers=key)
    assert (other.status_code, code(other)) == (409, "idempotency_mismatch")
    assert len(order(client, order_id)["returns"]) == 1


def test_bad_input_is_refused_and_changes_nothing(client: FlaskClient, check: Checker) -> None:
    placed = confirmed(client)
    order_id = placed["order_id"]
    for payload in (
        {"reason": "x" * 201},
        {"reason": "bell\x07"},
        {"why": "x"},
        ["x"],
        {"faults": {"payment.charge": "fail"}},
        {"faults": {"orders.x": "fail"}},
    ):
        response = ret(client, order_id, payload)
        check(response, PATH, "post")
        assert response.status_code == 422, payload
    bad = client.post(f"/orders/{order_id}/return", data="{", content_type="application/json")
    assert bad.status_code == 400
    assert (
        client.post(f"/orders/{order_id}/return", data="x", content_type="text/plain").status_code
        == 415
    )
    assert (
        client.post(
            f"/orders/{order_id}/return", headers={"Idempotency-Key": "a b"}, json={}
        ).status_code
        == 400
    )
    assert order(client, order_id)["status"] == "confirmed"
    assert order(client, order_id)["returns"] == []


def test_the_order_page_returns_a_confirmed_order_through_its_form(client: FlaskClient) -> None:
    placed = confirmed(client)
    page = client.get(f"/orders/{placed['order_id']}").get_data(as_text=True)
    assert 'id="return-button"' in page
    no_token = client.post(f"/orders/{placed['order_id']}/return", data={"reason": "x"})
    assert no_token.status_code == 400
    token = csrf_token(client, f"/orders/{placed['order_id']}")
    done = client.post(
        f"/orders/{placed['order_id']}/return", data={"csrf_token": token, "reason": "wrong size"}
    )
    assert done.status_code == 303 and done.headers["Location"] == f"/orders/{placed['order_id']}"
    page = client.get(f"/orders/{placed['order_id']}").get_data(as_text=True)
    assert 'id="return-button"' not in page and 'id="returns"' in page
    pending = place(client)
    assert 'id="return-button"' not in client.get(f"/orders/{pending['order_id']}").get_data(True)
