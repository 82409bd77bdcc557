"""Web tier: the Flask app in-process (test client) against the session's real PostgreSQL sandbox.

No worker runs here: orders are accepted and written (order, saga, outbox row) but not processed.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from orchestrator.harness import Sandbox


@pytest.fixture(scope="session")
def app(sandbox: Sandbox) -> Flask:
    from web import create_app

    return create_app({"TESTING": True})


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def admin_headers(app: Flask) -> dict[str, str]:
    raw = f"{app.config['ADMIN_USER']}:{app.config['ADMIN_PASSWORD']}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def csrf_token(client: FlaskClient, path: str = "/", headers: dict[str, str] | None = None) -> str:
    """The CSRF token a page embeds in its forms (the session cookie stays in the client)."""
    page = client.get(path, headers=headers or {}).get_data(as_text=True)
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, f"no CSRF token on {path}"
    return match.group(1)


def valid_order(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"customer_id": "c-42", "items": [{"sku": "SKU-APPLE", "quantity": 2}],
                            "payment": {"card_token": "tok_visa"}}
    body.update(overrides)
    return body
