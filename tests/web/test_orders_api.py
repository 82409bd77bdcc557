"""POST /orders, GET /orders/<id>, GET /products and GET / against the contract's HTTP API section.

Status codes follow the contract's check order: 413, 415, 400 (JSON), 400 (CSRF), 422; then the
Idempotency-Key rules, the answers to a valid order, and the pages' security headers.
"""

from __future__ import annotations

import io
import json
import re
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from models.db import transaction
from models.orders import Order
from tests.web.conftest import csrf_token, valid_order
from web import MAX_BODY, create_app

JSON = {"Accept": "application/json"}
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def customer() -> str:
    """A customer id of this test alone, so rows can be found without cleaning up."""
    return f"api-{uuid.uuid4().hex[:12]}"


def orders_of(customer_id: str) -> int:
    with transaction() as session:
        return int(session.scalar(
            sa.select(sa.func.count()).select_from(Order).where(Order.customer_id == customer_id)
        ) or 0)


def assert_error(response: TestResponse, status: int, code: str | None = None) -> dict[str, Any]:
    """The contract's error shape: {"error": {"code", "message", "details"}}."""
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return dict(body["error"])


def error_fields(response: TestResponse) -> set[str]:
    details = assert_error(response, 422, "validation_failed")["details"]
    assert isinstance(details, list) and details
    for d in details:
        assert set(d) == {"field", "message"} and d["message"]
    return {d["field"] for d in details}


def padded(body: dict[str, Any], size: int) -> bytes:
    """A valid JSON body padded with trailing whitespace to exactly ``size`` bytes."""
    raw = json.dumps(body).encode()
    return raw + b" " * (size - len(raw))


class Endless(io.RawIOBase):
    """A request stream that never ends (a chunked upload that keeps going)."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        buffer[:] = b" " * len(buffer)
        return len(buffer)


def post_streamed(client: FlaskClient, stream: Any, content_type: str,
                  headers: dict[str, str] | None = None) -> TestResponse:
    """A POST without Content-Length (chunked), as gunicorn hands it over: the server terminates
    the input (``wsgi.input_terminated``) and the app must enforce the size itself."""
    response = client.post(
        "/orders", content_type=content_type,
        headers={"Transfer-Encoding": "chunked", **JSON, **(headers or {})},
        environ_overrides={"wsgi.input": stream, "wsgi.input_terminated": True},
    )
    # The test client sets Content-Length 0 for a form; Transfer-Encoding: chunked overrides it.
    assert response.request.content_length is None
    return response


# ----------------------------------------------------------------------------- 413


def test_a_body_over_64_kib_with_content_length_is_413(client: FlaskClient) -> None:
    cid = customer()
    response = client.post("/orders", data=padded(valid_order(customer_id=cid), MAX_BODY + 1),
                           content_type="application/json")
    assert_error(response, 413, "payload_too_large")
    assert orders_of(cid) == 0


def test_a_body_of_exactly_64_kib_is_accepted(client: FlaskClient) -> None:
    cid = customer()
    response = client.post("/orders", data=padded(valid_order(customer_id=cid), MAX_BODY),
                           content_type="application/json")
    assert response.status_code == 202
    assert orders_of(cid) == 1


def test_a_chunked_body_over_64_kib_without_content_length_is_413(client: FlaskClient) -> None:
    cid = customer()
    stream = io.BytesIO(padded(valid_order(customer_id=cid), MAX_BODY + 1))
    assert_error(post_streamed(client, stream, "application/json"), 413, "payload_too_large")
    assert orders_of(cid) == 0


def test_a_chunked_body_that_never_ends_is_413_not_a_hang(client: FlaskClient) -> None:
    assert_error(post_streamed(client, Endless(), "application/json"), 413, "payload_too_large")


def test_a_chunked_body_within_the_limit_is_read_whole(client: FlaskClient) -> None:
    cid = customer()
    stream = io.BytesIO(json.dumps(valid_order(customer_id=cid)).encode())
    response = post_streamed(client, stream, "application/json")
    assert response.status_code == 202
    assert orders_of(cid) == 1


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_size_is_checked_before_content_type_and_csrf(client: FlaskClient,
                                                      content_type: str | None) -> None:
    big = b"a=" + b"b" * MAX_BODY
    response = client.post("/orders", data=big, content_type=content_type, headers=JSON)
    assert_error(response, 413, "payload_too_large")
    streamed = post_streamed(client, io.BytesIO(big), content_type or "")
    assert_error(streamed, 413, "payload_too_large")


# ----------------------------------------------------------------------------- 415


@pytest.mark.parametrize("content_type", [
    "text/plain", "application/xml", "multipart/form-data; boundary=x", "application/jsonx",
    "text/json", None,
])
def test_a_wrong_content_type_is_415(client: FlaskClient, content_type: str | None) -> None:
    cid = customer()
    response = client.post("/orders", data=json.dumps(valid_order(customer_id=cid)),
                           content_type=content_type, headers=JSON)
    assert_error(response, 415, "unsupported_media_type")
    assert orders_of(cid) == 0


@pytest.mark.parametrize("accept", [None, "*/*", "text/plain"])
def test_an_api_client_that_names_no_html_gets_json_errors(client: FlaskClient,
                                                           accept: str | None) -> None:
    response = client.post("/orders", data="x", content_type="text/plain",
                           headers={"Accept": accept} if accept else {})
    assert_error(response, 415, "unsupported_media_type")


def test_json_with_a_charset_parameter_is_json(client: FlaskClient) -> None:
    response = client.post("/orders", data=json.dumps(valid_order(customer_id=customer())),
                           content_type="application/json; charset=utf-8")
    assert response.status_code == 202


def test_content_type_comes_before_json_parsing(client: FlaskClient) -> None:
    assert_error(client.post("/orders", data="{", content_type="text/plain"), 415)


# ----------------------------------------------------------------------------- 400 JSON


@pytest.mark.parametrize("body", [
    b"", b"{", b"[1,]", b"{'a': 1}", b"NaN", b"Infinity", b'{"q": -Infinity}', b"\xff\xfe\xfd",
    b'{"customer_id": "c"} trailing',
])
def test_malformed_json_is_400(client: FlaskClient, body: bytes) -> None:
    response = client.post("/orders", data=body, content_type="application/json")
    assert_error(response, 400, "malformed_json")


def test_malformed_json_comes_before_the_idempotency_key(client: FlaskClient) -> None:
    response = client.post("/orders", data=b"{", content_type="application/json",
                           headers={"Idempotency-Key": "has space"})
    assert_error(response, 400, "malformed_json")


# ----------------------------------------------------------------------------- CSRF


def form_fields(cid: str, **overrides: str) -> dict[str, str]:
    fields = {"customer_id": cid, "qty_SKU-APPLE": "2", "qty_SKU-BANANA": "0",
              "qty_SKU-PEAR": "0", "qty_SKU-CHERRY": "0", "card_token": "tok_visa"}
    fields.update(overrides)
    return fields


@pytest.mark.parametrize("token", [None, "", "not-a-token", "x" * 5000])
def test_a_form_post_without_a_valid_csrf_token_is_400(client: FlaskClient,
                                                       token: str | None) -> None:
    csrf_token(client)  # a session exists; the posted token still has to match it
    cid = customer()
    fields = form_fields(cid)
    if token is not None:
        fields["csrf_token"] = token
    response = client.post("/orders", data=fields, headers=JSON)
    assert_error(response, 400, "csrf_failed")
    assert orders_of(cid) == 0


def test_a_token_from_another_session_is_400(app: Flask) -> None:
    foreign = csrf_token(app.test_client())
    client = app.test_client()
    csrf_token(client)
    cid = customer()
    response = client.post("/orders", data={**form_fields(cid), "csrf_token": foreign},
                           headers=JSON)
    assert_error(response, 400, "csrf_failed")
    assert orders_of(cid) == 0


def test_csrf_comes_before_validation(client: FlaskClient) -> None:
    response = client.post("/orders", data=form_fields(""), headers=JSON)
    assert_error(response, 400, "csrf_failed")


def test_a_browser_form_post_without_token_gets_an_html_400(client: FlaskClient) -> None:
    response = client.post("/orders", data=form_fields(customer()),
                           headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert response.status_code == 400
    assert response.mimetype == "text/html"
    assert 'data-code="csrf_failed"' in response.get_data(as_text=True)


# ----------------------------------------------------------------------------- 422


@pytest.mark.parametrize(("change", "field"), [
    ({"customer_id": ""}, "customer_id"),
    ({"customer_id": "x" * 65}, "customer_id"),
    ({"customer_id": "a\x00b"}, "customer_id"),
    ({"customer_id": 42}, "customer_id"),
    ({"items": []}, "items"),
    ({"items": [{"sku": "SKU-APPLE", "quantity": 0}]}, "items[0].quantity"),
    ({"items": [{"sku": "SKU-APPLE", "quantity": 1001}]}, "items[0].quantity"),
    ({"items": [{"sku": "SKU-APPLE", "quantity": "2"}]}, "items[0].quantity"),
    ({"items": [{"sku": "SKU-APPLE", "quantity": 2.0}]}, "items[0].quantity"),
    ({"items": [{"sku": "SKU-APPLE", "quantity": True}]}, "items[0].quantity"),
    ({"items": [{"sku": "SKU-NOPE", "quantity": 1}]}, "items[0].sku"),
    ({"items": [{"sku": "SKU-APPLE", "quantity": 1}, {"sku": "SKU-APPLE", "quantity": 1}]},
     "items[1].sku"),
    ({"payment": {"card_token": "visa"}}, "payment.card_token"),
    ({"payment": {"card_token": "tok_" + "a" * 65}}, "payment.card_token"),
    ({"payment": {"card_token": "tok_visa", "cvc": "123"}}, "payment.cvc"),
    ({"coupon": "FREE"}, "coupon"),
])
def test_validation_is_422_naming_the_field(client: FlaskClient, change: dict[str, Any],
                                            field: str) -> None:
    body = valid_order(customer_id=customer())
    body.update(change)
    response = client.post("/orders", json=body)
    assert field in error_fields(response)
    if isinstance(body["customer_id"], str) and body["customer_id"].startswith("api-"):
        assert orders_of(body["customer_id"]) == 0


@pytest.mark.parametrize(("body", "field"), [
    ([], "body"), ("order", "body"), (None, "body"),
    ({"items": [{"sku": "SKU-APPLE", "quantity": 1}], "payment": {"card_token": "tok_visa"}},
     "customer_id"),
    ({"customer_id": "c", "payment": {"card_token": "tok_visa"}}, "items"),
    ({"customer_id": "c", "items": [{"sku": "SKU-APPLE", "quantity": 1}]}, "payment"),
    ({"customer_id": "c", "items": 5, "payment": {"card_token": "tok_visa"}}, "items"),
])
def test_a_body_of_the_wrong_shape_is_422(client: FlaskClient, body: Any, field: str) -> None:
    response = client.post("/orders", data=json.dumps(body), content_type="application/json")
    assert field in error_fields(response)


def test_validation_comes_after_the_idempotency_key(client: FlaskClient) -> None:
    response = client.post("/orders", json=valid_order(customer_id=""),
                           headers={"Idempotency-Key": ""})
    assert_error(response, 400, "invalid_idempotency_key")


# ----------------------------------------------------------------------------- faults


@pytest.fixture(scope="module")
def app_without_faults(app: Flask) -> Flask:
    return create_app({"TESTING": True, "FAULT_INJECTION": False})


def test_the_test_session_runs_with_fault_injection_on(app: Flask) -> None:
    assert app.config["FAULT_INJECTION"] is True


@pytest.mark.parametrize("faults", [{"payment.charge": "fail"}, {}, None])
def test_the_faults_field_is_422_when_injection_is_off(app_without_faults: Flask,
                                                       faults: Any) -> None:
    cid = customer()
    response = app_without_faults.test_client().post(
        "/orders", json=valid_order(customer_id=cid, faults=faults))
    assert "faults" in error_fields(response)
    assert orders_of(cid) == 0


def test_an_order_without_faults_is_accepted_when_injection_is_off(
    app_without_faults: Flask,
) -> None:
    response = app_without_faults.test_client().post("/orders",
                                                     json=valid_order(customer_id=customer()))
    assert response.status_code == 202


@pytest.mark.parametrize("faults", [
    {"inventory.reserve": "transient:2"},
    {"payment.charge": "always", "inventory.release": "fail"},
    {"orders.confirm": "crash"},
    {"payment.refund": "hang:1.5", "orders.cancel": "transient:999"},
    {"inventory.reserve": "hang:3"},
])
def test_valid_faults_are_accepted_when_injection_is_on(client: FlaskClient,
                                                        faults: dict[str, str]) -> None:
    cid = customer()
    response = client.post("/orders", json=valid_order(customer_id=cid, faults=faults))
    assert response.status_code == 202, response.get_data(as_text=True)
    assert orders_of(cid) == 1


@pytest.mark.parametrize(("faults", "field"), [
    ({"payment.explode": "fail"}, "faults.payment.explode"),
    ({"orders.create": "fail"}, "faults.orders.create"),
    ({"": "fail"}, "faults."),
    ({"payment.charge": "sometimes"}, "faults.payment.charge"),
    ({"payment.charge": "transient:0"}, "faults.payment.charge"),
    ({"payment.charge": "transient:"}, "faults.payment.charge"),
    ({"payment.charge": "crash\n"}, "faults.payment.charge"),
    ({"payment.charge": "hang:-1"}, "faults.payment.charge"),
    ({"payment.charge": 3}, "faults.payment.charge"),
    (["payment.charge"], "faults"),
])
def test_unknown_fault_names_and_values_are_422(client: FlaskClient, faults: Any,
                                                field: str) -> None:
    cid = customer()
    response = client.post("/orders", json=valid_order(customer_id=cid, faults=faults))
    assert field in error_fields(response)
    assert orders_of(cid) == 0


# ----------------------------------------------------------------------------- idempotency


@pytest.mark.parametrize("key", ["", " ", "a b", "x" * 256, "ключ", "tab\there", "\x7f", "é"])
def test_a_bad_idempotency_key_is_400(client: FlaskClient, key: str) -> None:
    cid = customer()
    response = client.post("/orders", json=valid_order(customer_id=cid),
                           headers={"Idempotency-Key": key})
    assert_error(response, 400, "invalid_idempotency_key")
    assert orders_of(cid) == 0


def test_the_longest_and_oddest_valid_keys_are_accepted(client: FlaskClient) -> None:
    for key in ["!" + uuid.uuid4().hex + "~" * 222, "k" + uuid.uuid4().hex[:1]]:
        response = client.post("/orders", json=valid_order(customer_id=customer()),
                               headers={"Idempotency-Key": key})
        assert response.status_code == 202, key


def test_the_same_key_and_body_returns_the_same_order(client: FlaskClient) -> None:
    cid, key = customer(), f"key-{uuid.uuid4()}"
    body = valid_order(customer_id=cid)
    first = client.post("/orders", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 202
    # The same JSON value, keys reordered and spaced differently.
    same = json.dumps(dict(reversed(list(body.items()))), indent=3)
    again = client.post("/orders", data=same, content_type="application/json",
                        headers={"Idempotency-Key": key})
    assert again.status_code == 200
    assert again.json == first.json
    assert again.headers["Location"] == first.headers["Location"]
    assert orders_of(cid) == 1


def test_the_same_key_with_another_body_is_409(client: FlaskClient) -> None:
    cid, key = customer(), f"key-{uuid.uuid4()}"
    assert client.post("/orders", json=valid_order(customer_id=cid),
                       headers={"Idempotency-Key": key}).status_code == 202
    other = valid_order(customer_id=cid, items=[{"sku": "SKU-APPLE", "quantity": 3}])
    response = client.post("/orders", json=other, headers={"Idempotency-Key": key})
    assert_error(response, 409, "idempotency_mismatch")
    assert orders_of(cid) == 1


# ----------------------------------------------------------------------------- success


def test_a_valid_json_order_is_202_with_location_and_body(client: FlaskClient) -> None:
    cid = customer()
    response = client.post("/orders", json=valid_order(customer_id=cid))
    assert response.status_code == 202
    body = response.get_json()
    assert set(body) == {"order_id", "saga_id", "status"}
    assert body["status"] == "pending"
    assert UUID_RE.match(body["order_id"]) and UUID_RE.match(body["saga_id"])
    assert body["order_id"] != body["saga_id"]
    assert response.headers["Location"] == f"/orders/{body['order_id']}"
    assert orders_of(cid) == 1


def test_a_valid_form_post_redirects_303_to_the_order_page(client: FlaskClient) -> None:
    cid = customer()
    fields = {**form_fields(cid, **{"qty_SKU-PEAR": "3"}), "csrf_token": csrf_token(client)}
    response = client.post("/orders", data=fields)
    assert response.status_code == 303
    location = response.headers["Location"]
    match = re.fullmatch(r"/orders/([0-9a-f-]{36})", location)
    assert match, location
    page = client.get(location)
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert cid in page.get_data(as_text=True)
    view = client.get(location, headers=JSON).get_json()
    assert view["items"] == [{"sku": "SKU-APPLE", "quantity": 2, "price_cents": 250},
                             {"sku": "SKU-PEAR", "quantity": 3, "price_cents": 310}]
    assert view["total_cents"] == 2 * 250 + 3 * 310


# ----------------------------------------------------------------------------- form errors


@pytest.mark.parametrize(("overrides", "field"), [
    ({"customer_id": ""}, "customer_id"),
    ({"customer_id": "y" * 65}, "customer_id"),
    ({"card_token": "visa"}, "payment.card_token"),
    ({"qty_SKU-APPLE": "0"}, "items"),
    ({"qty_SKU-APPLE": "abc"}, "items[0].quantity"),
    ({"qty_SKU-APPLE": "1001"}, "items[0].quantity"),
    ({"qty_SKU-APPLE": "-1"}, "items[0].quantity"),
    ({"qty_SKU-APPLE": "2.5"}, "items[0].quantity"),
    ({"qty_SKU-APPLE": "²"}, "items[0].quantity"),
    ({"qty_SKU-APPLE": "9" * 5000}, "items[0].quantity"),
])
def test_form_validation_errors_are_shown_next_to_their_fields(
    client: FlaskClient, overrides: dict[str, str], field: str,
) -> None:
    cid = customer()
    fields = {**form_fields(cid, **overrides), "csrf_token": csrf_token(client)}
    response = client.post("/orders", data=fields)
    assert response.status_code == 422
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert f'class="field-error" data-field="{field}"' in page
    # The form comes back filled in, with a fresh token, so the user can correct and resend.
    assert 'name="csrf_token"' in page
    if overrides.get("customer_id") is None:
        assert f'value="{cid}"' in page
    assert orders_of(cid) == 0


# ----------------------------------------------------------------------------- reads


def test_an_order_is_json_or_html_by_accept(client: FlaskClient) -> None:
    cid = customer()
    location = client.post("/orders", json=valid_order(customer_id=cid)).headers["Location"]
    as_json = client.get(location, headers=JSON)
    assert as_json.status_code == 200 and as_json.mimetype == "application/json"
    view = as_json.get_json()
    assert view["order_id"] == location.rsplit("/", 1)[1]
    assert view["status"] == "pending" and view["reason"] is None
    assert view["customer_id"] == cid
    assert view["total_cents"] == 500
    assert view["items"] == [{"sku": "SKU-APPLE", "quantity": 2, "price_cents": 250}]
    saga = view["saga"]
    assert saga["state"] == "running" and saga["stuck"] is False
    assert [s["name"] for s in saga["steps"]][-3:] == [
        "inventory.reserve", "payment.charge", "orders.confirm"]
    assert "tok_visa" not in as_json.get_data(as_text=True)
    for accept in (None, "text/html", "*/*", "text/html,application/json;q=0.9"):
        page = client.get(location, headers={"Accept": accept} if accept else {})
        assert page.status_code == 200 and page.mimetype == "text/html", accept
        assert cid in page.get_data(as_text=True)
        assert "tok_visa" not in page.get_data(as_text=True)


@pytest.mark.parametrize("order_id", [
    str(uuid.uuid4()), "not-a-uuid", "12345", "' OR 1=1--", uuid.uuid4().hex.upper() + "0",
])
def test_an_unknown_or_malformed_order_id_is_404(client: FlaskClient, order_id: str) -> None:
    assert_error(client.get(f"/orders/{order_id}", headers=JSON), 404, "not_found")
    page = client.get(f"/orders/{order_id}")
    assert page.status_code == 404 and page.mimetype == "text/html"


def test_products_is_a_json_list_of_the_catalogue(client: FlaskClient) -> None:
    response = client.get("/products")
    assert response.status_code == 200 and response.mimetype == "application/json"
    products = response.get_json()
    assert isinstance(products, list) and len(products) >= 3
    for p in products:
        assert set(p) == {"sku", "name", "price_cents", "available", "reserved", "sold"}
        assert isinstance(p["sku"], str) and isinstance(p["name"], str)
        for key in ("price_cents", "available", "reserved", "sold"):
            assert isinstance(p[key], int) and p[key] >= 0
    assert "SKU-APPLE" in {p["sku"] for p in products}
    assert any(p["available"] + p["reserved"] + p["sold"] <= 10 for p in products)


def test_the_form_lists_the_products_and_the_test_tokens(client: FlaskClient) -> None:
    response = client.get("/")
    assert response.status_code == 200 and response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    for p in client.get("/products").get_json():
        assert f'name="qty_{p["sku"]}"' in page
        assert p["name"] in page
    assert '<option value="tok_visa">' in page
    assert '<option value="tok_chargeDeclined">' in page
    assert 'name="customer_id"' in page and 'name="card_token"' in page
    assert re.search(r'name="csrf_token" value="[^"]+"', page)


@pytest.mark.parametrize("path", ["/", "/orders/not-a-uuid", "/products", "/no-such-page"])
def test_pages_send_security_headers(client: FlaskClient, path: str) -> None:
    response = client.get(path)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp


def test_the_order_page_sends_security_headers(client: FlaskClient) -> None:
    location = client.post("/orders", json=valid_order(customer_id=customer())).headers["Location"]
    response = client.get(location)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    form_error = client.post("/orders", data={**form_fields(""), "csrf_token": csrf_token(client)})
    assert form_error.status_code == 422
    assert form_error.headers["X-Content-Type-Options"] == "nosniff"
