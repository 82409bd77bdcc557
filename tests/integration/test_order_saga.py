"""The order saga end to end: real web, relay, orchestrator and participant worker processes."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import sqlalchemy as sa

from models.db import transaction
from models.outbox import OutboxMessage
from orchestrator.messaging.topology import SERVICES
from orchestrator.proof.client import Api
from orchestrator.proof.harness import Processes
from tests.conftest import TEST_TIMINGS
from tests.integration.helpers import (
    LogCursor,
    events,
    make_product,
    order_body,
    place,
    product,
    wait_final,
)


def test_an_order_confirms_and_its_stock_is_sold(api: Api) -> None:
    sku = make_product(stock=5, price_cents=250)
    placed = place(api, order_body(sku, quantity=2))
    view = wait_final(api, placed["order_id"])
    assert (view["status"], view["reason"], view["saga"]["state"]) == (
        "confirmed",
        None,
        "completed",
    )
    assert view["total_cents"] == 500
    assert product(sku) == {"available": 3, "reserved": 0, "sold": 2}
    assert [s["status"] for s in view["saga"]["steps"]] == ["succeeded"] * 4
    assert events(view) == [
        ("saga.started", None),
        ("step.dispatched", "inventory.reserve"),
        ("step.succeeded", "inventory.reserve"),
        ("step.dispatched", "payment.charge"),
        ("step.succeeded", "payment.charge"),
        ("step.dispatched", "orders.confirm"),
        ("step.succeeded", "orders.confirm"),
        ("saga.completed", None),
    ]


def test_commands_go_out_on_the_fast_path_and_are_marked_sent(
    api: Api, system: Processes
) -> None:
    """With the relay down, the web and the orchestrator publish their own rows: each is marked
    sent with a publish time earlier than the sweep could have taken it (rows older than the
    grace period plus a sweep interval)."""
    system.kill("relay")
    try:
        placed = place(api, order_body(make_product(stock=5)))
        wait_final(api, placed["order_id"])
    finally:
        system.start("relay")
    grace_s = float(TEST_TIMINGS["SAGA_OUTBOX_GRACE_S"])

    def rows() -> list[tuple[str, float | None]]:
        with transaction() as session:
            return [
                (task, None if sent is None else (sent - created).total_seconds())
                for task, created, sent in session.execute(
                    sa.select(OutboxMessage.task, OutboxMessage.created_at, OutboxMessage.sent_at)
                    .where(OutboxMessage.saga_id == uuid.UUID(placed["saga_id"]))
                    .order_by(OutboxMessage.id)
                )
            ]

    deadline = time.monotonic() + 5
    while any(age is None for _, age in rows()) and time.monotonic() < deadline:
        time.sleep(0.1)
    sent = rows()
    assert [task for task, _ in sent] == ["inventory.reserve", "payment.charge", "orders.confirm"]
    assert all(age is not None and 0 <= age < grace_s for _, age in sent), sent


def test_an_order_over_stock_is_cancelled_with_nothing_reserved(api: Api) -> None:
    sku = make_product(stock=3)
    view = wait_final(api, place(api, order_body(sku, quantity=4))["order_id"])
    assert (view["status"], view["reason"], view["saga"]["state"]) == (
        "cancelled",
        "out_of_stock",
        "compensated",
    )
    assert product(sku) == {"available": 3, "reserved": 0, "sold": 0}
    steps = {s["name"]: s for s in view["saga"]["steps"]}
    assert steps["inventory.reserve"]["status"] == "failed"
    assert steps["payment.charge"]["status"] == "skipped"
    # A clean refusal took no effect: only the order is cancelled.
    assert steps["inventory.reserve"]["compensation"]["status"] == "pending"
    assert steps["orders.create"]["compensation"]["status"] == "succeeded"


def test_a_declined_card_releases_stock_then_cancels_the_order(api: Api) -> None:
    sku = make_product(stock=5)
    view = wait_final(
        api, place(api, order_body(sku, quantity=2, token="tok_chargeDeclined"))["order_id"]
    )
    assert (view["status"], view["reason"], view["saga"]["state"]) == (
        "cancelled",
        "payment_declined",
        "compensated",
    )
    assert product(sku) == {"available": 5, "reserved": 0, "sold": 0}
    order = events(view)
    declined = order.index(("step.failed", "payment.charge"))
    released = order.index(("compensation.succeeded", "inventory.release"))
    cancelled = order.index(("compensation.succeeded", "orders.cancel"))
    assert declined < released < cancelled
    assert ("compensation.dispatched", "payment.refund") not in order  # nothing was charged


def test_fifty_concurrent_orders_for_ten_units_confirm_exactly_ten(api: Api) -> None:
    sku = make_product(stock=10)
    with ThreadPoolExecutor(max_workers=16) as pool:
        placed = list(pool.map(lambda _: place(Api.connect(api.url), order_body(sku)), range(50)))
    views = api.wait_final([p["order_id"] for p in placed], timeout_s=120)
    statuses = [v["status"] for v in views.values()]
    assert statuses.count("confirmed") == 10
    assert statuses.count("cancelled") == 40
    assert {v["reason"] for v in views.values() if v["status"] == "cancelled"} == {"out_of_stock"}
    assert product(sku) == {"available": 0, "reserved": 0, "sold": 10}


def test_the_same_idempotency_key_twice_makes_one_order(api: Api) -> None:
    sku = make_product(stock=5)
    key = f"key-{uuid.uuid4()}"
    body = order_body(sku)
    first = api.place(body, key)
    # Same JSON value, other key order: still the same request.
    reordered = {
        "payment": body["payment"],
        "items": body["items"],
        "customer_id": body["customer_id"],
    }
    second = api.place(reordered, key)
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.json()["order_id"] == second.json()["order_id"]
    changed = api.place({**body, "customer_id": "someone-else"}, key)
    assert changed.status_code == 409
    assert changed.json()["error"]["code"] == "idempotency_mismatch"
    wait_final(api, first.json()["order_id"])
    assert product(sku)["sold"] == 1


def test_concurrent_requests_with_one_key_never_make_two_orders(api: Api) -> None:
    sku = make_product(stock=50)
    key = f"race-{uuid.uuid4()}"
    body = order_body(sku)
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda _: Api.connect(api.url).place(body, key), range(8)))
    ids = {r.json()["order_id"] for r in responses if r.status_code in (200, 202)}
    assert len(ids) == 1
    assert all(
        r.status_code in (200, 202) or r.json()["error"]["code"] == "idempotency_in_flight"
        for r in responses
    )
    wait_final(api, ids.pop())
    assert product(sku)["sold"] == 1


def test_every_command_delivered_twice_changes_nothing(api: Api, system: Processes) -> None:
    from orchestrator.messaging.outbox import ConfirmingPublisher, to_wire
    from orchestrator.ops.config import settings

    sku = make_product(stock=5)
    placed = place(api, order_body(sku, quantity=2))
    before = wait_final(api, placed["order_id"])
    assert before["status"] == "confirmed"
    with transaction() as session:
        rows = list(
            session.scalars(
                sa.select(OutboxMessage)
                .where(OutboxMessage.saga_id == uuid.UUID(placed["saga_id"]))
                .order_by(OutboxMessage.id)  # the order they were written in
            )
        )
    assert [r.task for r in rows] == ["inventory.reserve", "payment.charge", "orders.confirm"]
    logs = {name: LogCursor.at_end(system, name) for name in ("orchestrator", *SERVICES)}
    publisher = ConfirmingPublisher(settings().broker_url)
    try:
        publisher.publish([to_wire(r) for r in rows])
    finally:
        publisher.close()
    saga = f"saga_id={placed['saga_id']}"
    for row in rows:  # each participant got its duplicate and found the effect recorded...
        logs[row.queue].wait_for(saga, f"step={row.task}", "changed nothing")
    logs["orchestrator"].wait_for(saga, "ignored (not awaited", count=len(rows))  # ...each reply
    after = api.order(placed["order_id"])
    assert after["saga"] == before["saga"]  # every duplicate reply was fenced off
    assert product(sku) == {"available": 3, "reserved": 0, "sold": 2}
    with transaction() as session:
        charges = session.execute(
            sa.text("SELECT count(*), sum(amount_cents) FROM charges WHERE saga_id = :s"),
            {"s": placed["saga_id"]},
        ).one()
    assert tuple(charges) == (1, 200)

