"""An operator at work on the real system: parked sagas retried, a stuck saga seen and resumed.

Everything goes through the admin JSON API with HTTP Basic, as a script of an operator would.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import requests

from orchestrator.ops.config import settings
from orchestrator.proof.client import Api
from orchestrator.proof.harness import Processes
from tests.conftest import TEST_TIMINGS
from tests.integration.helpers import (
    LogCursor,
    admin_session,
    assert_in_order,
    describe,
    make_product,
    order_body,
    place,
    product,
    records,
    wait_final,
)

COMPENSATION_BUDGET = int(TEST_TIMINGS["SAGA_COMPENSATION_ATTEMPTS"])
STEP_TIMEOUT_S = float(TEST_TIMINGS["SAGA_STEP_TIMEOUT_S"])


@pytest.fixture
def admin(system: Processes) -> requests.Session:
    return admin_session()


def listed(admin: requests.Session, system: Processes, saga_id: str, **params: str) -> list[dict]:
    """The saga's rows in the admin list under these filters (searched by its id)."""
    r = admin.get(f"{system.url}/admin/sagas", params={"q": saga_id, **params}, timeout=10)
    assert r.status_code == 200, r.text
    rows: list[dict] = r.json()["sagas"]
    return rows


def step(view: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in view["saga"]["steps"] if s["name"] == name)
    return found


def refund_of(view: dict[str, Any]) -> dict[str, Any]:
    refund: dict[str, Any] = step(view, "payment.charge")["compensation"]
    return refund


def retry(admin: requests.Session, system: Processes, saga_id: str, note: str) -> requests.Response:
    return admin.post(f"{system.url}/admin/sagas/{saga_id}/retry", json={"note": note}, timeout=10)


def parked(api: Api, refund_fault: str) -> dict[str, Any]:
    """An order whose confirm is refused and whose refund then fails: the saga parks."""
    sku = make_product(stock=5, price_cents=300)
    body = order_body(
        sku, quantity=2, faults={"orders.confirm": "fail", "payment.refund": refund_fault}
    )
    placed = place(api, body)
    view = wait_final(api, placed["order_id"])
    assert view["saga"]["state"] == "failed", describe(view)
    return {**placed, "sku": sku, "view": view}


def test_a_parked_refund_retried_by_the_operator_ends_compensated_with_one_refund(
    api: Api, admin: requests.Session, system: Processes
) -> None:
    case = parked(api, "transient:4")  # attempts 1-3 fail: the budget (3) is spent, it parks
    saga_id, view = case["saga_id"], case["view"]
    assert (view["status"], view["reason"]) == ("failed", "retries_exhausted")
    assert (refund_of(view)["status"], refund_of(view)["attempts"]) == (
        "parked",
        COMPENSATION_BUDGET,
    )
    [row] = listed(admin, system, saga_id, state="failed")
    assert (row["state"], row["reason"], row["current_step"]) == (
        "failed",
        "retries_exhausted",
        "payment.charge",
    )
    assert records("charges", saga_id)[0]["status"] == "charged"  # not refunded yet

    answer = retry(admin, system, saga_id, "refund service is back")
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"saga_id": saga_id, "state": "compensating"}

    final = wait_final(api, case["order_id"])
    assert (final["status"], final["reason"], final["saga"]["state"]) == (
        "cancelled",
        "retries_exhausted",
        "compensated",
    ), describe(final, system.log_dir)
    # Attempt 4 (the first after the retry) still fails; attempt 5 refunds.
    assert (refund_of(final)["status"], refund_of(final)["attempts"]) == ("succeeded", 5)
    assert_in_order(
        final,
        [
            ("compensation.parked", "payment.refund", COMPENSATION_BUDGET),
            ("operator.retry", None),
            ("compensation.dispatched", "payment.refund", COMPENSATION_BUDGET + 1),
            ("compensation.succeeded", "payment.refund", COMPENSATION_BUDGET + 2),
            ("compensation.succeeded", "inventory.release"),
            ("compensation.succeeded", "orders.cancel"),
            ("saga.compensated", None),
        ],
    )
    # Who acted and the note are on the admin view only (the public timeline has neither).
    saga_view = admin.get(f"{system.url}/admin/sagas/{saga_id}", timeout=10).json()
    action = next(e for e in saga_view["timeline"] if e["event"] == "operator.retry")
    assert (action["actor"], action["detail"]) == (settings().admin_user, "refund service is back")
    public = next(e for e in final["saga"]["timeline"] if e["event"] == "operator.retry")
    assert "actor" not in public and public["detail"] is None
    charges = records("charges", saga_id)
    assert [(c["status"], c["amount_cents"]) for c in charges] == [("refunded", 600)]
    assert product(case["sku"]) == {"available": 5, "reserved": 0, "sold": 0}
    assert listed(admin, system, saga_id, state="failed") == []
    assert [r["state"] for r in listed(admin, system, saga_id, state="compensated")] == [
        "compensated"
    ]
    assert retry(admin, system, saga_id, "again").status_code == 409  # compensated: final


def test_a_refund_that_always_fails_parks_again_after_a_retry_with_its_attempts_counted_on(
    api: Api, admin: requests.Session, system: Processes
) -> None:
    case = parked(api, "always")
    saga_id = case["saga_id"]
    assert refund_of(case["view"])["attempts"] == COMPENSATION_BUDGET
    assert retry(admin, system, saga_id, "one more try").status_code == 202

    # The retry answered "compensating" at once; wait for the fresh budget to run out too.
    deadline = time.monotonic() + 60
    view = api.order(case["order_id"])
    while time.monotonic() < deadline and (
        view["saga"]["state"] != "failed" or refund_of(view)["attempts"] < 6
    ):
        time.sleep(0.25)
        view = api.order(case["order_id"])
    assert view["saga"]["state"] == "failed", describe(view, system.log_dir)
    assert (refund_of(view)["status"], refund_of(view)["attempts"]) == (
        "parked",
        2 * COMPENSATION_BUDGET,
    )
    parks = [e["attempt"] for e in view["saga"]["timeline"] if e["event"] == "compensation.parked"]
    assert parks == [COMPENSATION_BUDGET, 2 * COMPENSATION_BUDGET]
    assert (view["status"], view["reason"]) == ("failed", "retries_exhausted")
    # Nothing was undone: the charge stands, the stock stays reserved, release never ran.
    assert [c["status"] for c in records("charges", saga_id)] == ["charged"]
    assert step(view, "inventory.reserve")["compensation"]["status"] == "pending"
    assert product(case["sku"]) == {"available": 3, "reserved": 2, "sold": 0}
    letters = admin.get(f"{system.url}/admin/dead-letters", timeout=10).json()["dead_letters"]
    mine = [d for d in letters if d["saga_id"] == saga_id]
    assert [(d["step"], d["state"]) for d in mine] == [("payment.refund", "dead")] * 2
    assert [r["state"] for r in listed(admin, system, saga_id, state="failed")] == ["failed"]


@contextmanager
def beat_paused(system: Processes) -> Iterator[None]:
    """SIGSTOP the beat, so no sweep acts on a deadline until SIGCONT (always sent)."""
    pid = system.pid("beat")
    os.killpg(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(pid, signal.SIGCONT)


def wait_stuck(
    admin: requests.Session, system: Processes, saga_id: str, timeout_s: float
) -> tuple[list[dict], float]:
    """Poll ?state=stuck until the saga shows; returns the rows and how long it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        rows = listed(admin, system, saga_id, state="stuck")
        if rows:
            return rows, time.monotonic() - started
        time.sleep(0.1)
    return [], time.monotonic() - started


@pytest.mark.parametrize("who_resumes", ["sweeper", "operator"])
def test_a_hanging_step_shows_as_stuck_then_ends_final(
    who_resumes: str, api: Api, admin: requests.Session, system: Processes
) -> None:
    sku = make_product(stock=5)
    hang_s = STEP_TIMEOUT_S * 2
    payment_log = LogCursor.at_end(system, "payment")
    orchestrator_log = LogCursor.at_end(system, "orchestrator")
    with beat_paused(system):
        placed = place(api, order_body(sku, faults={"payment.charge": f"hang:{hang_s:g}"}))
        saga_id = placed["saga_id"]
        assert listed(admin, system, saga_id, state="stuck") == []  # not yet past its deadline
        rows, waited = wait_stuck(admin, system, saga_id, timeout_s=STEP_TIMEOUT_S + 30)
        assert rows, describe(api.order(placed["order_id"]), system.log_dir)
        assert waited >= STEP_TIMEOUT_S - 1.5  # it became stuck at its deadline, not before
        [row] = rows
        assert (row["state"], row["stuck"], row["current_step"]) == (
            "running",
            True,
            "payment.charge",
        )
        counts = admin.get(f"{system.url}/admin/sagas", timeout=10).json()["counts"]
        assert counts["stuck"] >= 1
        page = admin.get(
            f"{system.url}/admin/sagas",
            params={"state": "stuck"},
            headers={"Accept": "text/html"},
            timeout=10,
        ).text
        assert f'data-saga-id="{saga_id}"' in page
        if who_resumes == "operator":
            answer = retry(admin, system, saga_id, "charge looks stuck")
            assert answer.status_code == 202, answer.text
            final = wait_final(api, placed["order_id"], timeout_s=60)
    if who_resumes == "sweeper":
        final = wait_final(api, placed["order_id"], timeout_s=60)
    assert (final["status"], final["saga"]["state"]) == ("confirmed", "completed"), describe(
        final, system.log_dir
    )
    assert step(final, "payment.charge")["attempts"] == 2
    events = [e["event"] for e in final["saga"]["timeline"]]
    if who_resumes == "operator":
        assert "operator.retry" in events and "step.timed_out" not in events
    else:
        assert "step.timed_out" in events and "operator.retry" not in events
    assert listed(admin, system, saga_id, state="stuck") == []
    # The first attempt wakes later and finds the charge made: still exactly one. Its wake-up
    # is seen in the payment log and its reply in the orchestrator's.
    saga = f"saga_id={saga_id}"
    payment_log.wait_for(saga, "attempt 1 succeeded", timeout_s=hang_s + 30)
    orchestrator_log.wait_for(saga, "reply succeeded attempt 1:")
    assert api.order(placed["order_id"])["saga"] == final["saga"]
    assert [(c["status"], c["amount_cents"]) for c in records("charges", saga_id)] == [
        ("charged", 100)
    ]
    assert product(sku) == {"available": 4, "reserved": 0, "sold": 1}
