"""Helpers of the integration tests: products of their own, orders, waiting, reading state."""

from __future__ import annotations

import time
import uuid
from typing import Any

import sqlalchemy as sa

from models.catalog import Product
from models.db import transaction
from orchestrator import audit
from orchestrator.client import Api


def settle_and_audit(timeout_s: float = 60) -> audit.Report:
    """Wait until no saga is in flight (or time is up), then audit."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with transaction() as session:
            busy = session.scalar(sa.text(
                "SELECT count(*) FROM sagas WHERE state IN ('running', 'compensating')"))
        if not busy:
            break
        time.sleep(0.25)
    return audit.run()


def make_product(stock: int, price_cents: int = 100) -> str:
    """A product of this test's own (random SKU), so tests never share stock."""
    sku = f"SKU-T-{uuid.uuid4().hex[:10].upper()}"
    with transaction() as session:
        session.add(Product(sku=sku, name=f"test {sku}", price_cents=price_cents,
                            available=stock, reserved=0, sold=0, stock_total=stock))
    return sku


def order_body(sku: str, quantity: int = 1, token: str = "tok_visa",
               faults: dict[str, str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"customer_id": f"c-{uuid.uuid4().hex[:8]}",
                            "items": [{"sku": sku, "quantity": quantity}],
                            "payment": {"card_token": token}}
    if faults:
        body["faults"] = faults
    return body


def place(api: Api, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    response = api.place(body, key)
    assert response.status_code in (200, 202), response.text
    data: dict[str, Any] = response.json()
    return data


def wait_final(api: Api, order_id: str, timeout_s: float = 60) -> dict[str, Any]:
    return api.wait_final([order_id], timeout_s)[order_id]


def product(sku: str) -> dict[str, int]:
    with transaction() as session:
        p = session.get(Product, sku, populate_existing=True)
        assert p is not None
        return {"available": p.available, "reserved": p.reserved, "sold": p.sold}


def events(view: dict[str, Any]) -> list[tuple[str, str | None]]:
    return [(e["event"], e["step"]) for e in view["saga"]["timeline"]]
