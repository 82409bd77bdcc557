"""GET /openapi.json stays true: every route is described, and real answers match the schemas."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate as validate_spec
from werkzeug.test import TestResponse

from orchestrator.messaging.envelopes import ReplyOutcome
from tests.web.conftest import valid_order
from tests.web.drive import answer, command_body, complete, dead_letter, make_stuck, place

JSON = {"Accept": "application/json"}
NOT_API = {"/static/<path:filename>"}


@pytest.fixture(scope="module")
def spec(app: Flask) -> dict[str, Any]:
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    body: dict[str, Any] = response.json  # type: ignore[assignment]
    return body


class Checker:
    """Validates real responses against the described ones and remembers what it saw."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.seen: set[tuple[str, str, str]] = set()

    def __call__(self, response: TestResponse, path: str, method: str = "get") -> Any:
        operation = self.spec["paths"][path][method]
        status = str(response.status_code)
        assert status in operation["responses"], (
            f"{method.upper()} {path} answered {status}, which is not described"
        )
        described = operation["responses"][status]
        self.seen.add((path, method, status))
        if response.mimetype != "application/json":
            assert response.mimetype in described.get("content", {response.mimetype: {}}), (
                path,
                status,
                response.mimetype,
            )
            return None
        assert "application/json" in described["content"], (path, status)
        schema = {
            **described["content"]["application/json"]["schema"],
            "components": self.spec["components"],
        }
        body = response.json
        validator = OAS31Validator(schema, format_checker=OAS31Validator.FORMAT_CHECKER)
        errors = sorted(validator.iter_errors(body), key=lambda e: list(e.path))
        assert not errors, f"{method.upper()} {path} {status}: " + "; ".join(
            f"{list(e.path)}: {e.message}" for e in errors[:5]
        )
        return body


@pytest.fixture(scope="module")
def checker(spec: dict[str, Any]) -> Iterator[Checker]:
    yield Checker(spec)


def _openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule)


def test_the_description_is_valid_openapi_3(spec: dict[str, Any]) -> None:
    validate_spec(spec)
    assert spec["openapi"].startswith("3.")


def test_every_route_of_the_app_is_described_with_its_methods(
    app: Flask, spec: dict[str, Any]
) -> None:
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.rule in NOT_API:
            continue
        methods = {m.lower() for m in (rule.methods or set())} - {"head", "options"}
        routes.setdefault(_openapi_path(rule.rule), set()).update(methods)
    described = {path: set(ops) - {"parameters"} for path, ops in spec["paths"].items()}
    assert routes == described


def test_the_error_shape_is_the_contracts(spec: dict[str, Any]) -> None:
    error = spec["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    assert set(error["properties"]["error"]["required"]) == {"code", "message", "details"}


def test_shop_answers_match_the_description(client: FlaskClient, checker: Checker) -> None:
    placed = checker(client.post("/orders", json=valid_order()), "/orders", "post")
    key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    checker(client.post("/orders", json=valid_order(), headers=key), "/orders", "post")
    assert (
        checker(client.post("/orders", json=valid_order(), headers=key), "/orders", "post")[
            "status"
        ]
        == "pending"
    )
    checker(
        client.post("/orders", json=valid_order(customer_id="x"), headers=key), "/orders", "post"
    )  # 409
    checker(client.post("/orders", data="{", content_type="application/json"), "/orders", "post")
    checker(client.post("/orders", data="x", content_type="text/plain"), "/orders", "post")
    checker(client.post("/orders", json=valid_order(items=[])), "/orders", "post")  # 422
    checker(
        client.post("/orders", data="x" * 70_000, content_type="application/json"),
        "/orders",
        "post",
    )  # 413
    checker(client.get(f"/orders/{placed['order_id']}", headers=JSON), "/orders/{order_id}")
    checker(client.get(f"/orders/{placed['order_id']}"), "/orders/{order_id}")  # the page
    checker(client.get(f"/orders/{uuid.uuid4()}", headers=JSON), "/orders/{order_id}")
    products = checker(client.get("/products"), "/products")
    assert products and {"sku", "available"} <= set(products[0])
    checker(client.get("/"), "/")


def test_a_finished_and_a_compensated_order_match_the_description(
    client: FlaskClient, checker: Checker
) -> None:
    done, declined = place(client), place(client)
    complete(done["saga_id"])
    answer(declined["saga_id"], ReplyOutcome.SUCCEEDED)
    answer(declined["saga_id"], ReplyOutcome.FAILED, "card declined")
    answer(declined["saga_id"], ReplyOutcome.SUCCEEDED)
    for placed in (done, declined):
        view = checker(
            client.get(f"/orders/{placed['order_id']}", headers=JSON), "/orders/{order_id}"
        )
        assert view["saga"]["timeline"]


def test_admin_answers_match_the_description(
    client: FlaskClient, admin_headers: dict, checker: Checker
) -> None:
    h = {**admin_headers, **JSON}
    running, stuck, done = (place(client)["saga_id"] for _ in range(3))
    complete(done)
    make_stuck(stuck)
    checker(client.get("/admin", headers=admin_headers), "/admin")
    checker(client.get("/admin/", headers=admin_headers), "/admin/")
    listed = checker(client.get("/admin/sagas", headers=h), "/admin/sagas")
    assert listed["sagas"]
    checker(client.get("/admin/sagas?state=stuck", headers=h), "/admin/sagas")
    checker(client.get("/admin/sagas?state=nope", headers=h), "/admin/sagas")  # 400
    checker(client.get("/admin/sagas", headers=JSON), "/admin/sagas")  # 401
    checker(client.get("/admin/sagas", headers=admin_headers), "/admin/sagas")  # HTML
    for saga_id in (running, stuck, done):
        checker(client.get(f"/admin/sagas/{saga_id}", headers=h), "/admin/sagas/{saga_id}")
    checker(client.get(f"/admin/sagas/{uuid.uuid4()}", headers=h), "/admin/sagas/{saga_id}")
    retry, compensate = "/admin/sagas/{saga_id}/retry", "/admin/sagas/{saga_id}/compensate"
    checker(client.post(f"/admin/sagas/{stuck}/retry", json={}, headers=h), retry, "post")
    checker(client.post(f"/admin/sagas/{done}/retry", json={}, headers=h), retry, "post")
    checker(client.post(f"/admin/sagas/{uuid.uuid4()}/retry", json={}, headers=h), retry, "post")
    checker(
        client.post(f"/admin/sagas/{running}/retry", data={}, headers=admin_headers), retry, "post"
    )  # 400: no CSRF token
    checker(
        client.post(f"/admin/sagas/{running}/compensate", json={"note": "n" * 600}, headers=h),
        compensate,
        "post",
    )  # 422
    checker(
        client.post(f"/admin/sagas/{running}/compensate", json={"note": "x"}, headers=h),
        compensate,
        "post",
    )
    checker(
        client.post(
            f"/admin/sagas/{running}/compensate", data="x", content_type="text/plain", headers=h
        ),
        compensate,
        "post",
    )  # 415
    bulk = checker(
        client.post(
            "/admin/sagas/bulk",
            headers=h,
            json={"action": "compensate", "saga_ids": [running, str(uuid.uuid4()), stuck]},
        ),
        "/admin/sagas/bulk",
        "post",
    )
    assert [r["status"] for r in bulk["results"]] == [409, 404, 202]
    checker(
        client.post("/admin/sagas/bulk", headers=h, json={"action": "x", "saga_ids": []}),
        "/admin/sagas/bulk",
        "post",
    )


def test_dead_letter_and_ops_answers_match_the_description(
    client: FlaskClient, admin_headers: dict, checker: Checker
) -> None:
    h = {**admin_headers, **JSON}
    saga_id = place(client)["saga_id"]
    first = dead_letter(saga_id, command_body(saga_id, "tok_visa"))
    second = dead_letter(None, b"\xff", step=None)
    letters = checker(client.get("/admin/dead-letters", headers=h), "/admin/dead-letters")
    assert {first, second} <= {d["id"] for d in letters["dead_letters"]}
    checker(client.get("/admin/dead-letters", headers=admin_headers), "/admin/dead-letters")
    replay, discard = (
        "/admin/dead-letters/{letter_id}/replay",
        "/admin/dead-letters/{letter_id}/discard",
    )
    checker(client.post(f"/admin/dead-letters/{first}/replay", json={}, headers=h), replay, "post")
    checker(
        client.post(f"/admin/dead-letters/{first}/replay", json={}, headers=h), replay, "post"
    )  # 409
    checker(client.post(f"/admin/dead-letters/{2**40}/replay", json={}, headers=h), replay, "post")
    checker(
        client.post(f"/admin/dead-letters/{second}/discard", json={}, headers=h), discard, "post"
    )
    checker(
        client.post(f"/admin/dead-letters/{second}/discard", json={}, headers=h), discard, "post"
    )
    checker(client.get("/healthz"), "/healthz")
    checker(client.get("/metrics"), "/metrics")
    checker(client.get("/openapi.json"), "/openapi.json")


def test_a_return_matches_the_description(client: FlaskClient, checker: Checker) -> None:
    from tests.web.test_returns import confirmed

    placed = confirmed(client)
    path = f"/orders/{placed['order_id']}/return"
    checker(client.post(path, json={"reason": "too big"}), "/orders/{order_id}/return", "post")
    checker(client.post(path, json={}), "/orders/{order_id}/return", "post")  # 409
    checker(client.get(f"/orders/{placed['order_id']}", headers=JSON), "/orders/{order_id}")


def test_bulk_by_filter_and_its_operations_match_the_description(
    client: FlaskClient, admin_headers: dict, checker: Checker
) -> None:
    from orchestrator.kernel import operations

    h = {**admin_headers, **JSON}
    since = datetime.now(UTC).isoformat()
    for _ in range(2):
        make_stuck(place(client)["saga_id"])
    wanted = {"state": "stuck", "created_after": since}
    bulk, one = "/admin/sagas/bulk", "/admin/operations/{operation_id}"
    preview = checker(
        client.post(bulk, headers=h, json={"action": "retry", "filter": wanted, "dry_run": True}),
        bulk,
        "post",
    )
    assert preview["count"] == 2
    started = checker(
        client.post(bulk, headers=h, json={"action": "retry", "filter": wanted, "note": "n"}),
        bulk,
        "post",
    )
    checker(
        client.post(bulk, headers=h, json={"action": "retry", "filter": {"reason": "x"}}),
        bulk,
        "post",
    )  # 422
    checker(client.get("/admin/operations", headers=h), "/admin/operations")
    checker(client.get("/admin/operations", headers=admin_headers), "/admin/operations")  # HTML
    checker(client.get(f"/admin/operations/{started['operation_id']}", headers=h), one)
    operations.run(budget_s=5)
    done = checker(client.get(f"/admin/operations/{started['operation_id']}", headers=h), one)
    assert done["state"] == "done" and done["results"] == {"202": 2}
    checker(client.get(f"/admin/operations/{uuid.uuid4()}", headers=h), one)  # 404
def test_service_answers_match_the_description(
    client: FlaskClient, admin_headers: dict, checker: Checker
) -> None:
    h = {**admin_headers, **JSON}
    pause, resume = "/admin/services/{service}/pause", "/admin/services/{service}/resume"
    checker(client.get("/admin/services", headers=h), "/admin/services")
    checker(client.get("/admin/services", headers=admin_headers), "/admin/services")
    checker(client.post("/admin/services/orders/pause", json={}, headers=h), pause, "post")
    checker(client.post("/admin/services/orders/pause", json={}, headers=h), pause, "post")  # 409
    checker(client.post("/admin/services/nosuch/pause", json={}, headers=h), pause, "post")
    checker(client.post("/admin/services/orders/resume", json={}, headers=h), resume, "post")
    checker(client.post("/admin/services/orders/resume", json={}, headers=h), resume, "post")


def test_every_json_operation_was_exercised(spec: dict[str, Any], checker: Checker) -> None:
    """Runs last in this module: each described JSON success answer was checked for real."""
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            ok = [
                s
                for s, r in operation["responses"].items()
                if s.startswith("2") and "application/json" in r.get("content", {})
            ]
            if ok:
                assert any((path, method, s) in checker.seen for s in ok), (path, method)
