"""A batch of commands applied in one transaction: stock races decided per saga on one locked
row, refusals and successes side by side, duplicates replayed, a failing batch applied alone."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

import workers.inventory
import workers.payment  # registers the payment handlers
from models.db import transaction
from orchestrator.messaging.envelopes import (
    ChargePayload,
    CommandPayload,
    OrderPayload,
    ReplyOutcome,
    ReservePayload,
    RetrySpec,
    make_command,
    parse_command,
)
from tests.integration.helpers import make_product, product
from workers.applying import Incoming, Verdict, apply_alone, apply_batch

RETRY = RetrySpec(attempts=3, base_s=0.05, max_s=0.2)


def command(name: str, payload: CommandPayload, saga_id: uuid.UUID | None = None) -> Incoming:
    envelope = make_command(
        name,
        saga_id=saga_id or uuid.uuid4(),
        request_id=uuid.uuid4(),
        step=name,
        attempt=1,
        payload=payload,
    )
    return Incoming(parse_command(envelope))


def reserve(sku: str, quantity: int = 1, saga_id: uuid.UUID | None = None, **more: Any) -> Incoming:
    items = [{"sku": sku, "quantity": quantity}, *more.get("extra", [])]
    payload = ReservePayload(order_id=uuid.uuid4(), items=items, retry=RETRY)  # type: ignore[arg-type]
    return command("inventory.reserve", payload, saga_id)


def release(saga_id: uuid.UUID) -> Incoming:
    return command("inventory.release", OrderPayload(order_id=uuid.uuid4(), retry=RETRY), saga_id)


def charge(token: str = "tok_visa", cents: int = 500) -> Incoming:
    payload = ChargePayload(
        order_id=uuid.uuid4(), amount_cents=cents, card_token=token, retry=RETRY
    )
    return command("payment.charge", payload)


def outcomes(verdicts: list[Verdict]) -> list[tuple[str, str | None]]:
    assert all(v.reply is not None and v.error is None for v in verdicts), verdicts
    return [(v.reply.outcome.value, v.reply.reason) for v in verdicts if v.reply is not None]


def reservation_status(saga_id: uuid.UUID) -> str | None:
    with transaction() as session:
        return session.scalar(
            sa.text("SELECT status FROM reservations WHERE saga_id = :s"), {"s": saga_id}
        )


def test_a_stock_race_in_one_batch_reserves_exactly_what_there_is() -> None:
    """Thirty reservations of a product with seven units: the first seven (in delivery order)
    succeed, every other is refused out of stock, and the stock never goes negative."""
    sku = make_product(stock=7)
    batch = [reserve(sku) for _ in range(30)]
    verdicts = apply_batch(batch)
    assert outcomes(verdicts) == [("succeeded", None)] * 7 + [("failed", "out_of_stock")] * 23
    assert product(sku) == {"available": 0, "reserved": 7, "sold": 0}
    statuses = [reservation_status(i.command.saga_id) for i in batch]
    assert statuses == ["reserved"] * 7 + ["rejected"] * 23


def test_a_scarce_product_is_written_once_per_batch() -> None:
    """Many reservations of one product: one UPDATE of its row for the whole batch."""
    sku = make_product(stock=50)
    updates: list[str] = []
    from models.db import get_engine

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE PRODUCTS"):
            updates.append(statement)

    sa.event.listen(get_engine(), "before_cursor_execute", count)
    try:
        apply_batch([reserve(sku, 2) for _ in range(20)])
    finally:
        sa.event.remove(get_engine(), "before_cursor_execute", count)
    assert len(updates) == 1
    assert product(sku) == {"available": 10, "reserved": 40, "sold": 0}


def test_a_reservation_of_several_lines_is_all_or_nothing_within_the_batch() -> None:
    """An order short of one line moves none of its lines, and the next order still gets them."""
    plenty, scarce = make_product(stock=10), make_product(stock=1)
    first = reserve(scarce, 1)
    short = reserve(plenty, 3, extra=[{"sku": scarce, "quantity": 1}])
    after = reserve(plenty, 4)
    assert outcomes(apply_batch([first, short, after])) == [
        ("succeeded", None),
        ("failed", "out_of_stock"),
        ("succeeded", None),
    ]
    assert product(plenty) == {"available": 6, "reserved": 4, "sold": 0}
    assert product(scarce) == {"available": 0, "reserved": 1, "sold": 0}


def test_successes_and_refusals_mix_in_one_batch_of_charges() -> None:
    batch = [charge(), charge("tok_chargeDeclined"), charge(cents=700), charge("tok_other")]
    assert outcomes(apply_batch(batch)) == [
        ("succeeded", None),
        ("failed", "payment_declined"),
        ("succeeded", None),
        ("failed", "payment_declined"),
    ]
    with transaction() as session:
        rows = session.execute(
            sa.text("SELECT status, amount_cents FROM charges WHERE saga_id = ANY(:s)"),
            {"s": [i.command.saga_id for i in batch]},
        ).all()
    assert sorted(map(tuple, rows)) == [
        ("charged", 500),
        ("charged", 700),
        ("declined", 500),
        ("declined", 500),
    ]


def test_a_duplicate_in_the_same_batch_replays_the_recorded_outcome() -> None:
    """A redelivered copy beside its original: one effect, both answered with the same outcome."""
    sku = make_product(stock=1)
    saga = uuid.uuid4()
    original = reserve(sku, saga_id=saga)
    copy = Incoming(original.command, redelivered=True)
    refused = reserve(sku)
    refused_copy = Incoming(refused.command, redelivered=True)
    verdicts = apply_batch([original, copy, refused, refused_copy])
    assert outcomes(verdicts) == [
        ("succeeded", None),
        ("succeeded", None),
        ("failed", "out_of_stock"),
        ("failed", "out_of_stock"),
    ]
    assert product(sku) == {"available": 0, "reserved": 1, "sold": 0}
    # ...and a later batch with the same commands changes nothing either.
    assert outcomes(apply_batch([copy, refused_copy])) == outcomes(verdicts)[1::2]
    assert product(sku) == {"available": 0, "reserved": 1, "sold": 0}


def test_a_release_in_the_batch_of_its_reserve_gives_the_stock_back() -> None:
    """Compensation and action of different sagas in one batch, and a release that fences a
    reserve not seen yet (which then arrives in a later batch and is refused)."""
    sku = make_product(stock=2)
    held, late = uuid.uuid4(), uuid.uuid4()
    assert (
        outcomes(apply_batch([reserve(sku, 2, saga_id=held), release(held), release(late)]))[:3]
        == [("succeeded", None)] * 3
    )
    assert product(sku) == {"available": 2, "reserved": 0, "sold": 0}
    assert outcomes(apply_batch([reserve(sku, 1, saga_id=late)])) == [
        ("failed", "fenced: released before this reserve arrived")
    ]
    assert product(sku) == {"available": 2, "reserved": 0, "sold": 0}


def test_concurrent_batches_on_the_same_products_never_oversell() -> None:
    """Two batches at once on two shared products, their lines in opposite orders: the products
    are locked in SKU order, so neither deadlocks, and the stock adds up."""
    a, b = make_product(stock=15), make_product(stock=15)
    first = [reserve(a, 1, extra=[{"sku": b, "quantity": 1}]) for _ in range(10)]
    second = [reserve(b, 1, extra=[{"sku": a, "quantity": 1}]) for _ in range(10)]
    results: dict[str, list[Verdict]] = {}
    threads = [
        threading.Thread(target=lambda k=k, batch=batch: results.__setitem__(k, apply_batch(batch)))
        for k, batch in (("first", first), ("second", second))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    won = sum(o == ("succeeded", None) for k in results for o in outcomes(results[k]))
    assert won == 15
    assert product(a) == product(b) == {"available": 0, "reserved": 15, "sold": 0}


def test_a_batch_that_cannot_commit_fails_as_a_whole_and_each_command_then_applies_alone() -> None:
    """An unknown product's release cannot be written (no such row): the batch raises, nothing of
    it stays, and alone the others go through while the bad one is a dead letter."""
    sku = make_product(stock=5)
    good = [reserve(sku) for _ in range(3)]
    bad_saga = uuid.uuid4()
    with transaction() as session:
        session.execute(
            sa.text(
                "INSERT INTO reservations (saga_id, order_id, status, lines) VALUES"
                " (:s, :o, 'reserved', CAST(:l AS jsonb))"
            ),
            {"s": bad_saga, "o": uuid.uuid4(), "l": '[{"sku": "SKU-NOPE", "quantity": 1}]'},
        )
    batch = [*good, release(bad_saga)]
    with pytest.raises(LookupError):
        apply_batch(batch)
    assert product(sku) == {"available": 5, "reserved": 0, "sold": 0}
    alone = [apply_alone(i) for i in batch]
    assert [v.reply.outcome for v in alone[:3] if v.reply] == [ReplyOutcome.SUCCEEDED] * 3
    assert alone[3].reply is None and isinstance(alone[3].error, LookupError)
    assert product(sku) == {"available": 2, "reserved": 3, "sold": 0}


def test_workers_inventory_is_the_registered_module() -> None:
    assert workers.inventory.reserve.name == "inventory.reserve"
