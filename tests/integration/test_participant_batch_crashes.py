"""A participant's batch consumer killed at each boundary of a batch, with many sagas in flight:
every saga still ends as it should, each effect applied once.

The fail points are armed with ``batch>=2``: they fire only in a batch of two commands or more, so
their firing is itself the evidence that batches happened. Each death is a real SIGKILL of the
pool process whose consumer thread reached the point (Celery's parent starts another one); the
broker then delivers that consumer's unacked messages again.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from models.db import transaction
from orchestrator.proof.client import Api
from orchestrator.proof.harness import Processes
from tests.integration.helpers import LogCursor, make_product, order_body, place, product
from tests.integration.test_crashes import arm, effects, wait_until

IN_FLIGHT = 40  # sagas placed at once: enough that commands wait for a busy consumer


def place_many(api: Api, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda body: place(api, body), bodies))


def charges_of(saga_ids: list[str]) -> list[tuple[str, int]]:
    with transaction() as session:
        rows = session.execute(
            sa.text(
                "SELECT status, count(*) FROM charges WHERE saga_id = ANY(CAST(:s AS uuid[]))"
                " GROUP BY status"
            ),
            {"s": saga_ids},
        )
        return sorted((str(status), int(n)) for status, n in rows)


@pytest.fixture
def disarm() -> Iterator[list[Path]]:
    """Markers a test armed; one that never fired must not fire in a later test."""
    armed: list[Path] = []
    yield armed
    for marker in armed:
        marker.unlink(missing_ok=True)


def wait_for_the_kill(marker: Path, log: LogCursor) -> None:
    wait_until(lambda: not marker.exists(), timeout_s=90, what=f"{marker.name} to fire")
    assert log.lines("commands applied in one transaction"), "no batch of more than one"


@pytest.mark.parametrize("point", ["payment.before_publish", "payment.after_publish"])
def test_payment_killed_between_its_batch_commit_and_its_acks_charges_each_saga_once(
    api: Api, system: Processes, disarm: list[Path], point: str
) -> None:
    """before_publish: the charges are committed, no reply sent; after_publish: the replies are
    out, no message acked. Either way the batch is delivered again, finds each charge recorded
    and replies it (a duplicate reply is fenced by its request id)."""
    sku = make_product(stock=IN_FLIGHT, price_cents=250)
    log = LogCursor.at_end(system, "payment")
    disarm.append(marker := arm(point, in_batch_of=2))
    placed = place_many(api, [order_body(sku) for _ in range(IN_FLIGHT)])
    wait_for_the_kill(marker, log)
    views = api.wait_final([p["order_id"] for p in placed], timeout_s=180)
    assert {(v["status"], v["saga"]["state"]) for v in views.values()} == {
        ("confirmed", "completed")
    }
    saga_ids = [p["saga_id"] for p in placed]
    assert charges_of(saga_ids) == [("charged", IN_FLIGHT)]
    for saga_id in saga_ids:
        assert effects(saga_id) == {"reservations": 1, "charges": 1}
    assert product(sku) == {"available": 0, "reserved": 0, "sold": IN_FLIGHT}
    assert log.lines("changed nothing", "redelivered"), "the batch was never delivered again"


def test_inventory_killed_mid_batch_in_a_stock_race_oversells_nothing(
    api: Api, system: Processes, disarm: list[Path]
) -> None:
    """More orders than stock, and the inventory consumer dies halfway through applying a batch,
    before its commit: nothing of that batch stays, it is delivered again, and exactly the stock
    there is gets sold; every other order is cancelled out of stock, without a charge."""
    stock = 12
    sku = make_product(stock=stock)
    log = LogCursor.at_end(system, "inventory")
    disarm.append(marker := arm("inventory.mid_batch", in_batch_of=2))
    placed = place_many(api, [order_body(sku) for _ in range(IN_FLIGHT)])
    wait_until(lambda: not marker.exists(), timeout_s=90, what="inventory.mid_batch to fire")
    views = api.wait_final([p["order_id"] for p in placed], timeout_s=180)
    finals = sorted((v["status"], v["reason"]) for v in views.values())
    assert (
        finals
        == [("cancelled", "out_of_stock")] * (IN_FLIGHT - stock) + [("confirmed", None)] * stock
    )
    saga_ids = [p["saga_id"] for p in placed]
    assert charges_of(saga_ids) == [("charged", stock)]
    for saga_id in saga_ids:
        assert effects(saga_id)["reservations"] == 1
    assert product(sku) == {"available": 0, "reserved": 0, "sold": stock}
    assert log.lines("commands applied in one transaction"), "no batch of more than one"


def test_orders_killed_after_its_batch_commit_confirms_each_order_once(
    api: Api, system: Processes, disarm: list[Path]
) -> None:
    """The pivot's batch (reserved -> sold for many orders at once) committed, then its consumer
    dies before replying: on redelivery no stock moves twice."""
    sku = make_product(stock=IN_FLIGHT * 2)
    log = LogCursor.at_end(system, "orders")
    disarm.append(marker := arm("orders.before_publish", in_batch_of=2))
    placed = place_many(api, [order_body(sku, quantity=2) for _ in range(IN_FLIGHT)])
    wait_for_the_kill(marker, log)
    views = api.wait_final([p["order_id"] for p in placed], timeout_s=180)
    assert {v["status"] for v in views.values()} == {"confirmed"}
    assert product(sku) == {"available": 0, "reserved": 0, "sold": IN_FLIGHT * 2}
