"""A GET whose pooled connection died in steady use (inside the idle-ping window, so nothing
pinged it) is run again on a fresh connection: the page, not a 503 (web/reads.py)."""

from __future__ import annotations

import sqlalchemy as sa
from flask.testing import FlaskClient

from models.db import get_engine
from orchestrator.proof.harness import Sandbox
from tests.web.drive import backend_of, body, place, terminate_backend


def _pooled_backend() -> int:
    """The backend of the pool's one connection (checked out and back: its use is fresh)."""
    engine = get_engine()
    assert engine.pool.checkedin() == 1, "the pool holds one connection"
    return backend_of(engine)


def test_a_read_whose_connection_died_in_use_is_answered(
    client: FlaskClient, web_sandbox: Sandbox
) -> None:
    order_id = place(client)["order_id"]
    get_engine().dispose()  # from here on, the pool holds what the reads below open
    first = client.get(f"/orders/{order_id}", headers={"Accept": "application/json"})
    assert first.status_code == 200
    dead = _pooled_backend()
    terminate_backend(web_sandbox.database_url, dead)
    again = client.get(f"/orders/{order_id}", headers={"Accept": "application/json"})
    assert again.status_code == 200, again.get_data(as_text=True)[:300]
    assert body(again)["order_id"] == order_id
    assert _pooled_backend() != dead, "the dead connection was replaced"


def test_a_write_whose_connection_died_is_not_rerun_here(
    client: FlaskClient, web_sandbox: Sandbox
) -> None:
    """A POST is the client's to retry (with its Idempotency-Key): 503, and nothing written."""
    get_engine().dispose()
    client.get("/orders/00000000-0000-0000-0000-000000000000",
               headers={"Accept": "application/json"})  # opens the pool's one connection
    with get_engine().connect() as conn:
        orders_before = conn.scalar(sa.text("SELECT count(*) FROM orders"))
    terminate_backend(web_sandbox.database_url, _pooled_backend())
    response = client.post("/orders", json=_order())
    assert response.status_code == 503
    with get_engine().connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM orders")) == orders_before


def _order() -> dict[str, object]:
    from tests.web.conftest import valid_order

    return valid_order()
