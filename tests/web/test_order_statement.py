"""POST /orders writes its rows in one round trip: the order, its lines, the saga, its steps, its
timeline and its first command in one statement (orchestrator/sagas/placing.py), and a price the
web cached is checked by that statement, never trusted."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from models.db import get_engine, transaction
from orchestrator.sagas import once
from tests.web.conftest import valid_order


@pytest.fixture
def product(app: Flask) -> str:
    sku = f"SKU-STMT-{uuid.uuid4().hex[:8].upper()}"
    with transaction() as session:
        session.execute(sa.text(
            "INSERT INTO products (sku, name, price_cents, available, reserved, sold, stock_total)"
            " VALUES (:sku, 'statement test', 250, 100, 0, 0, 100)"), {"sku": sku})
    return sku


@pytest.fixture
def statements() -> Iterator[list[str]]:
    seen: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    engine = get_engine()
    sa.event.listen(engine, "before_cursor_execute", count)
    yield seen
    sa.event.remove(engine, "before_cursor_execute", count)


def _order(client: FlaskClient, sku: str) -> dict[str, Any]:
    r = client.post("/orders", json=valid_order(items=[{"sku": sku, "quantity": 2}]))
    assert r.status_code == 202, r.get_json()
    return dict(r.get_json())


def test_an_order_is_one_statement_once_its_product_is_known(
    client: FlaskClient, product: str, statements: list[str]
) -> None:
    _order(client, product)  # the first order of a product reads its price
    once._backlog_checked["at"] = time.monotonic()  # the backlog count is not due now
    statements.clear()
    placed = _order(client, product)
    writes = [s for s in statements if not s.lstrip().upper().startswith("SELECT 1")]  # ping
    assert len(writes) == 1, writes
    with transaction() as session:
        tables = {
            table: session.scalar(sa.text(f"SELECT count(*) FROM {table} WHERE {key} = :id"),
                                  {"id": placed[ref]})
            for table, key, ref in (("orders", "id", "order_id"),
                                    ("order_lines", "order_id", "order_id"),
                                    ("sagas", "id", "saga_id"), ("saga_steps", "saga_id", "saga_id"),
                                    ("saga_events", "saga_id", "saga_id"),
                                    ("outbox", "saga_id", "saga_id"))
        }
    assert tables == {"orders": 1, "order_lines": 1, "sagas": 1, "saga_steps": 4,
                      "saga_events": 2, "outbox": 1}


def test_a_price_changed_after_the_web_cached_it_is_the_one_charged(
    client: FlaskClient, product: str
) -> None:
    _order(client, product)  # cached at 250
    with transaction() as session:
        session.execute(sa.text("UPDATE products SET price_cents = 400 WHERE sku = :sku"),
                        {"sku": product})
    placed = _order(client, product)
    order = client.get(f"/orders/{placed['order_id']}", headers={"Accept": "application/json"})
    assert order.get_json()["total_cents"] == 800
    assert order.get_json()["items"][0]["price_cents"] == 400
    with transaction() as session:
        context = session.scalar(sa.text("SELECT context FROM sagas WHERE id = :id"),
                                 {"id": placed["saga_id"]})
    assert context["total_cents"] == 800
