"""Connections cut under load: PostgreSQL sessions terminated, RabbitMQ connections closed.
Every saga still ends final, each effect once, and the invariants hold."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from orchestrator.proof.client import Api
from orchestrator.proof.harness import (
    Processes,
    close_broker_connections,
    terminate_database_connections,
)
from tests.integration.helpers import make_product, order_body, product, settle_and_audit


def _place_until_accepted(url: str, body: dict) -> dict:
    """A careful client: on 503 (database unavailable) it retries with the same Idempotency-Key."""
    key = str(uuid.uuid4())
    client = Api.connect(url)
    for _ in range(20):
        response = client.place(body, key)
        if response.status_code != 503:
            assert response.status_code in (200, 202), response.text
            accepted: dict = response.json()
            return accepted
        time.sleep(0.2)
    raise AssertionError("still 503 after 20 tries")


def _load(api: Api, sku: str, n: int) -> list[dict]:
    tokens = ["tok_visa" if i % 3 else "tok_chargeDeclined" for i in range(n)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(
            pool.map(lambda t: _place_until_accepted(api.url, order_body(sku, token=t)), tokens)
        )


def _repeat(action, times: int, gap_s: float) -> threading.Thread:  # type: ignore[no-untyped-def]
    def run() -> None:
        for _ in range(times):
            time.sleep(gap_s)
            action()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _check(api: Api, placed: list[dict], sku: str, stock: int) -> None:
    views = api.wait_final([p["order_id"] for p in placed], timeout_s=120)
    assert all(v["saga"]["state"] in ("completed", "compensated") for v in views.values()), [
        (v["order_id"], v["saga"]["state"]) for v in views.values()
    ]
    confirmed = sum(v["status"] == "confirmed" for v in views.values())
    declined = sum(v["reason"] == "payment_declined" for v in views.values())
    assert confirmed + declined == len(placed)
    assert product(sku) == {"available": stock - confirmed, "reserved": 0, "sold": confirmed}
    report = settle_and_audit()
    assert report.ok, report.violations


def test_database_connections_terminated_during_a_run(api: Api, system: Processes) -> None:
    sku = make_product(stock=200)
    killer = _repeat(lambda: terminate_database_connections(system.box.database_url), 4, 0.7)
    placed = _load(api, sku, 40)
    killer.join()
    _check(api, placed, sku, 200)


def test_broker_connections_closed_during_a_run(api: Api, system: Processes) -> None:
    sku = make_product(stock=200)
    closer = _repeat(lambda: close_broker_connections(system.box.name), 3, 1.0)
    placed = _load(api, sku, 40)
    closer.join()
    _check(api, placed, sku, 200)
