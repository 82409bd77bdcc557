"""Bulk operations by filter on the real system: the web records the operation, the orchestrator's
sweep (sent by beat) acts on its sagas at SAGA_BULK_RATE, and a runner killed mid-way is finished
by the next one without acting on any saga twice.

The sagas: orders whose confirm is refused and whose refund is then refused too, so each parks
(``failed``) on its charge; a retry attempts the refund again, which is refused again, so they
park again and the next test's filter finds them where the last one left them.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import requests

from orchestrator.ops.config import settings
from orchestrator.proof.client import Api
from orchestrator.proof.harness import Processes
from tests.integration.helpers import gaps_s, make_product, order_body, place

RATE = 5.0  # sagas a second, this module's SAGA_BULK_RATE: slow enough to kill mid-way
SAGAS = 12
PARK = {"orders.confirm": "fail", "payment.refund": "fail"}


@pytest.fixture(scope="module")
def admin(system: Processes) -> requests.Session:
    session = requests.Session()
    session.auth = (settings().admin_user, settings().admin_password.get_secret_value())
    session.headers["Accept"] = "application/json"
    return session


@pytest.fixture(scope="module", autouse=True)
def slow_runner(system: Processes) -> Iterator[None]:
    system.restart("orchestrator", sig=signal.SIGTERM, SAGA_BULK_RATE=str(RATE))
    yield
    system.restart("orchestrator", sig=signal.SIGTERM)  # back to the default for what follows


@pytest.fixture(scope="module")
def parked(system: Processes, admin: requests.Session, slow_runner: None) -> dict[str, Any]:
    """SAGAS parked sagas of this module's own, and the filter that selects exactly them."""
    api = Api.connect(system.url)
    since = datetime.now(UTC).isoformat()
    sku = make_product(stock=SAGAS * 2)
    placed = [place(api, order_body(sku, faults=PARK)) for _ in range(SAGAS)]
    views = api.wait_final([p["order_id"] for p in placed], 90)
    assert {v["saga"]["state"] for v in views.values()} == {"failed"}, views
    ids = {p["saga_id"] for p in placed}
    one = _get(admin, system, f"/admin/sagas/{placed[0]['saga_id']}")
    wanted = {
        "state": "failed",
        "reason": one["reason"],
        "step": one["current_step"],
        "created_after": since,
    }
    return {"ids": ids, "filter": wanted}


def _get(admin: requests.Session, system: Processes, path: str) -> Any:
    response = admin.get(f"{system.url}{path}", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def _bulk(admin: requests.Session, system: Processes, **body: Any) -> requests.Response:
    return admin.post(f"{system.url}/admin/sagas/bulk", json=body, timeout=10)


def _dry_run(admin: requests.Session, system: Processes, wanted: dict[str, Any]) -> Any:
    response = _bulk(admin, system, action="retry", filter=wanted, dry_run=True)
    assert response.status_code == 200, response.text
    return response.json()


def _operation(admin: requests.Session, system: Processes, operation_id: str) -> Any:
    return _get(admin, system, f"/admin/operations/{operation_id}")


def _wait_operation(
    admin: requests.Session, system: Processes, operation_id: str, done: int, timeout_s: float
) -> Any:
    """Until the operation has acted on ``done`` sagas (its own progress is the evidence)."""
    deadline = time.monotonic() + timeout_s
    while True:
        op = _operation(admin, system, operation_id)
        if op["done"] >= done or time.monotonic() > deadline:
            return op
        time.sleep(0.05)


def _wait_parked_again(
    admin: requests.Session, system: Processes, parked: dict[str, Any], timeout_s: float = 60
) -> None:
    """The retried sagas have parked again: the filter selects all of them once more."""
    deadline = time.monotonic() + timeout_s
    while _dry_run(admin, system, parked["filter"])["count"] < SAGAS:
        assert time.monotonic() < deadline, "the retried sagas did not park again"
        time.sleep(0.2)


def _bulk_events(admin: requests.Session, system: Processes, saga_id: str, op: str) -> int:
    timeline = _get(admin, system, f"/admin/sagas/{saga_id}")["timeline"]
    return sum(1 for e in timeline if e["event"] == "operator.bulk" and op in (e["detail"] or ""))


def test_the_dry_run_counts_what_the_run_then_acts_on_once_each_at_the_bounded_rate(
    system: Processes, admin: requests.Session, parked: dict[str, Any]
) -> None:
    preview = _dry_run(admin, system, parked["filter"])
    assert preview["count"] == SAGAS
    assert set(preview["sample"]) <= parked["ids"] and len(preview["sample"]) == 10

    started = _bulk(admin, system, action="retry", filter=parked["filter"], note="provider back")
    assert started.status_code == 202, started.text
    operation_id = started.json()["operation_id"]
    op = _wait_operation(admin, system, operation_id, SAGAS, timeout_s=SAGAS / RATE + 60)
    assert (op["total"], op["done"], op["state"]) == (preview["count"], SAGAS, "done"), op
    assert op["results"] == {"202": SAGAS}
    assert {i["saga_id"] for i in op["items"]} == parked["ids"]
    gaps = gaps_s([i["at"] for i in op["items"]])
    assert min(gaps) >= 1 / RATE - 0.001, gaps  # the rate bound, saga by saga
    for saga_id in parked["ids"]:
        assert _bulk_events(admin, system, saga_id, operation_id) == 1
    listed = _get(admin, system, "/admin/operations")["operations"]
    mine = next(o for o in listed if o["operation_id"] == operation_id)
    assert (mine["done"], mine["total"], mine["note"]) == (SAGAS, SAGAS, "provider back")
    _wait_parked_again(admin, system, parked)


def test_a_filter_that_matches_nothing_acts_on_nothing(
    system: Processes, admin: requests.Session, parked: dict[str, Any]
) -> None:
    wanted = {**parked["filter"], "created_after": datetime.now(UTC).isoformat()}
    assert _dry_run(admin, system, wanted) == {"count": 0, "sample": []}
    before = {s: len(_get(admin, system, f"/admin/sagas/{s}")["timeline"]) for s in parked["ids"]}
    started = _bulk(admin, system, action="retry", filter=wanted)
    assert started.status_code == 202
    op = _operation(admin, system, started.json()["operation_id"])
    assert (op["total"], op["done"], op["state"], op["items"]) == (0, 0, "done", [])
    after = {s: len(_get(admin, system, f"/admin/sagas/{s}")["timeline"]) for s in parked["ids"]}
    assert after == before


def test_bad_filters_are_422_and_record_nothing(
    system: Processes, admin: requests.Session, parked: dict[str, Any]
) -> None:
    before = len(_get(admin, system, "/admin/operations")["operations"])
    for bad in (
        {"filter": {**parked["filter"], "created_after": "10:02 yesterday"}},
        {"filter": {"state": "sleeping"}},
        {"filter": {"definition": "no-such-saga"}},
        {"filter": parked["filter"], "saga_ids": sorted(parked["ids"])},
    ):
        response = _bulk(admin, system, action="retry", **bad)
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["error"]["details"], response.text
    assert len(_get(admin, system, "/admin/operations")["operations"]) == before


def test_a_runner_killed_mid_operation_is_finished_by_the_next_each_saga_once(
    system: Processes, admin: requests.Session, parked: dict[str, Any]
) -> None:
    assert _dry_run(admin, system, parked["filter"])["count"] == SAGAS
    started = _bulk(admin, system, action="retry", filter=parked["filter"], note="after kill")
    operation_id = started.json()["operation_id"]
    op = _wait_operation(admin, system, operation_id, 3, timeout_s=60)
    system.kill("orchestrator")  # SIGKILL, the whole process group, mid-operation
    at_kill = _operation(admin, system, operation_id)
    assert 3 <= at_kill["done"] < SAGAS, at_kill
    system.start("orchestrator", SAGA_BULK_RATE=str(RATE))
    op = _wait_operation(admin, system, operation_id, SAGAS, timeout_s=SAGAS / RATE + 60)
    assert (op["done"], op["state"]) == (SAGAS, "done"), op
    assert op["results"] == {"202": SAGAS}
    for saga_id in parked["ids"]:
        assert _bulk_events(admin, system, saga_id, operation_id) == 1, saga_id
    gaps = gaps_s([i["at"] for i in op["items"]])
    assert min(gaps) >= 1 / RATE - 0.001, gaps  # the rate holds across the restart too
    _wait_parked_again(admin, system, parked)
