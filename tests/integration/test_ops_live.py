"""/metrics and /healthz of the real web process (gunicorn, several workers) on a real run."""

from __future__ import annotations

import time
from typing import Any

import psutil
import requests
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.ops.config import settings
from orchestrator.proof.client import Api
from orchestrator.proof.harness import Processes, free_port
from tests.integration.helpers import make_product, order_body, place, settle_and_audit

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    r = requests.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_a_run_the_same_from_every_web_worker(api: Api, system: Processes) -> None:
    settle_and_audit()  # nothing in flight from earlier tests
    before = scrape(system.url)
    sku = make_product(stock=4)  # the declined order holds a unit until it is released
    bodies = [
        order_body(sku),  # confirmed
        order_body(sku, faults={"inventory.reserve": "transient:1"}),  # confirmed, one retry
        order_body(sku, token="tok_chargeDeclined"),  # declined: release, then cancel
        order_body(sku, quantity=50),  # out of stock: cancel only
        order_body(sku),  # confirmed (the last unit)
    ]
    placed = [place(api, body) for body in bodies]
    views = api.wait_final([p["order_id"] for p in placed], timeout_s=60)
    assert [views[p["order_id"]]["status"] for p in placed] == [
        "confirmed",
        "confirmed",
        "cancelled",
        "cancelled",
        "confirmed",
    ]
    # The outbox drains (the relay publishes) shortly after the last command is written.
    deadline = time.monotonic() + 10
    after = scrape(system.url)
    while get(after, "saga_outbox_backlog") and time.monotonic() < deadline:
        time.sleep(0.2)
        after = scrape(system.url)

    def delta(name: str, **labels: str) -> float:
        return get(after, name, **labels) - get(before, name, **labels)

    assert delta("saga_started_total") == 5
    assert delta("saga_finished_total", outcome="completed") == 3
    assert delta("saga_finished_total", outcome="compensated") == 2
    assert delta("saga_finished_total", outcome="failed") == 0
    assert delta("saga_retries_total", step="inventory.reserve") == 1
    assert delta("saga_compensations_total", compensation="orders.cancel") == 2
    assert delta("saga_compensations_total", compensation="inventory.release") == 1
    assert delta("saga_compensations_total", compensation="payment.refund") == 0
    assert delta("saga_step_duration_seconds_count", step="orders.confirm") == 3
    assert delta("saga_step_duration_seconds_count", step="payment.charge") == 4
    assert delta("saga_compensation_duration_seconds_count", compensation="orders.cancel") == 2
    assert get(after, "saga_outbox_backlog") == 0
    assert get(after, "saga_outbox_lag_seconds") == 0
    assert get(after, "saga_stuck") == 0
    # Two gunicorn workers answer these in turn: every one reads the same database.
    counts = {get(scrape(system.url), "saga_started_total") for _ in range(8)}
    assert counts == {get(after, "saga_started_total")}


def _health(url: str, timeout_s: float = 60) -> requests.Response:
    """The first answer of a web that is still starting (gunicorn listens before its workers
    answer: on a busy machine a request may wait, or be refused, for a while)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return requests.get(f"{url}/healthz", timeout=15)
        except (requests.ConnectionError, requests.Timeout):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _second_web(system: Processes, name: str, **env: str) -> tuple[str, Any]:
    port = free_port()
    running = system.start(name, wait=False, PORT=str(port), **env)
    return f"http://127.0.0.1:{port}", running


def test_healthz_is_503_from_a_web_whose_broker_is_unreachable(system: Processes) -> None:
    url, running = _second_web(
        system, "web#nobroker", BROKER_URL="amqp://guest:guest@127.0.0.1:1//"
    )
    response = _health(url)
    assert running.proc.poll() is None, system.tail("web#nobroker")
    assert response.status_code == 503
    assert response.json() == {"database": "ok", "broker": "down"}
    # The shared system is untouched: its own web still reports both up.
    main = requests.get(f"{system.url}/healthz", timeout=10)
    assert (main.status_code, main.json()) == (200, {"database": "ok", "broker": "ok"})


def test_healthz_is_503_from_a_web_whose_database_is_unreachable(system: Processes) -> None:
    url, _ = _second_web(
        system, "web#nodb", DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x"
    )
    response = _health(url)
    assert response.status_code == 503
    assert response.json() == {"database": "down", "broker": "ok"}


def test_the_background_processes_yield_the_cpu_to_the_web(system: Processes) -> None:
    """Every worker (its pool processes too), the relay and beat run at SAGA_BACKGROUND_NICE;
    the web's processes keep the priority they were started with."""
    own = psutil.Process().nice()
    wanted = max(own, settings().background_nice)
    assert wanted > own, "the setting must lower the background processes' priority here"
    seen: dict[str, set[int]] = {}
    for name, running in system.running.items():
        if running.proc.poll() is not None:
            continue
        root = psutil.Process(running.proc.pid)
        seen[name] = {p.nice() for p in [root, *root.children(recursive=True)]}
    background = {name for name in seen if not name.startswith("web")}
    assert {"orchestrator", "relay", "beat", "inventory", "payment", "orders"} <= background
    assert {name: seen[name] for name in background} == {name: {wanted} for name in background}
    assert seen["web"] == {own}
