"""Definitions and versions as the pages show them: the order JSON, the saga page, the lists."""

from __future__ import annotations

from flask.testing import FlaskClient

from tests.web.drive import body, place


def test_the_order_json_names_its_sagas_definition_and_version(client: FlaskClient) -> None:
    placed = place(client)
    view = body(client.get(f"/orders/{placed['order_id']}", headers={"Accept": "application/json"}))
    assert (view["saga"]["definition"], view["saga"]["definition_version"]) == ("order", 1)
    assert view["returns"] == []


def test_the_lists_show_the_version_and_filter_by_definition(
    client: FlaskClient, admin_headers: dict
) -> None:
    placed = place(client)
    json_headers = {**admin_headers, "Accept": "application/json"}
    listed = body(
        client.get(f"/admin/sagas?definition=order&q={placed['saga_id']}", headers=json_headers)
    )["sagas"]
    assert [(s["definition"], s["definition_version"]) for s in listed] == [("order", 1)]
    none = body(
        client.get(f"/admin/sagas?definition=loyalty&q={placed['saga_id']}", headers=json_headers)
    )
    assert none["error"]["code"] == "invalid_definition"  # not registered in this system
    page = client.get("/admin/sagas?definition=order", headers=admin_headers)
    assert page.status_code == 200 and 'option value="order" selected' in page.get_data(True)


def test_an_unknown_definition_filter_is_400(client: FlaskClient, admin_headers: dict) -> None:
    response = client.get("/admin/sagas?definition=nope", headers=admin_headers)
    assert response.status_code == 400


def test_the_saga_page_shows_the_definition_and_its_version(
    client: FlaskClient, admin_headers: dict
) -> None:
    placed = place(client)
    page = client.get(f"/admin/sagas/{placed['saga_id']}", headers=admin_headers)
    text = page.get_data(as_text=True)
    assert 'id="definition">order <span class="muted">version 1</span>' in text
