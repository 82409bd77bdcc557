"""Process deaths at the points that matter, and duplicates: nothing lost, nothing applied twice.

Every death here is a real SIGKILL of a real process (a fail point kills the process that reaches
it, as SIGKILL would; the harness kills whole process groups).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from models.db import transaction
from orchestrator.messaging.celery_app import app as celery_app
from orchestrator.messaging.envelopes import ReplyOutcome, ReplyPayload, make_reply, parse_command
from orchestrator.proof.client import Api
from orchestrator.proof.harness import Processes
from tests.integration.helpers import (
    LogCursor,
    make_product,
    order_body,
    place,
    product,
    wait_final,
)

FAST_PATH_WRITERS = ("web", "orchestrator")


def arm(point: str, in_batch_of: int | None = None) -> Path:
    """Arm a fail point; ``in_batch_of``: it fires only in a batch of at least that many."""
    marker = Path(os.environ["SAGA_FAILPOINTS_DIR"]) / point
    marker.write_text(f"batch>={in_batch_of}" if in_batch_of else "", encoding="utf-8")
    return marker


def wait_until(check, timeout_s: float = 30, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def unsent(saga_id: str) -> int:
    with transaction() as session:
        count = session.scalar(
            sa.text("SELECT count(*) FROM outbox WHERE saga_id = :s AND sent_at IS NULL"),
            {"s": saga_id},
        )
    return int(count or 0)


def charged(saga_id: str) -> int:
    with transaction() as session:
        total = session.scalar(
            sa.text("SELECT sum(amount_cents) FROM charges WHERE saga_id = :s"), {"s": saga_id}
        )
    return int(total or 0)


def effects(saga_id: str) -> dict[str, int]:
    with transaction() as session:
        row = session.execute(
            sa.text(
                "SELECT (SELECT count(*) FROM reservations WHERE saga_id = :s),"
                "       (SELECT count(*) FROM charges WHERE saga_id = :s)"
            ),
            {"s": saga_id},
        ).one()
    return {"reservations": row[0], "charges": row[1]}


def steps_in(saga_ids: list[str], statuses: tuple[str, ...], step: str | None = None) -> int:
    """How many forward steps of these sagas (``step`` only, if named) are in ``statuses``:
    evidence of work in hand."""
    with transaction() as session:
        count = session.scalar(
            sa.text(
                "SELECT count(*) FROM saga_steps WHERE saga_id = ANY(CAST(:s AS uuid[]))"
                " AND idx > 0 AND status = ANY(CAST(:st AS text[]))"
                " AND (CAST(:n AS text) IS NULL OR name = :n)"
            ),
            {"s": saga_ids, "st": list(statuses), "n": step},
        )
    return int(count or 0)


@pytest.fixture
def relay_only(system: Processes) -> Iterator[None]:
    """The web and the orchestrator without their fast path: every command goes through the relay."""
    for name in FAST_PATH_WRITERS:
        system.restart(name, SAGA_OUTBOX_FAST_PATH="0")
    yield
    for name in FAST_PATH_WRITERS:
        system.restart(name)


def test_orchestrator_killed_after_commit_before_publishing_the_command(
    api: Api, system: Processes
) -> None:
    """The orchestrator dies right after committing a transition, before its fast path publishes
    the next command: the relay sends the committed row once it is past the grace period."""
    sku = make_product(stock=5)
    marker = arm("orchestrator.before_publish")
    placed = place(api, order_body(sku, quantity=2))
    wait_until(lambda: not marker.exists(), what="the fail point to fire")
    view = wait_final(api, placed["order_id"])
    assert (view["status"], view["saga"]["state"]) == ("confirmed", "completed")
    assert effects(placed["saga_id"]) == {"reservations": 1, "charges": 1}
    assert product(sku) == {"available": 3, "reserved": 0, "sold": 2}
    wait_until(lambda: unsent(placed["saga_id"]) == 0, what="every command to be marked sent")


def test_orchestrator_killed_after_publishing_before_marking_sent_duplicates_harmlessly(
    api: Api, system: Processes
) -> None:
    """Published but never marked sent: the relay publishes the row again after the grace period,
    and the second copy changes nothing."""
    sku = make_product(stock=5, price_cents=300)
    marker = arm("orchestrator.after_publish")
    placed = place(api, order_body(sku, quantity=1))
    wait_until(lambda: not marker.exists(), what="the fail point to fire")
    view = wait_final(api, placed["order_id"])
    assert view["status"] == "confirmed"
    wait_until(lambda: unsent(placed["saga_id"]) == 0, what="the relay to send the unmarked row")
    assert effects(placed["saga_id"]) == {"reservations": 1, "charges": 1}
    assert charged(placed["saga_id"]) == 300
    assert product(sku) == {"available": 4, "reserved": 0, "sold": 1}


@pytest.mark.usefixtures("relay_only")
def test_relay_down_and_orchestrator_killed_after_commit(api: Api, system: Processes) -> None:
    """The relay is down, so nothing the orchestrator commits gets sent; then the orchestrator dies
    right after committing a transition. After both restart, the saga completes, once."""
    sku = make_product(stock=5)
    system.kill("relay")
    marker = arm("orchestrator.after_commit")
    placed = place(api, order_body(sku, quantity=2))
    system.start("relay")  # publishes the first command; the reserve reply kills the orchestrator
    wait_until(lambda: not marker.exists(), what="the fail point to fire")
    system.kill("relay")  # the charge command stays committed but unsent
    system.restart("orchestrator", SAGA_OUTBOX_FAST_PATH="0")
    system.start("relay")
    view = wait_final(api, placed["order_id"])
    assert (view["status"], view["saga"]["state"]) == ("confirmed", "completed")
    assert effects(placed["saga_id"]) == {"reservations": 1, "charges": 1}
    assert product(sku) == {"available": 3, "reserved": 0, "sold": 2}


@pytest.mark.usefixtures("relay_only")
def test_relay_killed_after_publishing_before_marking_sent_duplicates_harmlessly(
    api: Api, system: Processes
) -> None:
    sku = make_product(stock=5, price_cents=300)
    marker = arm("relay.after_publish")
    placed = place(api, order_body(sku, quantity=1))
    wait_until(lambda: not marker.exists(), what="the relay fail point to fire")
    wait_until(lambda: not system.alive("relay"), what="the relay to die")
    system.start("relay")  # publishes the same rows again
    view = wait_final(api, placed["order_id"])
    assert view["status"] == "confirmed"
    assert effects(placed["saga_id"]) == {"reservations": 1, "charges": 1}
    assert product(sku) == {"available": 4, "reserved": 0, "sold": 1}
    assert charged(placed["saga_id"]) == 300


@pytest.mark.usefixtures("relay_only")
def test_the_sweeper_sends_what_the_relay_left_unsent(api: Api, system: Processes) -> None:
    sku = make_product(stock=5)
    system.kill("relay")
    placed = place(api, order_body(sku))
    view = wait_final(api, placed["order_id"], timeout_s=30)  # beat's sweep publishes stale rows
    assert view["status"] == "confirmed"
    system.start("relay")


def test_the_orchestrator_killed_mid_run_loses_no_saga(api: Api, system: Processes) -> None:
    sku = make_product(stock=100)
    placed = [place(api, order_body(sku)) for _ in range(20)]
    wait_until(
        lambda: steps_in([p["saga_id"] for p in placed], ("succeeded",)) > 0,
        what="a reply applied by the orchestrator",
    )
    system.restart("orchestrator")
    views = api.wait_final([p["order_id"] for p in placed], timeout_s=60)
    assert {v["status"] for v in views.values()} == {"confirmed"}
    assert product(sku)["sold"] == 20


def test_a_reply_delivered_twice_makes_one_transition(api: Api, system: Processes) -> None:
    sku = make_product(stock=5)
    placed = place(api, order_body(sku))
    before = wait_final(api, placed["order_id"])
    with transaction() as session:
        envelope = session.scalar(
            sa.text(
                "SELECT envelope FROM outbox WHERE saga_id = :s AND task = 'inventory.reserve'"
            ),
            {"s": placed["saga_id"]},
        )
    command = parse_command(envelope)
    reply = make_reply(command, 1, ReplyPayload(outcome=ReplyOutcome.SUCCEEDED))
    failed = make_reply(
        command, 1, ReplyPayload(outcome=ReplyOutcome.FAILED, reason="out_of_stock")
    )
    orchestrator_log = LogCursor.at_end(system, "orchestrator")
    for duplicate in (reply, reply, failed):
        celery_app.send_task("saga.reply", args=[duplicate])
    # Each of the three was received and fenced off by its request id...
    orchestrator_log.wait_for(f"saga_id={placed['saga_id']}", "ignored (not awaited", count=3)
    after = api.order(placed["order_id"])  # ...and changed nothing
    assert after["saga"] == before["saga"]
    assert after["status"] == "confirmed"


def test_a_worker_killed_while_busy_finishes_every_saga_once(api: Api, system: Processes) -> None:
    sku = make_product(stock=100)
    placed = [place(api, order_body(sku, token="tok_visa")) for _ in range(15)]
    wait_until(
        lambda: steps_in([p["saga_id"] for p in placed], ("running",), "payment.charge") > 0,
        what="a charge dispatched to the payment worker",
    )
    system.restart("payment")
    views = api.wait_final([p["order_id"] for p in placed], timeout_s=90)
    assert {v["status"] for v in views.values()} == {"confirmed"}
    for p in placed:
        assert effects(p["saga_id"]) == {"reservations": 1, "charges": 1}
    assert product(sku) == {"available": 85, "reserved": 0, "sold": 15}


def test_unknown_order_ids_are_random_uuids(api: Api) -> None:
    response = api.session.get(
        f"{api.url}/orders/{uuid.uuid4()}", headers={"Accept": "application/json"}
    )
    assert response.status_code == 404
