"""Web tier: the Flask app in-process (test client) against a real PostgreSQL sandbox of its own.

No worker or relay runs here: orders are accepted and written (order, saga, outbox row) but not
published or processed.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from orchestrator.proof.harness import Sandbox


@pytest.fixture(scope="package")
def web_sandbox(sandbox: Sandbox) -> Iterator[Sandbox]:
    """A database and vhost for this tier alone. Its sagas are moved by hand, so the session's
    `system` (alive once an integration or e2e test started it) must never run them, nor its
    audits see them; the process points back at the session's sandbox when the tier ends."""
    from models.db import get_engine
    from orchestrator.proof.harness import use_sandbox

    box = Sandbox.create("sagaweb")
    # Nothing is published here either: every command written stays in the outbox, unsent.
    os.environ["SAGA_OUTBOX_FAST_PATH"] = "0"
    use_sandbox(box)
    try:
        yield box
    finally:
        get_engine().dispose()
        del os.environ["SAGA_OUTBOX_FAST_PATH"]
        use_sandbox(sandbox)
        box.destroy()


@pytest.fixture(scope="package")
def app(web_sandbox: Sandbox) -> Flask:
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
