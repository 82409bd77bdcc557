"""Operating through an outage on the real system: a paused service holds its commands, a resume
releases them at the bounded rate, and the circuit breaker pauses and resumes a failing service.

The module's orchestrator runs with a low resume rate (so the bound is measurable) and a
breaker within reach (the session's runs keep it out of reach); both are put back at the end.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from models.db import transaction
from orchestrator.ops.config import settings
from orchestrator.ops.processes import sagactl
from orchestrator.proof.client import Api
from orchestrator.proof.harness import Processes
from tests.conftest import TEST_TIMINGS
from tests.integration.helpers import (
    LogCursor,
    admin_session,
    describe,
    make_product,
    order_body,
    place,
    records,
)

RATE = 5.0  # SAGA_RESUME_RATE of this module's orchestrator
COOLDOWN_S = 3.0
STEP_TIMEOUT_S = float(TEST_TIMINGS["SAGA_STEP_TIMEOUT_S"])
BREAKER = {
    "SAGA_RESUME_RATE": str(RATE),
    "SAGA_BREAKER_MIN_CALLS": "6",
    "SAGA_BREAKER_THRESHOLD": "0.5",
    "SAGA_BREAKER_WINDOW_S": "30",
    "SAGA_BREAKER_COOLDOWN_S": str(COOLDOWN_S),
}


@pytest.fixture(scope="module", autouse=True)
def breaker_orchestrator(system: Processes) -> Iterator[None]:
    system.restart("orchestrator", **BREAKER)
    yield
    system.restart("orchestrator")
    system.restart("payment")


@pytest.fixture
def admin(system: Processes) -> requests.Session:
    return admin_session()


def service(admin: requests.Session, system: Processes, name: str) -> dict[str, Any]:
    r = admin.get(f"{system.url}/admin/services", timeout=10)
    assert r.status_code == 200, r.text
    found: dict[str, Any] = next(s for s in r.json()["services"] if s["service"] == name)
    return found


def act(admin: requests.Session, system: Processes, name: str, verb: str, **body: Any) -> None:
    r = admin.post(f"{system.url}/admin/services/{name}/{verb}", json=body, timeout=10)
    assert r.status_code == 202, r.text


def wait_until(what: str, check: Any, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        time.sleep(0.2)


def fresh_window(admin: requests.Session, system: Processes) -> None:
    """A clean breaker window for payment (a resume starts one): the earlier tests' calls must
    neither dilute this test's nor slide out of the window under it."""
    act(admin, system, "payment", "pause")
    act(admin, system, "payment", "resume")


def saga_rows(saga_ids: list[str], step: str = "payment.charge") -> dict[str, dict[str, Any]]:
    with transaction() as session:
        rows = session.execute(
            sa.text("""
                SELECT s.id::text AS saga_id, s.state, s.held_since, s.deadline_at,
                       st.status AS charge_status, st.attempts AS charge_attempts,
                       st.attempts AS step_attempts
                FROM sagas s JOIN saga_steps st ON st.saga_id = s.id AND st.name = :step
                WHERE s.id = ANY(CAST(:ids AS uuid[]))"""),
            {"ids": saga_ids, "step": step},
        ).mappings()
        return {row["saga_id"]: dict(row) for row in rows}


def released_at(saga_ids: list[str]) -> list[datetime]:
    with transaction() as session:
        return sorted(
            session.scalars(
                sa.text(
                    "SELECT at FROM saga_events WHERE event = 'step.released'"
                    " AND saga_id = ANY(CAST(:ids AS uuid[]))"
                ),
                {"ids": saga_ids},
            )
        )


def audit(name: str, since_id: int = 0) -> list[str]:
    with transaction() as session:
        return list(
            session.scalars(
                sa.text("SELECT action FROM service_audit WHERE service = :s AND id > :i ORDER BY id"),
                {"s": name, "i": since_id},
            )
        )


def last_audit_id() -> int:
    with transaction() as session:
        return int(session.scalar(sa.text("SELECT coalesce(max(id), 0) FROM service_audit")) or 0)


def test_paused_payment_holds_twenty_orders_and_resume_releases_them_at_the_bounded_rate(
    api: Api, admin: requests.Session, system: Processes, artifacts: Path
) -> None:
    sku = make_product(stock=40)
    act(admin, system, "payment", "pause", note="provider down")
    placed = [place(api, order_body(sku)) for _ in range(20)]
    ids = [p["saga_id"] for p in placed]

    wait_until("20 sagas held", lambda: all(
        r["held_since"] is not None for r in saga_rows(ids).values()))
    before = saga_rows(ids)
    # Past every step deadline, with sweeps after it: held sagas are not stuck, nothing timed out.
    sweeps = LogCursor.at_end(system, "beat")
    sweeps.wait_for("saga.sweep", count=int(STEP_TIMEOUT_S) + 3, timeout_s=30)

    rows = saga_rows(ids)
    assert all(r["state"] == "running" and r["charge_status"] == "running" for r in rows.values())
    assert all(r["charge_attempts"] == 0 for r in rows.values()), "a held command is no attempt"
    assert all(records("charges", s) == [] for s in ids), "a paused payment charges nobody"
    listed = admin.get(f"{system.url}/admin/sagas", params={"held": "true"}, timeout=10).json()
    assert set(ids) <= {s["saga_id"] for s in listed["sagas"]}
    assert all(s["held"] for s in listed["sagas"])
    one = api.order(placed[0]["order_id"])
    assert one["status"] == "pending" and not one["saga"]["stuck"]
    events = [e["event"] for e in one["saga"]["timeline"]]
    assert "step.held" in events and "step.timed_out" not in events
    page = service(admin, system, "payment")
    assert page["state"] == "paused" and page["held"] >= 20 and page["by"] == settings().admin_user
    assert page["consumers"] >= 1

    resumed = time.monotonic()
    act(admin, system, "payment", "resume", note="provider back")
    finals = api.wait_final([p["order_id"] for p in placed], timeout_s=90)
    drained_s = time.monotonic() - resumed
    for view in finals.values():
        assert view["status"] == "confirmed", describe(view, system.log_dir)
    assert all(len(records("charges", s)) == 1 for s in ids), "one charge each"
    after = saga_rows(ids)
    assert all(r["charge_attempts"] == 1 for r in after.values())
    for saga_id in ids:  # the saga's deadline moved on by the time it was held
        moved = (after[saga_id]["deadline_at"] - before[saga_id]["deadline_at"]).total_seconds()
        assert moved >= STEP_TIMEOUT_S, moved

    times = released_at(ids)
    assert len(times) == 20
    # The bound: no second holds more than RATE + 1 releases (the paced schedule keeps the k-th
    # at or after k / RATE; one late transaction may bring two closer), and on average RATE.
    burst = int(RATE) + 1
    gaps = [(times[i + burst] - times[i]).total_seconds() for i in range(20 - burst)]
    spread = (times[-1] - times[0]).total_seconds()
    figures = {
        "orders_held": sum(r["held_since"] is not None for r in before.values()),
        "orders_confirmed": sum(v["status"] == "confirmed" for v in finals.values()),
        "charges": sum(len(records("charges", s)) for s in ids),
        "resume_rate_bound_per_s": RATE,
        "released_over_s": round(spread, 2),
        "observed_release_rate_per_s": round(19 / spread, 2),
        "drained_after_resume_s": round(drained_s, 2),
        f"tightest_{burst + 1}_releases_s": round(min(gaps), 2),
    }
    (artifacts / "services_outage.json").write_text(json.dumps(figures, indent=2))
    print(f"\noutage figures ({artifacts / 'services_outage.json'}): {json.dumps(figures)}")
    assert min(gaps) >= 1.0, f"more than {burst} releases within a second: {gaps}"
    assert spread >= (20 - 1) / RATE * 0.95
    assert service(admin, system, "payment")["held"] == 0
    assert audit("payment")[-2:] == ["pause", "resume"]


def test_pause_and_resume_answer_404_and_409(admin: requests.Session, system: Processes) -> None:
    r = admin.post(f"{system.url}/admin/services/nosuch/pause", json={}, timeout=10)
    assert r.status_code == 404
    r = admin.post(f"{system.url}/admin/services/inventory/resume", json={}, timeout=10)
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_applicable"


def test_a_paused_inventory_holds_the_web_s_first_command_and_a_resume_sends_it(
    api: Api, admin: requests.Session, system: Processes
) -> None:
    """The web's one-statement order (and its publish right after) holds the saga's first
    command while its service is paused: nothing reserved until the resume."""
    sku = make_product(stock=10)
    act(admin, system, "inventory", "pause", note="warehouse offline")
    placed = [place(api, order_body(sku)) for _ in range(4)]
    ids = [p["saga_id"] for p in placed]
    rows = saga_rows(ids, step="inventory.reserve")
    assert all(r["held_since"] is not None and r["step_attempts"] == 0 for r in rows.values())
    sweeps = LogCursor.at_end(system, "beat")
    sweeps.wait_for("saga.sweep", count=3, timeout_s=30)
    assert all(records("reservations", s) == [] for s in ids), "nothing reached inventory"
    act(admin, system, "inventory", "resume")
    finals = api.wait_final([p["order_id"] for p in placed], timeout_s=60)
    for view in finals.values():
        assert view["status"] == "confirmed", describe(view, system.log_dir)
    assert all(len(records("reservations", s)) == 1 for s in ids)


def test_declined_cards_never_open_the_breaker(
    api: Api, admin: requests.Session, system: Processes
) -> None:
    sku = make_product(stock=40)
    fresh_window(admin, system)
    start = service(admin, system, "payment")["calls"]
    placed = [place(api, order_body(sku, token="tok_chargeDeclined")) for _ in range(12)]
    finals = api.wait_final([p["order_id"] for p in placed], timeout_s=60)
    assert {v["reason"] for v in finals.values()} == {"payment_declined"}
    # Evidence that the breaker judged them: the refusals are in its window, as healthy calls.
    page = wait_until("the refusals counted", lambda: (
        (s := service(admin, system, "payment"))["calls"] >= start + 12 and s))
    assert page["state"] == "running" and page["failure_rate"] < 0.5


def test_breaker_opens_on_transient_failures_holds_later_orders_and_closes_after_a_probe(
    api: Api, admin: requests.Session, system: Processes
) -> None:
    sku = make_product(stock=60)
    fresh_window(admin, system)
    mark = last_audit_id()
    failing = [place(api, order_body(sku, faults={"payment.charge": "always"})) for _ in range(8)]
    wait_until("the breaker open", lambda: service(admin, system, "payment")["state"]
               in ("breaker_open", "half_open"), timeout_s=30)
    assert audit("payment", mark)[0] == "breaker_open"
    page = service(admin, system, "payment")
    assert page["by"] == "breaker"

    later = [place(api, order_body(sku)) for _ in range(5)]
    later_ids = [p["saga_id"] for p in later]
    wait_until("the later orders held", lambda: all(
        r["held_since"] is not None for r in saga_rows(later_ids).values()))
    assert all(api.order(p["order_id"])["status"] == "pending" for p in later)

    # The provider recovers: the participant stops failing; the next probe closes the breaker.
    system.restart("payment", SAGA_FAULT_INJECTION="0")
    wait_until("the breaker closed", lambda: "breaker_closed" in audit("payment", mark),
               timeout_s=60)
    actions = audit("payment", mark)
    assert "half_open" in actions and actions.index("half_open") < actions.index("breaker_closed")
    finals = api.wait_final([p["order_id"] for p in later], timeout_s=60)
    for view in finals.values():
        assert view["status"] == "confirmed", describe(view, system.log_dir)
    assert all(len(records("charges", s)) == 1 for s in later_ids)
    # The failing ones: cancelled if their retries ran out before the breaker opened, else held
    # and then confirmed; never both, never left pending.
    early = api.wait_final([p["order_id"] for p in failing], timeout_s=60)
    assert {v["status"] for v in early.values()} <= {"confirmed", "cancelled"}
    assert service(admin, system, "payment")["state"] == "running"


def test_sagactl_service_list_pause_resume_and_their_exit_codes(system: Processes) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(sagactl("service", *args), env=system.box.env(),
                              capture_output=True, text=True, timeout=120)

    listed = run("list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {s["service"] for s in json.loads(listed.stdout)["services"]} == {
        "inventory", "payment", "orders"}
    paused = run("pause", "orders", "--note", "from the CLI", "--json")
    assert paused.returncode == 0 and json.loads(paused.stdout)["state"] == "paused"
    assert run("pause", "orders").returncode == 1  # already paused
    assert run("pause", "nosuch").returncode == 2
    resumed = run("resume", "orders", "--json")
    assert resumed.returncode == 0 and json.loads(resumed.stdout)["state"] == "running"
    assert run("resume", "orders").returncode == 1
    assert audit("orders")[-2:] == ["pause", "resume"]
