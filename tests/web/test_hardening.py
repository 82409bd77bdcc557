"""The web findings of the hardening issue (9), each as the probe that found it: the public
order view leaking operator data, admin input that gave a 5xx, redirects to the Host header's
site, the session cookie's flags, duplicate keys, huge numbers; and the generated OpenAPI
description carrying the same limits as validation (issue 10)."""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given
from hypothesis import settings as settings_
from hypothesis import strategies as st
from werkzeug.test import TestResponse

from models.db import transaction
from models.sagas import SagaEvent
from orchestrator.ops.config import settings
from orchestrator.ops.masking import TOKEN_PATTERN
from tests.web.conftest import csrf_token, valid_order
from tests.web.drive import body, command_body, dead_letter, make_stuck, place
from tests.web.test_bad_input import json_values
from web import create_app
from web.schemas import PublicEvent
from web.security import relative

JSON = {"Accept": "application/json"}
NOTE_WITH_TOKEN = "customer read tok_secretcard4242 to me"
PRIVATE_EVENTS = (
    "operator.retry",
    "operator.compensate",
    "operator.bulk",
    "dead_letter.replayed",
    "dead_letter.discarded",
    "step.held",
    "step.released",
)


def assert_error(response: TestResponse, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True))
    assert response.mimetype == "application/json"
    error = body(response)
    assert set(error) == {"error"} and set(error["error"]) == {"code", "message", "details"}
    if code is not None:
        assert error["error"]["code"] == code, error
    return dict(error["error"])


def events_of(saga_id: str) -> int:
    with transaction() as session:
        return int(
            session.scalar(
                sa.select(sa.func.count()).where(SagaEvent.saga_id == uuid.UUID(saga_id))
            )
            or 0
        )


def admin_view(client: FlaskClient, headers: dict[str, str], saga_id: str) -> dict[str, Any]:
    view: dict[str, Any] = body(client.get(f"/admin/sagas/{saga_id}", headers={**headers, **JSON}))
    return view


# ---------------------------------------------------------------- 1. the public order view


def test_the_public_order_json_shows_no_actor_and_no_operator_detail(
    client: FlaskClient, admin_headers: dict[str, str]
) -> None:
    placed = place(client)
    saga_id = placed["saga_id"]
    letter = dead_letter(saga_id, command_body(saga_id, "tok_visa"))
    assert (
        client.post(
            f"/admin/dead-letters/{letter}/discard", json={}, headers=admin_headers
        ).status_code
        == 202
    )
    assert (
        client.post(
            f"/admin/sagas/{saga_id}/compensate",
            json={"note": NOTE_WITH_TOKEN},
            headers=admin_headers,
        ).status_code
        == 202
    )
    public = body(client.get(f"/orders/{placed['order_id']}", headers=JSON))
    timeline = public["saga"]["timeline"]
    assert {"operator.compensate", "dead_letter.discarded"} <= {e["event"] for e in timeline}
    for entry in timeline:
        assert set(entry) == {"at", "event", "step", "attempt", "detail"}, entry
        if entry["event"].startswith(("operator.", "dead_letter.")):
            assert entry["detail"] is None, entry
    assert "secretcard" not in json.dumps(public) and "admin" not in json.dumps(public)
    # The admin view keeps who acted and the note.
    admin = admin_view(client, admin_headers, saga_id)
    acted = next(e for e in admin["timeline"] if e["event"] == "operator.compensate")
    assert acted["actor"] == "admin" and acted["detail"]


@pytest.mark.parametrize("event", PRIVATE_EVENTS)
def test_every_private_event_loses_its_detail_in_public(event: str) -> None:
    entry = {
        "at": "2024-01-01T00:00:00+00:00",
        "event": event,
        "step": "payment.charge",
        "attempt": 1,
        "detail": "operator note",
        "actor": "admin",
    }
    public = PublicEvent.of(entry).model_dump()
    assert public["detail"] is None and "actor" not in public
    kept = PublicEvent.of({**entry, "event": "step.failed"}).model_dump()
    assert kept["detail"] == "operator note"


def test_operator_notes_are_masked_in_admin_json_and_pages(
    client: FlaskClient, admin_headers: dict[str, str]
) -> None:
    saga_id = place(client)["saga_id"]
    assert (
        client.post(
            f"/admin/sagas/{saga_id}/compensate",
            json={"note": NOTE_WITH_TOKEN},
            headers=admin_headers,
        ).status_code
        == 202
    )
    acted = next(
        e
        for e in admin_view(client, admin_headers, saga_id)["timeline"]
        if e["event"] == "operator.compensate"
    )
    assert acted["detail"] == "customer read ••••4242 to me"
    page = client.get(f"/admin/sagas/{saga_id}", headers=admin_headers).get_data(as_text=True)
    assert "secretcard" not in page and "••••4242" in page


# ---------------------------------------------------------------- 2. admin input, never a 5xx


@pytest.mark.parametrize("verb", ["replay", "discard"])
@pytest.mark.parametrize("letter_id", ["99999999999999999999", str(2**63), "0", "-1", "1x"])
def test_dead_letter_ids_out_of_range_are_404(
    client: FlaskClient, admin_headers: dict[str, str], verb: str, letter_id: str
) -> None:
    response = client.post(
        f"/admin/dead-letters/{letter_id}/{verb}", json={}, headers={**admin_headers, **JSON}
    )
    assert_error(response, 404, "not_found")


SURROGATE_NOTE = '{"note": "x\\ud800"}'


@pytest.mark.parametrize("action", ["compensate", "retry"])
def test_a_note_with_a_lone_surrogate_is_422_and_nothing_is_written(
    client: FlaskClient, admin_headers: dict[str, str], action: str
) -> None:
    saga_id = place(client)["saga_id"]
    make_stuck(saga_id)  # so that a retry would apply
    before = events_of(saga_id)
    response = client.post(
        f"/admin/sagas/{saga_id}/{action}",
        data=SURROGATE_NOTE,
        content_type="application/json",
        headers=admin_headers,
    )
    error = assert_error(response, 422, "validation_failed")
    assert [d["field"] for d in error["details"]] == ["note"]
    assert events_of(saga_id) == before
    assert admin_view(client, admin_headers, saga_id)["state"] == "running"


def test_a_bad_note_in_bulk_is_422_not_404_for_an_existing_saga(
    client: FlaskClient, admin_headers: dict[str, str]
) -> None:
    saga_id = place(client)["saga_id"]
    before = events_of(saga_id)
    raw = json.dumps({"action": "compensate", "saga_ids": [saga_id]})[:-1] + ', "note": "x\\ud800"}'
    response = client.post(
        "/admin/sagas/bulk", data=raw, content_type="application/json", headers=admin_headers
    )
    error = assert_error(response, 422, "validation_failed")
    assert [d["field"] for d in error["details"]] == ["note"]
    assert events_of(saga_id) == before
    # The same bulk with a good note acts, and says so.
    good = client.post(
        "/admin/sagas/bulk",
        headers=admin_headers,
        json={"action": "compensate", "saga_ids": [saga_id], "note": "ok"},
    )
    assert body(good) == {"results": [{"saga_id": saga_id, "status": 202}]}


@pytest.mark.parametrize(
    "note",
    [
        "a\x00b",
        "line\nbreak",
        "tab\there",
        "esc\x1b[2J",
        "\x85",
        "x" * 501,
        42,
        ["x"],
        {"x": 1},
        True,
    ],
)
def test_bad_notes_are_422(client: FlaskClient, admin_headers: dict[str, str], note: Any) -> None:
    saga_id = place(client)["saga_id"]
    response = client.post(
        f"/admin/sagas/{saga_id}/compensate", json={"note": note}, headers=admin_headers
    )
    assert [d["field"] for d in assert_error(response, 422)["details"]] == ["note"]
    assert admin_view(client, admin_headers, saga_id)["state"] == "running"


HUGE = 10**40
HOSTILE_VALUES: list[Any] = [
    HUGE,
    -1,
    -HUGE,
    0,
    1.5,
    True,
    None,
    "",
    "x\ud800",
    "\x00",
    "a\x1b[2J",
    "\u202e",
    [],
    {},
    [1],
    {"a": 1},
    "not-a-uuid",
    "9" * 400,
]
HOSTILE_IDS = [
    "99999999999999999999",
    "-1",
    "0",
    "not-a-uuid",
    "%00",
    "%ED%A0%80",
    "%0A",
    "x" * 300,
    "%E2%80%AE",
    "1e3",
]


def _admin_posts(saga_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Each admin POST route with a valid body (which the probes then break); the actions aim
    at a saga and a letter that do not exist, the bulk at a running saga (which a retry does not
    apply to), so that no probe can change anything."""
    nobody = uuid.uuid4()
    return [
        (f"/admin/sagas/{nobody}/retry", {"note": "n"}),
        (f"/admin/sagas/{nobody}/compensate", {"note": "n"}),
        ("/admin/sagas/bulk", {"action": "retry", "saga_ids": [saga_id], "note": "n"}),
        (f"/admin/dead-letters/{2**62}/replay", {}),
        (f"/admin/dead-letters/{2**62}/discard", {}),
    ]


def test_every_admin_route_survives_hostile_input(
    app: Flask, client: FlaskClient, admin_headers: dict[str, str]
) -> None:
    """About 280 hostile requests: never a 5xx, always the contract's error shape, and a
    running saga untouched."""
    quiet_saga = place(client)["saga_id"]
    events_before = events_of(quiet_saga)
    h = {**admin_headers, **JSON}
    seen: dict[int, int] = {}

    def probe(response: TestResponse, allowed: set[int]) -> None:
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code in allowed, (
            response.status_code,
            response.get_data(as_text=True)[:300],
        )
        if response.status_code >= 400:
            assert_error(response, response.status_code)

    for path, good in _admin_posts(quiet_saga):
        for key in list(good) or ["note"]:
            for value in HOSTILE_VALUES:
                raw = (
                    json.dumps({**good, key: value})
                    if value != "x\ud800"
                    else json.dumps({**good, key: "x"}).replace('"x"', '"x\\ud800"')
                )
                # 200/404/409: a value that happens to be valid reaches the (refused) action.
                probe(
                    client.post(path, data=raw, content_type="application/json", headers=h),
                    {200, 404, 409, 422},
                )
        for extra in ({"unknown": 1}, {"": None}, {"note\x00": "x"}):
            probe(client.post(path, json={**good, **extra}, headers=h), {422})
        for raw in (
            "",
            "{",
            "[]",
            "null",
            "1",
            '"x"',
            '{"note": "a", "note": "b"}',
            "{" * 600 + "}" * 600,
            "[" * 30000 + "]" * 30000,
        ):
            probe(client.post(path, data=raw, content_type="application/json", headers=h), {400})
        probe(
            client.post(
                path,
                data='{"note": 1' + "0" * 5000 + "}",
                content_type="application/json",
                headers=h,
            ),
            {422},
        )
        probe(client.post(path, data="note=x", content_type="text/plain", headers=h), {415})
        probe(client.post(path, data={"note": "x"}, headers=h), {400})  # a form without token
    for ident in HOSTILE_IDS:
        for verb in ("retry", "compensate"):
            probe(client.post(f"/admin/sagas/{ident}/{verb}", json={}, headers=h), {404})
        for verb in ("replay", "discard"):
            probe(client.post(f"/admin/dead-letters/{ident}/{verb}", json={}, headers=h), {404})
        probe(client.get(f"/admin/sagas/{ident}", headers=h), {404})
    for name in ("state", "cursor"):
        for value in (
            "%00",
            "%ED%A0%80",
            "x" * 3000,
            "stuck%0A",
            "-1",
            "99999999999999999999",
            "%E2%80%AE",
        ):
            probe(client.get(f"/admin/sagas?{name}={value}", headers=h), {400})
    for value in ("%00", "%ED%A0%80", "x" * 3000, "-1", "99999999999999999999", "%E2%80%AE"):
        probe(client.get(f"/admin/sagas?q={value}", headers=h), {200})
        probe(client.get(f"/admin/sagas?q={value}&unknown=1&state=", headers=h), {200})
    assert admin_view(client, admin_headers, quiet_saga)["state"] == "running"
    assert events_of(quiet_saga) == events_before
    assert sum(seen.values()) > 250 and max(seen) < 500, seen


def test_bulk_item_statuses_say_what_happened(
    client: FlaskClient, admin_headers: dict[str, str]
) -> None:
    running, stuck = place(client)["saga_id"], place(client)["saga_id"]
    make_stuck(stuck)
    ids = [running, stuck, str(uuid.uuid4()), "junk", "x\ud800", running.upper()]
    raw = json.dumps({"action": "retry", "saga_ids": ids})
    response = client.post(
        "/admin/sagas/bulk", data=raw, content_type="application/json", headers=admin_headers
    )
    statuses = [r["status"] for r in body(response)["results"]]
    # running: not stuck (409); stuck: resumed; unknown, junk and a surrogate: no such saga;
    # the same id in capitals is the same saga, now no longer stuck (409).
    assert statuses == [409, 202, 404, 404, 404, 409]


# ---------------------------------------------------------------- 4. redirects and Host


def get_raw(client: FlaskClient, path: str, headers: dict[str, str]) -> TestResponse:
    """GET ``path`` as a server receives it (the test client would read "//x" as a host)."""
    return client.get("/", headers=headers, environ_overrides={"PATH_INFO": path})


@pytest.mark.parametrize(
    "path",
    [
        "//static/app.css",
        "/admin//sagas",
        "/admin",
        "//evil.example/admin",
        "/admin/",
        "///admin//sagas",
        "/\\evil.example/admin",
    ],
)
def test_redirects_stay_relative_whatever_the_host_header(
    client: FlaskClient, admin_headers: dict[str, str], path: str
) -> None:
    response = get_raw(client, path, {**admin_headers, "Host": "evil.example"})
    assert response.status_code < 500
    if response.status_code in (301, 302, 303, 307, 308):
        location = urlsplit(response.headers["Location"])
        assert not location.scheme and not location.netloc, response.headers["Location"]
        assert not response.headers["Location"].startswith(("//", "/\\"))


@pytest.mark.parametrize(
    ("path", "target"), [("/static//app.css", "/static/app.css"), ("/admin//sagas", "/admin/sagas")]
)
def test_double_slash_paths_redirect_to_this_site(
    client: FlaskClient, admin_headers: dict[str, str], path: str, target: str
) -> None:
    response = get_raw(client, path, {**admin_headers, "Host": "evil.example"})
    assert response.status_code == 308
    assert response.headers["Location"] == target


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("http://evil.example/admin/sagas?state=failed", "/admin/sagas?state=failed"),
        ("https://evil.example//evil.example/x", "/evil.example/x"),
        ("//evil.example/x", "/x"),
        ("/\\evil.example/x", "/evil.example/x"),
        ("/orders/1#top", "/orders/1#top"),
        ("http://evil.example", "/"),
    ],
)
def test_relative_keeps_path_query_and_fragment_only(location: str, expected: str) -> None:
    assert relative(location) == expected


def test_form_redirects_are_relative(client: FlaskClient) -> None:
    host = {"Host": "evil.example"}
    fields = {
        "customer_id": "c-1",
        "qty_SKU-APPLE": "1",
        "card_token": "tok_visa",
        "csrf_token": csrf_token(client, "/", headers=host),
    }
    response = client.post("/orders", data=fields, headers=host)
    assert response.status_code == 303 and response.headers["Location"].startswith("/orders/")


def test_trusted_hosts_refuse_another_host(
    web_sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGA_TRUSTED_HOSTS", "shop.example, localhost")
    settings.cache_clear()
    try:
        app = create_app({"TESTING": True})
    finally:
        settings.cache_clear()
    client = app.test_client()
    assert client.get("/healthz", headers={"Host": "shop.example"}).status_code in (200, 503)
    refused = get_raw(client, "//static/app.css", {"Host": "evil.example", **JSON})
    assert_error(refused, 400)
    assert "Location" not in refused.headers


# ---------------------------------------------------------------- 6. cookies, JSON corners


def _session_cookie(app: Flask) -> str:
    client = app.test_client()
    response = client.get("/")
    cookie = next(
        v for k, v in response.headers.items() if k == "Set-Cookie" and v.startswith("session=")
    )
    return cookie


def test_the_session_cookie_is_samesite_lax(app: Flask) -> None:
    cookie = _session_cookie(app)
    assert "SameSite=Lax" in cookie and "HttpOnly" in cookie
    assert "Secure" not in cookie  # development: plain http on loopback


def test_the_session_cookie_is_secure_in_production(
    web_sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGA_ENV", "production")
    monkeypatch.setenv("SECRET_KEY", "k" * 32)
    monkeypatch.setenv("SAGA_ADMIN_USER", "ops")
    monkeypatch.setenv("SAGA_ADMIN_PASSWORD", "p" * 16)
    settings.cache_clear()
    try:
        app = create_app({"TESTING": True})
    finally:
        settings.cache_clear()
    cookie = _session_cookie(app)
    assert "Secure" in cookie and "SameSite=Lax" in cookie


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ('{"customer_id": "a", "customer_id": "b", "items": [], "payment": {}}', "customer_id"),
        (
            '{"customer_id": "c", "items": [{"sku": "SKU-APPLE", "quantity": 1, "quantity": 2}], '
            '"payment": {"card_token": "tok_visa"}}',
            "quantity",
        ),
        (
            '{"customer_id": "c", "items": [{"sku": "SKU-APPLE", "quantity": 1}], '
            '"payment": {"card_token": "tok_visa", "card_token": "tok_chargeDeclined"}}',
            "card_token",
        ),
        ('{"x": {"\\ud800\\n": 1, "\\ud800\\n": 2}}', "\ud800\n"),
    ],
)
def test_duplicate_keys_anywhere_are_400_naming_the_key(
    client: FlaskClient, raw: str, key: str
) -> None:
    response = client.post("/orders", data=raw, content_type="application/json")
    error = assert_error(response, 400, "duplicate_key")
    assert error["details"] == {"key": key} and repr(key) in error["message"]


def test_duplicate_keys_in_an_admin_body_are_400(
    client: FlaskClient, admin_headers: dict[str, str]
) -> None:
    saga_id = place(client)["saga_id"]
    response = client.post(
        f"/admin/sagas/{saga_id}/compensate",
        data='{"note": "a", "note": "b"}',
        content_type="application/json",
        headers=admin_headers,
    )
    assert assert_error(response, 400, "duplicate_key")["details"] == {"key": "note"}
    assert admin_view(client, admin_headers, saga_id)["state"] == "running"


def test_a_5000_digit_quantity_is_422_naming_the_field(client: FlaskClient) -> None:
    raw = json.dumps(valid_order()).replace('"quantity": 2', '"quantity": ' + "9" * 5000)
    error = assert_error(
        client.post("/orders", data=raw, content_type="application/json"), 422, "validation_failed"
    )
    assert [d["field"] for d in error["details"]] == ["items[0].quantity"]


def test_a_5000_digit_number_as_the_body_is_valid_json_but_no_object(client: FlaskClient) -> None:
    response = client.post("/orders", data="1" * 5000, content_type="application/json")
    error = assert_error(response, 422, "validation_failed")
    assert [d["field"] for d in error["details"]] == ["body"]


# ---------------------------------------------------------------- the contract from one source


def test_the_description_carries_the_validation_limits(client: FlaskClient) -> None:
    spec = body(client.get("/openapi.json"))
    schemas = spec["components"]["schemas"]
    sku = schemas["ItemIn"]["properties"]["sku"]
    assert (sku["minLength"], sku["maxLength"]) == (1, 64)
    assert schemas["PaymentIn"]["properties"]["card_token"]["pattern"] == f"^{TOKEN_PATTERN}$"
    customer = schemas["OrderIn"]["properties"]["customer_id"]
    assert (customer["minLength"], customer["maxLength"]) == (1, 64)
    for model in ("ActionIn", "BulkIn"):
        note = schemas[model]["properties"]["note"]["anyOf"][0]
        assert note["maxLength"] == 500
    bulk_ids = schemas["BulkIn"]["properties"]["saga_ids"]
    assert (bulk_ids["minItems"], bulk_ids["maxItems"]) == (1, 200)
    assert "actor" not in schemas["PublicEvent"]["properties"]
    assert "actor" in schemas["AdminEvent"]["properties"]
    # The limits are the validation's: one past each is refused.
    too_long = valid_order(items=[{"sku": "S" * 65, "quantity": 1}])
    assert client.post("/orders", json=too_long).status_code == 422


ADMIN_POSTS = [
    "/admin/sagas/{saga}/retry",
    "/admin/sagas/{saga}/compensate",
    "/admin/sagas/bulk",
    "/admin/dead-letters/{letter}/replay",
    "/admin/dead-letters/{letter}/discard",
]


@settings_(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=json_values, route=st.sampled_from(ADMIN_POSTS))
def test_any_json_body_on_any_admin_post_is_a_clean_refusal(
    client: FlaskClient, admin_headers: dict[str, str], value: Any, route: str
) -> None:
    """Any JSON value (surrogates and control characters included) as the body of any admin
    post, aimed at a saga and a letter that do not exist: a 4xx in the contract's shape."""
    path = route.format(saga=uuid.uuid4(), letter=2**62)
    raw = json.dumps(value)
    response = client.post(
        path, data=raw, content_type="application/json", headers={**admin_headers, **JSON}
    )
    if route.endswith("bulk") and response.status_code == 200:
        assert all(r["status"] == 404 for r in body(response)["results"])
    else:
        assert_error(response, response.status_code)
        assert response.status_code in {400, 404, 422}
