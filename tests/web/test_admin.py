"""The admin console against the contract: auth, CSRF, lists, one saga, actions, dead letters."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from kombu import Connection

from models.db import transaction
from orchestrator.messaging.envelopes import ReplyOutcome
from orchestrator.messaging.topology import declare_all
from orchestrator.ops.config import settings
from tests.web.conftest import csrf_token
from tests.web.drive import (
    answer,
    basic,
    body,
    code,
    command_body,
    complete,
    dead_letter,
    make_stuck,
    place,
)
from web.presenters import attempt_bars, attempt_chart

JSON = {"Accept": "application/json"}
HOSTILE = '<script>alert("x")</script>\'{{7*7}}'


def _admin_rules(app: Flask) -> list[tuple[str, str]]:
    """Every admin route of the app as (method, a concrete path)."""
    found = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/admin"):
            continue
        path = rule.rule.replace("<saga_id>", str(uuid.uuid4())).replace("<int:letter_id>", "1")
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            found.append((method, path))
    return found


def _saga(client: FlaskClient, headers: dict, saga_id: str) -> dict[str, Any]:
    view: dict[str, Any] = body(client.get(f"/admin/sagas/{saga_id}", headers={**headers, **JSON}))
    return view


# ---------------------------------------------------------------- authentication


@pytest.mark.parametrize("who", ["nobody", "wrong password", "unknown user", "not basic"])
def test_every_admin_route_answers_401_with_a_basic_challenge(
    app: Flask, client: FlaskClient, who: str
) -> None:
    user, password = app.config["ADMIN_USER"], app.config["ADMIN_PASSWORD"]
    headers = {
        "nobody": {},
        "wrong password": basic(user, password + "x"),
        "unknown user": basic("mallory", password),
        "not basic": {"Authorization": f"Bearer {password}"},
    }[who]
    rules = _admin_rules(app)
    assert len(rules) >= 10  # the contract's routes, GET and POST
    for method, path in rules:
        response = client.open(path, method=method, headers=headers, json={})
        assert response.status_code == 401, (method, path)
        assert response.headers["WWW-Authenticate"].startswith("Basic "), (method, path)


def test_401_is_the_same_for_an_unknown_user_and_a_wrong_password(
    app: Flask, client: FlaskClient
) -> None:
    password = app.config["ADMIN_PASSWORD"]
    wrong = client.get("/admin/sagas", headers={**JSON, **basic(app.config["ADMIN_USER"], "no")})
    unknown = client.get("/admin/sagas", headers={**JSON, **basic("mallory", password)})
    assert (wrong.status_code, body(wrong)) == (unknown.status_code, body(unknown))
    assert code(wrong) == "unauthorized"


def test_admin_redirects_to_the_saga_list(client: FlaskClient, admin_headers: dict) -> None:
    response = client.get("/admin", headers=admin_headers)
    assert response.status_code in (301, 302, 308)
    assert response.headers["Location"].endswith("/admin/sagas")


def test_pages_send_nosniff_and_a_restrictive_csp(client: FlaskClient, admin_headers: dict) -> None:
    response = client.get("/admin/sagas", headers=admin_headers)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp


# ---------------------------------------------------------------- CSRF


def test_form_actions_without_a_valid_csrf_token_are_400(
    client: FlaskClient, admin_headers: dict
) -> None:
    saga_id = place(client)["saga_id"]
    letter = dead_letter(saga_id, command_body(saga_id, "tok_visa"))
    forms = [
        (f"/admin/sagas/{saga_id}/retry", {"note": "x"}),
        (f"/admin/sagas/{saga_id}/compensate", {"note": "x"}),
        ("/admin/sagas/bulk", {"action": "compensate", "saga_ids": saga_id}),
        (f"/admin/dead-letters/{letter}/replay", {}),
        (f"/admin/dead-letters/{letter}/discard", {}),
    ]
    for path, data in forms:
        for token in (None, "forged-token"):
            fields = {**data, **({"csrf_token": token} if token else {})}
            response = client.post(path, data=fields, headers=admin_headers)
            assert response.status_code == 400, (path, token)
    # Nothing happened: the saga still runs and the letter is still dead.
    view = _saga(client, admin_headers, saga_id)
    assert view["state"] == "running"
    assert _letter(client, admin_headers, letter)["state"] == "dead"


def test_a_json_post_needs_no_csrf_token(client: FlaskClient, admin_headers: dict) -> None:
    saga_id = place(client)["saga_id"]
    response = client.post(
        f"/admin/sagas/{saga_id}/compensate", json={"note": "by script"}, headers=admin_headers
    )
    assert response.status_code == 202
    assert response.json == {"saga_id": saga_id, "state": "compensating"}


def test_a_form_post_with_its_token_acts_and_redirects_to_the_saga(
    client: FlaskClient, admin_headers: dict
) -> None:
    saga_id = place(client)["saga_id"]
    token = csrf_token(client, f"/admin/sagas/{saga_id}", admin_headers)
    response = client.post(
        f"/admin/sagas/{saga_id}/compensate",
        data={"csrf_token": token, "note": "from the page"},
        headers=admin_headers,
    )
    assert response.status_code == 303
    assert response.headers["Location"].endswith(f"/admin/sagas/{saga_id}")
    view = _saga(client, admin_headers, saga_id)
    assert view["state"] == "compensating"
    action = [e for e in view["timeline"] if e["event"] == "operator.compensate"]
    assert action and action[0]["actor"] == "admin" and action[0]["detail"] == "from the page"


def test_other_content_types_are_415(client: FlaskClient, admin_headers: dict) -> None:
    saga_id = place(client)["saga_id"]
    response = client.post(
        f"/admin/sagas/{saga_id}/compensate",
        data="note=x",
        content_type="text/plain",
        headers=admin_headers,
    )
    assert response.status_code == 415


# ---------------------------------------------------------------- the list


def _list(client: FlaskClient, headers: dict, **params: str) -> dict:
    response = client.get("/admin/sagas", query_string=params, headers={**headers, **JSON})
    assert response.status_code == 200, response.get_data(as_text=True)
    listed: dict[str, Any] = body(response)
    return listed


def test_the_json_list_has_the_contracts_shape(client: FlaskClient, admin_headers: dict) -> None:
    placed = place(client)
    page_ = _list(client, admin_headers, q=placed["saga_id"])
    assert set(page_) == {"sagas", "counts", "next"}
    assert set(page_["counts"]) == {
        "running",
        "compensating",
        "completed",
        "compensated",
        "failed",
        "stuck",
    }
    [item] = page_["sagas"]
    assert set(item) >= {
        "saga_id",
        "order_id",
        "state",
        "stuck",
        "current_step",
        "reason",
        "created_at",
        "updated_at",
    }
    assert (
        item["saga_id"],
        item["order_id"],
        item["state"],
        item["stuck"],
        item["current_step"],
        item["reason"],
    ) == (placed["saga_id"], placed["order_id"], "running", False, "inventory.reserve", None)


def test_counts_follow_the_sagas_states(client: FlaskClient, admin_headers: dict) -> None:
    before = _list(client, admin_headers)["counts"]
    done, aborted, parked, stuck = (place(client)["saga_id"] for _ in range(4))
    complete(done)
    client.post(f"/admin/sagas/{aborted}/compensate", json={}, headers=admin_headers)
    client.post(f"/admin/sagas/{parked}/compensate", json={}, headers=admin_headers)
    assert answer(parked, ReplyOutcome.FAILED, "refund refused") == "failed"
    make_stuck(stuck)
    after = _list(client, admin_headers)["counts"]
    delta = {k: after[k] - before[k] for k in after}
    # 4 new sagas: 1 completed, 1 compensating, 1 failed, 1 running (and stuck). Older sagas of
    # this session may also have become stuck meanwhile (their 4 s deadline passed).
    assert {k: v for k, v in delta.items() if k != "stuck"} == {
        "running": 1,
        "compensating": 1,
        "completed": 1,
        "compensated": 0,
        "failed": 1,
    }
    assert delta["stuck"] >= 1
    page = client.get("/admin/sagas", headers=admin_headers).get_data(as_text=True)
    for state, n in after.items():
        assert re.search(rf'data-state="{state}"[^>]*>.*?<b[^>]*>{n}</b>', page, re.S), state


def test_filters_by_state_and_rejects_an_unknown_state(
    client: FlaskClient, admin_headers: dict
) -> None:
    running, done = place(client)["saga_id"], place(client)["saga_id"]
    complete(done)
    completed = {s["saga_id"] for s in _list(client, admin_headers, state="completed")["sagas"]}
    assert done in completed and running not in completed
    assert all(
        s["state"] == "completed" for s in _list(client, admin_headers, state="completed")["sagas"]
    )
    for bad in ("bogus", "RUNNING", "stuck;drop"):
        response = client.get(
            "/admin/sagas", query_string={"state": bad}, headers={**admin_headers, **JSON}
        )
        assert response.status_code == 400
        assert code(response) == "invalid_state"
    html = client.get("/admin/sagas?state=bogus", headers=admin_headers)
    assert html.status_code == 400


def test_stuck_lists_only_sagas_past_their_deadline(
    client: FlaskClient, admin_headers: dict
) -> None:
    fresh, late = place(client)["saga_id"], place(client)["saga_id"]
    make_stuck(late)
    stuck = {s["saga_id"]: s for s in _list(client, admin_headers, state="stuck")["sagas"]}
    assert late in stuck and stuck[late]["stuck"] is True and stuck[late]["state"] == "running"
    assert fresh not in stuck
    page = client.get("/admin/sagas?state=stuck", headers=admin_headers).get_data(as_text=True)
    assert late in page


def test_search_finds_a_saga_by_its_order_or_saga_id(
    client: FlaskClient, admin_headers: dict
) -> None:
    placed = place(client)
    for q in (placed["saga_id"], placed["order_id"], f"  {placed['order_id'].upper()} "):
        assert [s["saga_id"] for s in _list(client, admin_headers, q=q)["sagas"]] == [
            placed["saga_id"]
        ]
    assert _list(client, admin_headers, q=str(uuid.uuid4()))["sagas"] == []
    assert _list(client, admin_headers, q="not-an-id")["sagas"] == []
    assert _list(client, admin_headers, q=placed["saga_id"], state="completed")["sagas"] == []
    page = client.get(
        "/admin/sagas", query_string={"q": placed["order_id"]}, headers=admin_headers
    ).get_data(as_text=True)
    assert page.count('data-saga-id="') == 1 and placed["saga_id"] in page


def test_pages_through_every_saga_newest_first_fifty_a_page(
    client: FlaskClient, admin_headers: dict
) -> None:
    mine = [place(client, customer_id=f"pager-{i}")["saga_id"] for i in range(55)]
    seen: list[dict] = []
    cursor: str | None = None
    pages = 0
    while True:
        page_ = _list(client, admin_headers, **({"cursor": cursor} if cursor else {}))
        pages += 1
        assert len(page_["sagas"]) <= 50
        seen += page_["sagas"]
        cursor = page_["next"]
        if cursor is None:
            break
        assert len(page_["sagas"]) == 50
    ids = [s["saga_id"] for s in seen]
    assert len(ids) == len(set(ids))  # no saga twice across pages
    assert pages >= 2
    assert set(mine) <= set(ids)
    assert ids.index(mine[-1]) < ids.index(mine[0])  # newest first
    stamps = [datetime.fromisoformat(s["created_at"]) for s in seen]
    assert stamps == sorted(stamps, reverse=True)
    # The HTML page links to the next page with the same cursor.
    page = client.get("/admin/sagas", headers=admin_headers).get_data(as_text=True)
    first = _list(client, admin_headers)
    assert f"cursor={first['next']}" in page and 'rel="next"' in page
    # A filtered list pages too.
    running = _list(client, admin_headers, state="running")
    assert running["next"] is not None
    second = _list(client, admin_headers, state="running", cursor=running["next"])
    assert not {s["saga_id"] for s in running["sagas"]} & {s["saga_id"] for s in second["sagas"]}
    assert all(s["state"] == "running" for s in second["sagas"])


def test_a_cursor_that_is_not_ours_is_400(client: FlaskClient, admin_headers: dict) -> None:
    for bad in ("garbage", "W10", "eyJhIjogMX0"):
        response = client.get(
            "/admin/sagas", query_string={"cursor": bad}, headers={**admin_headers, **JSON}
        )
        assert response.status_code == 400, bad


# ---------------------------------------------------------------- one saga


def test_the_saga_page_shows_steps_timeline_and_chart(
    client: FlaskClient, admin_headers: dict
) -> None:
    saga_id = place(client)["saga_id"]
    answer(saga_id, ReplyOutcome.RETRYING, "stock service busy")
    answer(saga_id, ReplyOutcome.SUCCEEDED)
    answer(saga_id, ReplyOutcome.FAILED, "card declined")
    view = _saga(client, admin_headers, saga_id)
    assert view["state"] == "compensating" and view["reason"] == "payment_declined"
    steps = {s["name"]: s for s in view["steps"]}
    assert steps["inventory.reserve"]["attempts"] == 2
    assert steps["payment.charge"]["error"] == "card declined"
    page = client.get(f"/admin/sagas/{saga_id}", headers=admin_headers)
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    for text in (
        "inventory.reserve",
        "payment.charge",
        "orders.confirm",
        "inventory.release",
        "stock service busy",
        "card declined",
        "step.retried",
        "payment_declined",
        'id="retry-button"',
        'id="compensate-button"',
        "<svg",
    ):
        assert text in html, text
    # The chart draws one bar per attempt: reserve twice, charge once, release once.
    assert html.count('class="bar ') == 4


def test_an_unknown_saga_is_404(client: FlaskClient, admin_headers: dict) -> None:
    for path in (f"/admin/sagas/{uuid.uuid4()}", "/admin/sagas/not-a-uuid"):
        assert client.get(path, headers=admin_headers).status_code == 404
        assert code(client.get(path, headers={**admin_headers, **JSON})) == "not_found"


def test_hostile_customer_text_is_escaped_everywhere(
    client: FlaskClient, admin_headers: dict
) -> None:
    placed = place(client, customer_id=HOSTILE)
    note = '<img src=x onerror="alert(1)">'
    client.post(
        f"/admin/sagas/{placed['saga_id']}/compensate", json={"note": note}, headers=admin_headers
    )
    pages = [
        client.get(f"/admin/sagas/{placed['saga_id']}", headers=admin_headers),
        client.get("/admin/sagas", query_string={"q": placed["saga_id"]}, headers=admin_headers),
    ]
    for page in pages:
        html = page.get_data(as_text=True)
        assert page.status_code == 200
        assert "<script>alert" not in html and "<img src=x" not in html
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&#39;{{7*7}}" in html
        assert "{{7*7}}" in html  # shown as text, never evaluated
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in pages[0].get_data(as_text=True)


# ---------------------------------------------------------------- actions


def _act(client: FlaskClient, headers: dict, saga_id: str, action: str, **fields: str) -> int:
    return client.post(f"/admin/sagas/{saga_id}/{action}", json=fields, headers=headers).status_code


def test_retry_and_compensate_apply_only_where_the_contract_says(
    client: FlaskClient, admin_headers: dict
) -> None:
    saga_id = place(client)["saga_id"]
    assert _act(client, admin_headers, saga_id, "retry") == 409  # running, not stuck
    assert _act(client, admin_headers, saga_id, "compensate", note="abort") == 202
    view = _saga(client, admin_headers, saga_id)
    assert (view["state"], view["reason"]) == ("compensating", "operator")
    assert _act(client, admin_headers, saga_id, "compensate") == 409
    response = client.post(f"/admin/sagas/{saga_id}/retry", json={}, headers=admin_headers)
    assert response.status_code == 409
    assert code(response) == "not_applicable"
    for action in ("retry", "compensate"):
        assert _act(client, admin_headers, str(uuid.uuid4()), action) == 404
        assert _act(client, admin_headers, "not-a-uuid", action) == 404


def test_a_parked_saga_is_retried_with_a_fresh_budget(
    client: FlaskClient, admin_headers: dict
) -> None:
    saga_id = place(client)["saga_id"]
    assert _act(client, admin_headers, saga_id, "compensate") == 202
    assert answer(saga_id, ReplyOutcome.FAILED, "release refused") == "failed"
    failed = {s["saga_id"] for s in _list(client, admin_headers, state="failed")["sagas"]}
    assert saga_id in failed
    assert _act(client, admin_headers, saga_id, "compensate") == 409  # failed: retry only
    response = client.post(
        f"/admin/sagas/{saga_id}/retry", json={"note": "try again"}, headers=admin_headers
    )
    assert response.status_code == 202
    assert response.json == {"saga_id": saga_id, "state": "compensating"}
    assert _act(client, admin_headers, saga_id, "retry") == 409  # compensating, not stuck
    view = _saga(client, admin_headers, saga_id)
    release = next(s for s in view["steps"] if s["name"] == "inventory.reserve")["compensation"]
    assert (release["status"], release["attempts"]) == ("running", 2)
    retry = [e for e in view["timeline"] if e["event"] == "operator.retry"]
    assert retry and (retry[0]["actor"], retry[0]["detail"]) == ("admin", "try again")


def test_a_stuck_saga_can_be_retried_and_a_completed_one_cannot(
    client: FlaskClient, admin_headers: dict
) -> None:
    stuck, done = place(client)["saga_id"], place(client)["saga_id"]
    make_stuck(stuck)
    assert _act(client, admin_headers, stuck, "retry") == 202
    view = _saga(client, admin_headers, stuck)
    assert view["stuck"] is False  # re-sent with a fresh deadline
    assert view["steps"][1]["attempts"] == 2
    complete(done)
    assert _act(client, admin_headers, done, "retry") == 409
    assert _act(client, admin_headers, done, "compensate") == 409


def test_a_note_that_is_too_long_is_422(client: FlaskClient, admin_headers: dict) -> None:
    saga_id = place(client)["saga_id"]
    assert _act(client, admin_headers, saga_id, "compensate", note="x" * 501) == 422
    response = client.post(
        f"/admin/sagas/{saga_id}/compensate", json=["not", "an", "object"], headers=admin_headers
    )
    assert response.status_code == 400


def test_bulk_answers_per_saga(client: FlaskClient, admin_headers: dict) -> None:
    running, done = place(client)["saga_id"], place(client)["saga_id"]
    complete(done)
    unknown = str(uuid.uuid4())
    response = client.post(
        "/admin/sagas/bulk",
        headers=admin_headers,
        json={"action": "compensate", "saga_ids": [running, done, unknown, "junk"], "note": "bulk"},
    )
    assert response.status_code == 200
    assert response.json == {
        "results": [
            {"saga_id": running, "status": 202},
            {"saga_id": done, "status": 409},
            {"saga_id": unknown, "status": 404},
            {"saga_id": "junk", "status": 404},
        ]
    }
    again = client.post(
        "/admin/sagas/bulk",
        headers=admin_headers,
        json={"action": "compensate", "saga_ids": [running]},
    )
    assert again.json == {"results": [{"saga_id": running, "status": 409}]}
    for bad in (
        {"action": "explode", "saga_ids": [running]},
        {"action": "retry", "saga_ids": []},
        {"action": "retry", "saga_ids": [1, 2]},
        {"action": "retry"},
    ):
        assert client.post("/admin/sagas/bulk", json=bad, headers=admin_headers).status_code == 422


def test_bulk_from_the_list_page_form(client: FlaskClient, admin_headers: dict) -> None:
    a, b = place(client)["saga_id"], place(client)["saga_id"]
    token = csrf_token(client, "/admin/sagas", admin_headers)
    response = client.post(
        "/admin/sagas/bulk",
        headers=admin_headers,
        data={
            "csrf_token": token,
            "action": "compensate",
            "saga_ids": [a, b],
            "note": "form bulk",
            "return_state": "running",
        },
    )
    assert response.status_code == 303
    assert "/admin/sagas" in response.headers["Location"]
    for saga_id in (a, b):
        view = _saga(client, admin_headers, saga_id)
        assert view["state"] == "compensating"


# ---------------------------------------------------------------- dead letters


def _letters(client: FlaskClient, headers: dict) -> list[dict]:
    response = client.get("/admin/dead-letters", headers={**headers, **JSON})
    assert response.status_code == 200
    letters: list[dict[str, Any]] = body(response)["dead_letters"]
    return letters


def _letter(client: FlaskClient, headers: dict, letter_id: int) -> dict:
    return next(d for d in _letters(client, headers) if d["id"] == letter_id)


def test_dead_letters_are_listed_newest_first_with_their_saga(
    client: FlaskClient, admin_headers: dict
) -> None:
    saga_id = place(client)["saga_id"]
    first = dead_letter(saga_id, command_body(saga_id, "tok_visa"))
    orphan = dead_letter(None, b"\x00\xffnot json at all", step=None, queue="orders")
    letters = _letters(client, admin_headers)
    ids = [d["id"] for d in letters]
    assert ids.index(orphan) < ids.index(first)
    mine = _letter(client, admin_headers, first)
    assert set(mine) >= {"id", "saga_id", "step", "queue", "reason", "at", "state"}
    assert (mine["saga_id"], mine["step"], mine["queue"], mine["state"]) == (
        saga_id,
        "payment.charge",
        "payment",
        "dead",
    )
    assert _letter(client, admin_headers, orphan)["saga_id"] is None
    page = client.get("/admin/dead-letters", headers=admin_headers).get_data(as_text=True)
    assert f'href="/admin/sagas/{saga_id}"' in page and "orphan" in page
    saga_page = client.get(f"/admin/sagas/{saga_id}", headers=admin_headers).get_data(as_text=True)
    assert f"#{first}" in saga_page


def test_dead_letter_bodies_are_escaped_and_card_tokens_masked(
    client: FlaskClient, admin_headers: dict
) -> None:
    saga_id = place(client)["saga_id"]
    token = "tok_Sup3rSecretToken_9876"
    letter = dead_letter(saga_id, command_body(saga_id, token, extra="</pre><script>x()</script>"))
    for response in (
        client.get("/admin/dead-letters", headers=admin_headers),
        client.get("/admin/dead-letters", headers={**admin_headers, **JSON}),
        client.get(f"/admin/sagas/{saga_id}", headers=admin_headers),
        client.get(f"/admin/sagas/{saga_id}", headers={**admin_headers, **JSON}),
    ):
        text = response.get_data(as_text=True)
        assert token not in text and "Sup3rSecret" not in text
        if response.mimetype == "text/html":
            assert "<script>x()" not in text
    page = client.get("/admin/dead-letters", headers=admin_headers).get_data(as_text=True)
    assert "••••9876" in page
    assert "&lt;/pre&gt;&lt;script&gt;x()&lt;/script&gt;" in page
    assert f'data-letter-id="{letter}"' in page


def drain(queue: str) -> list[bytes]:
    """Every message body waiting on ``queue`` of the tier's own vhost (no worker consumes
    there), taken off it."""
    with Connection(settings().broker_url) as conn:
        channel = conn.channel()
        declare_all(channel)  # a replay declares them too; before the first one, it may not
        bodies = []
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            body = message.body  # py-amqp decodes it when the message names its encoding
            bodies.append(body.encode() if isinstance(body, str) else bytes(body))
        return bodies


def test_replay_publishes_once_and_discard_resolves(
    client: FlaskClient, admin_headers: dict
) -> None:
    saga_id = place(client)["saga_id"]
    replayed_body = command_body(saga_id, "tok_visa")
    discarded_body = command_body(saga_id, "tok_visa")
    drain("payment")  # whatever earlier tests left there
    replayed = dead_letter(saga_id, replayed_body)
    discarded = dead_letter(saga_id, discarded_body)
    response = client.post(f"/admin/dead-letters/{replayed}/replay", json={}, headers=admin_headers)
    assert response.status_code == 202
    assert response.json == {"id": replayed, "state": "replayed"}
    assert (
        client.post(
            f"/admin/dead-letters/{replayed}/replay", json={}, headers=admin_headers
        ).status_code
        == 409
    )
    assert (
        client.post(
            f"/admin/dead-letters/{replayed}/discard", json={}, headers=admin_headers
        ).status_code
        == 409
    )
    token = csrf_token(client, "/admin/dead-letters", admin_headers)
    form = client.post(
        f"/admin/dead-letters/{discarded}/discard",
        data={"csrf_token": token},
        headers=admin_headers,
    )
    assert form.status_code == 303
    assert _letter(client, admin_headers, replayed)["state"] == "replayed"
    assert _letter(client, admin_headers, discarded)["state"] == "discarded"
    for verb in ("replay", "discard"):
        assert (
            client.post(
                f"/admin/dead-letters/{2**40}/{verb}", json={}, headers=admin_headers
            ).status_code
            == 404
        )
    view = _saga(client, admin_headers, saga_id)
    events = [(e["event"], e["actor"]) for e in view["timeline"]]
    assert ("dead_letter.replayed", "admin") in events
    assert ("dead_letter.discarded", "admin") in events
    with transaction() as session:
        resolved = (
            session.execute(
                sa.text("SELECT resolved_by FROM dead_letters WHERE id IN (:a, :b)"),
                {"a": replayed, "b": discarded},
            )
            .scalars()
            .all()
        )
    assert resolved == ["admin", "admin"]
    # On the broker: the replayed message exactly once (the refused second replay and the
    # discard published nothing), the discarded one never.
    published = drain("payment")
    assert (published.count(replayed_body), published.count(discarded_body)) == (1, 0)


# ---------------------------------------------------------------- the attempts chart (pure)


def _ev(at_s: float, event: str, step: str | None = None, attempt: int | None = None) -> dict:
    stamp = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=at_s)
    return {
        "at": stamp.isoformat(),
        "event": event,
        "step": step,
        "attempt": attempt,
        "detail": None,
        "actor": "admin" if event.startswith("operator.") else None,
    }


def test_chart_bars_follow_retries_timeouts_and_parking() -> None:
    timeline = [
        _ev(0, "saga.started"),
        _ev(0, "step.dispatched", "inventory.reserve", 1),
        _ev(1, "step.failed", "inventory.reserve", 1),
        _ev(1, "step.retried", "inventory.reserve", 2),
        _ev(2, "step.succeeded", "inventory.reserve", 2),
        _ev(2, "step.dispatched", "payment.charge", 1),
        _ev(6, "step.timed_out", "payment.charge", 1),
        _ev(6, "step.dispatched", "payment.charge", 2),
        _ev(7, "step.failed", "payment.charge", 2),
        _ev(7, "compensation.dispatched", "inventory.release", 1),
        # The replies of attempts 1 and 2 came after the dead letter and were fenced off.
        _ev(9, "step.dead_lettered", "inventory.release", 3),
        _ev(9, "compensation.parked", "inventory.release", 3),
        _ev(12, "operator.retry"),
        _ev(12, "compensation.dispatched", "inventory.release", 4),
    ]
    bars = [(b["lane"], b["attempt"], b["last"], b["outcome"]) for b in attempt_bars(timeline)]
    assert bars == [
        ("inventory.reserve", 1, 1, "failed"),
        ("inventory.reserve", 2, 2, "ok"),
        ("payment.charge", 1, 1, "timeout"),
        ("payment.charge", 2, 2, "failed"),
        ("inventory.release", 1, 3, "dead"),
        ("inventory.release", 4, 4, "running"),
    ]
    svg = str(attempt_chart(timeline, now=_ev(20, "x")["at"]))
    assert svg.count('class="bar ') == 6 and 'class="operator"' in svg
    assert "inventory.release attempt 1-3: dead-lettered / parked" in svg
    assert "attempt 4: in flight, 8 s so far" in svg  # stretched to now (12 s -> 20 s)


def test_an_operator_retry_of_an_attempt_in_flight_closes_it() -> None:
    timeline = [
        _ev(0, "step.dispatched", "payment.charge", 1),
        _ev(5, "operator.retry"),
        _ev(5, "step.dispatched", "payment.charge", 2),
        _ev(6, "step.succeeded", "payment.charge", 2),
    ]
    assert [(b["attempt"], b["outcome"]) for b in attempt_bars(timeline)] == [
        (1, "timeout"),
        (2, "ok"),
    ]


def test_the_chart_escapes_what_it_draws() -> None:
    timeline = [_ev(0, "step.dispatched", "<b>x</b>", 1), _ev(1, "operator.compensate")]
    timeline[1]["detail"] = "<script>alert(1)</script>"
    svg = str(attempt_chart(timeline))
    assert "<b>x" not in svg and "<script>" not in svg and "&lt;script&gt;" in svg
