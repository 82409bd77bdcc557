"""Every invariant of ``sagactl audit`` and every check of ``sagactl chaos`` can fire: each test
breaks one on purpose with a direct SQL change in the session's sandbox, shows that it is named
(invariant, order), and puts the data back.

A broken saga could be "repaired" by the sweeper while a test looks at it (a running saga past its
deadline is what it acts on); a broken outbox row would be re-sent by the relay. Both take their
rows with ``FOR UPDATE SKIP LOCKED``, so a test holds a ``FOR KEY SHARE`` lock on the rows it broke:
they are skipped, while the audit's plain reads still see the change.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from kombu import Connection, Producer, Queue

from models.db import get_engine, transaction
from orchestrator.ops.config import settings
from orchestrator.ops.processes import sagactl
from orchestrator.proof.chaos import checks as chaos_checks
from orchestrator.proof.chaos.load import Ledger
from orchestrator.proof.client import Api
from orchestrator.proof.harness import Processes
from tests.integration.helpers import add_dead_letter, make_product, order_body, place, wait_final

Sql = tuple[str, dict[str, Any]]


@pytest.fixture(scope="module")
def confirmed(system: Processes) -> dict[str, str]:
    """One confirmed order of the module's own: its order, saga and product."""
    api = Api.connect(system.url)
    sku = make_product(stock=5, price_cents=150)
    placed = place(api, order_body(sku, quantity=2))
    assert wait_final(api, placed["order_id"])["status"] == "confirmed"
    return {**placed, "sku": sku}


@pytest.fixture(scope="module")
def cancelled(system: Processes) -> dict[str, str]:
    """One order cancelled after a declined card: charge declined, reservation released."""
    api = Api.connect(system.url)
    sku = make_product(stock=5)
    placed = place(api, order_body(sku, token="tok_chargeDeclined"))
    view = wait_final(api, placed["order_id"])
    assert (view["status"], view["reason"]) == ("cancelled", "payment_declined")
    return {**placed, "sku": sku}


def execute(*statements: Sql) -> list[Any]:
    """Run the statements in one transaction; the first column of each one's first row, if any."""
    out = []
    with transaction() as session:
        for sql, params in statements:
            result = session.execute(sa.text(sql), params)
            out.append(result.scalar() if result.returns_rows else None)
    return out


@contextmanager
def held(table: str, ids: list[Any]) -> Iterator[None]:
    """``FOR KEY SHARE`` on rows of ``table``: the sweeper and the relay skip them."""
    with get_engine().connect() as conn:
        conn.execute(
            sa.text(f"SELECT 1 FROM {table} WHERE id = ANY(:ids) FOR KEY SHARE"), {"ids": ids}
        )
        try:
            yield
        finally:
            conn.rollback()


@contextmanager
def broken(change: list[Sql], restore: list[Sql]) -> Iterator[list[Any]]:
    """Commit ``change``; always commit ``restore`` afterwards."""
    try:
        yield execute(*change)
    finally:
        execute(*restore)


def audit(system: Processes) -> tuple[int, dict[str, Any]]:
    result = subprocess.run(
        sagactl("audit", "--json"),
        env=system.box.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def assert_breach(system: Processes, invariant: int, order_id: str) -> list[dict[str, Any]]:
    """The audit exits 1 and names exactly this invariant for exactly this order."""
    code, report = audit(system)
    assert (code, report["ok"]) == (1, False), report
    named = [(v["invariant"], v["order_id"]) for v in report["violations"]]
    assert named == [(invariant, order_id)], report["violations"]
    violations: list[dict[str, Any]] = report["violations"]
    return violations


def assert_clean(system: Processes) -> dict[str, Any]:
    code, report = audit(system)
    assert (code, report["ok"], report["violations"]) == (0, True, []), report
    return report


# ---------------------------------------------------------------- sagactl audit, invariants 2-6

S = "saga_id = :s"


@pytest.mark.parametrize(
    ("change", "restore", "said"),
    [
        (
            "UPDATE charges SET status = 'refunded' WHERE " + S,
            "UPDATE charges SET status = 'charged' WHERE " + S,
            "charge refunded",
        ),
        (
            "UPDATE charges SET amount_cents = amount_cents + 1 WHERE " + S,
            "UPDATE charges SET amount_cents = amount_cents - 1 WHERE " + S,
            "charge charged of 301",
        ),
        (
            "UPDATE reservations SET status = 'reserved' WHERE " + S,
            "UPDATE reservations SET status = 'sold' WHERE " + S,
            "reservation reserved",
        ),
    ],
    ids=["refunded", "another_amount", "stock_not_sold"],
)
def test_invariant_2_a_confirmed_order_without_its_one_charge_or_its_stock_sold(
    system: Processes, confirmed: dict[str, str], change: str, restore: str, said: str
) -> None:
    assert_clean(system)
    params = {"s": confirmed["saga_id"]}
    with broken([(change, params)], [(restore, params)]):
        [violation] = assert_breach(system, 2, confirmed["order_id"])
        assert said in violation["detail"]
    assert_clean(system)


@pytest.mark.parametrize(
    ("change", "restore"),
    [
        (
            "UPDATE charges SET status = 'charged' WHERE " + S,
            "UPDATE charges SET status = 'declined' WHERE " + S,
        ),
        (
            "UPDATE reservations SET status = 'reserved' WHERE " + S,
            "UPDATE reservations SET status = 'released' WHERE " + S,
        ),
    ],
    ids=["charge_kept", "reservation_kept"],
)
def test_invariant_3_a_cancelled_order_with_a_charge_or_a_reservation(
    system: Processes, cancelled: dict[str, str], change: str, restore: str
) -> None:
    params = {"s": cancelled["saga_id"]}
    with broken([(change, params)], [(restore, params)]):
        assert_breach(system, 3, cancelled["order_id"])
    assert_clean(system)


@pytest.mark.parametrize(
    ("table", "column", "value", "original"),
    [
        ("sagas", "state", "compensated", "completed"),  # confirmed, yet compensated
        ("orders", "status", "pending", "confirmed"),  # pending, yet its saga is final
        ("orders", "status", "failed", "confirmed"),  # failed, yet its saga completed
    ],
    ids=["confirmed_but_compensated", "pending_but_completed", "failed_but_completed"],
)
def test_invariant_4_the_order_status_disagrees_with_its_saga(
    system: Processes,
    confirmed: dict[str, str],
    table: str,
    column: str,
    value: str,
    original: str,
) -> None:
    key = {"sagas": confirmed["saga_id"], "orders": confirmed["order_id"]}[table]
    sql = f"UPDATE {table} SET {column} = :v WHERE id = :k"
    with broken([(sql, {"v": value, "k": key})], [(sql, {"v": original, "k": key})]):
        [violation] = assert_breach(system, 4, confirmed["order_id"])
        assert value in violation["detail"]
    assert_clean(system)


@contextmanager
def dead_letters(*saga_ids: str | None) -> Iterator[list[int]]:
    """Dead letters naming these sagas (or none), deleted afterwards."""
    letters = [add_dead_letter(saga_id) for saga_id in saga_ids]
    try:
        yield letters
    finally:
        execute(("DELETE FROM dead_letters WHERE id = ANY(:i)", {"i": letters}))


def test_invariant_5_a_dead_letter_left_dead_on_a_completed_saga(
    system: Processes, confirmed: dict[str, str]
) -> None:
    with dead_letters(confirmed["saga_id"]) as [letter]:
        [violation] = assert_breach(system, 5, confirmed["order_id"])
        assert f"dead letter {letter}" in violation["detail"]
        # Resolved (replayed or discarded), the same letter is accounted for.
        execute(("UPDATE dead_letters SET state = 'discarded' WHERE id = :i", {"i": letter}))
        assert_clean(system)


def test_a_dead_letter_naming_no_saga_or_a_missing_one_is_listed_as_an_orphan(
    system: Processes,
) -> None:
    """The contract lists orphans (invariant 5: "one that names none is listed as an orphan");
    they are shown, by id, without being a breach of their own."""
    with dead_letters(None, str(uuid.uuid4())) as letters:
        report = assert_clean(system)
        orphans = {o["id"]: o for o in report["orphan_dead_letters"]}
        assert set(letters) <= set(orphans)
        assert all(orphans[i]["queue"] == "payment" for i in letters)
    assert not set(letters) & {o["id"] for o in audit(system)[1]["orphan_dead_letters"]}


def test_invariant_6_a_saga_past_its_deadline_that_the_sweeper_does_not_act_on(
    system: Processes, confirmed: dict[str, str]
) -> None:
    """Made running (its order pending, so invariant 4 holds) with its current step an hour past
    its deadline, and held so the sweeper cannot act: the audit reports it."""
    saga, order = confirmed["saga_id"], confirmed["order_id"]
    step = "saga_id = :s AND idx = (SELECT current_step FROM sagas WHERE id = :s)"
    [deadline] = execute((f"SELECT deadline_at FROM saga_steps WHERE {step}", {"s": saga}))
    with (
        held("sagas", [uuid.UUID(saga)]),
        broken(
            [
                ("UPDATE sagas SET state = 'running' WHERE id = :s", {"s": saga}),
                ("UPDATE orders SET status = 'pending' WHERE id = :o", {"o": order}),
                (
                    f"UPDATE saga_steps SET deadline_at = now() - interval '1 hour' WHERE {step}",
                    {"s": saga},
                ),
            ],
            [
                (
                    f"UPDATE saga_steps SET deadline_at = :d WHERE {step}",
                    {"s": saga, "d": deadline},
                ),
                ("UPDATE orders SET status = 'confirmed' WHERE id = :o", {"o": order}),
                ("UPDATE sagas SET state = 'completed' WHERE id = :s", {"s": saga}),
            ],
        ),
    ):
        [violation] = assert_breach(system, 6, order)
        assert "past its deadline by 36" in violation["detail"]  # 3600 s and some
    assert_clean(system)


# ---------------------------------------------------------------- sagactl chaos, each check


def check(checks: list[chaos_checks.Check], name: str) -> chaos_checks.Check:
    [found] = [c for c in checks if c.name == name]
    return found


def everything_accepted() -> Ledger:
    """A client's ledger that accepted every order in the database (the checks start clean)."""
    with transaction() as session:
        ids = session.scalars(sa.text("SELECT id::text FROM orders")).all()
    return Ledger(accepted=dict.fromkeys(ids, "test"))


def test_chaos_every_saga_final(confirmed: dict[str, str]) -> None:
    saga = confirmed["saga_id"]
    assert chaos_checks._all_final().ok
    with (
        held("sagas", [uuid.UUID(saga)]),
        broken(
            [("UPDATE sagas SET state = 'compensating' WHERE id = :s", {"s": saga})],
            [("UPDATE sagas SET state = 'completed' WHERE id = :s", {"s": saga})],
        ),
    ):
        found = chaos_checks._all_final()
        assert not found.ok and found.order_ids == (confirmed["order_id"],)
    assert chaos_checks._all_final().ok


def test_chaos_audit_clean(confirmed: dict[str, str]) -> None:
    assert chaos_checks._audit().ok
    params = {"s": confirmed["saga_id"]}
    with broken(
        [("UPDATE charges SET status = 'refunded' WHERE " + S, params)],
        [("UPDATE charges SET status = 'charged' WHERE " + S, params)],
    ):
        found = chaos_checks._audit()
        assert not found.ok and found.order_ids == (confirmed["order_id"],)


def test_chaos_every_accepted_order_present_and_no_unexpected_one(
    confirmed: dict[str, str],
) -> None:
    ledger = everything_accepted()
    assert all(c.ok for c in chaos_checks._orders_present(ledger))
    lost = str(uuid.uuid4())  # the client was told 202 for an order the database lacks
    found = check(
        chaos_checks._orders_present(Ledger(accepted={**ledger.accepted, lost: "test"})),
        "every accepted order present",
    )
    assert not found.ok and found.detail["lost_ids"] == [lost]
    del ledger.accepted[confirmed["order_id"]]  # an order the client never got an answer for
    found = check(chaos_checks._orders_present(ledger), "no unexpected order")
    assert not found.ok and found.order_ids == (confirmed["order_id"],)


def test_chaos_one_order_per_idempotency_key(
    confirmed: dict[str, str], cancelled: dict[str, str]
) -> None:
    ledger = everything_accepted()
    [original] = execute(
        ("SELECT customer_id FROM orders WHERE id = :o", {"o": cancelled["order_id"]})
    )
    sql = "UPDATE orders SET customer_id = :c WHERE id = :o"
    with broken(
        [
            (
                "UPDATE orders SET customer_id = (SELECT customer_id FROM orders WHERE id = :a)"
                " WHERE id = :o",
                {"a": confirmed["order_id"], "o": cancelled["order_id"]},
            )
        ],
        [(sql, {"c": original, "o": cancelled["order_id"]})],
    ):
        found = check(chaos_checks._orders_present(ledger), "one order per idempotency key")
        assert not found.ok and len(found.detail) == 1, found
    assert check(chaos_checks._orders_present(ledger), "one order per idempotency key").ok


EFFECT_BREAKS: dict[str, tuple[str, list[Sql], list[Sql]]] = {
    # check name: (which order, change, restore); :s the saga, :o the order, :k the product
    "a step or compensation succeeded twice": (
        "confirmed",
        [
            (
                "INSERT INTO saga_events (saga_id, event, step, attempt) VALUES"
                " (:s, 'step.succeeded', 'payment.charge', 1) RETURNING id",
                {},
            )
        ],
        [
            (
                "DELETE FROM saga_events WHERE saga_id = :s AND id = (SELECT max(id) FROM saga_events"
                " WHERE saga_id = :s AND event = 'step.succeeded')",
                {},
            )
        ],
    ),
    "a charge or refund of another amount than the order total": (
        "confirmed",
        [("UPDATE charges SET amount_cents = amount_cents + 1 WHERE " + S, {})],
        [("UPDATE charges SET amount_cents = amount_cents - 1 WHERE " + S, {})],
    ),
    "a charge held by an order that is not confirmed or failed": (
        "cancelled",
        [("UPDATE charges SET status = 'charged' WHERE " + S, {})],
        [("UPDATE charges SET status = 'declined' WHERE " + S, {})],
    ),
    "stock held for an order that is not confirmed or failed": (
        "cancelled",
        [("UPDATE reservations SET status = 'reserved' WHERE " + S, {})],
        [("UPDATE reservations SET status = 'released' WHERE " + S, {})],
    ),
    "product buckets differ from the reservations": (
        "confirmed",
        [
            (
                "UPDATE products SET available = available - 1, reserved = reserved + 1"
                " WHERE sku = :k",
                {},
            )
        ],
        [
            (
                "UPDATE products SET available = available + 1, reserved = reserved - 1"
                " WHERE sku = :k",
                {},
            )
        ],
    ),
    "stock sold differs from the confirmed orders": (
        "confirmed",
        [("UPDATE products SET available = available - 1, sold = sold + 1 WHERE sku = :k", {})],
        [("UPDATE products SET available = available + 1, sold = sold - 1 WHERE sku = :k", {})],
    ),
}


def test_every_double_effect_query_has_a_break() -> None:
    assert set(EFFECT_BREAKS) == set(chaos_checks.EFFECT_QUERIES)


@pytest.mark.parametrize("name", list(EFFECT_BREAKS))
def test_chaos_no_double_effect(
    name: str, confirmed: dict[str, str], cancelled: dict[str, str]
) -> None:
    which, change, restore = EFFECT_BREAKS[name]
    case = {"confirmed": confirmed, "cancelled": cancelled}[which]
    ids = {"s": case["saga_id"], "o": case["order_id"], "k": case["sku"]}

    def bound(statements: list[Sql]) -> list[Sql]:
        return [(sql, {k: v for k, v in ids.items() if f":{k}" in sql}) for sql, _ in statements]

    title = f"no double effect: {name}"
    assert check(chaos_checks._effects_once(), title).ok
    with broken(bound(change), bound(restore)):
        found = check(chaos_checks._effects_once(), title)
        assert not found.ok, found
        named = found.order_ids or tuple(found.detail)
        assert case["order_id"] in named or any(case["sku"] in d for d in named), found
    assert check(chaos_checks._effects_once(), title).ok


def test_chaos_every_dead_letter_accounted_for(confirmed: dict[str, str]) -> None:
    assert chaos_checks._dead_letters().ok
    with dead_letters(confirmed["saga_id"]) as [letter]:
        found = chaos_checks._dead_letters()
        assert not found.ok and found.order_ids == (confirmed["order_id"],)
        assert f"dead letter {letter}" in found.detail["unaccounted"][0]
    assert chaos_checks._dead_letters().ok


def test_chaos_outbox_fully_sent(confirmed: dict[str, str]) -> None:
    assert chaos_checks._outbox_sent().ok
    [row, sent] = execute(
        ("SELECT min(id) FROM outbox WHERE saga_id = :s", {"s": confirmed["saga_id"]}),
        (
            "SELECT sent_at FROM outbox WHERE id = (SELECT min(id) FROM outbox WHERE saga_id = :s)",
            {"s": confirmed["saga_id"]},
        ),
    )
    with (
        held("outbox", [row]),
        broken(
            [("UPDATE outbox SET sent_at = NULL WHERE id = :i", {"i": row})],
            [("UPDATE outbox SET sent_at = :t WHERE id = :i", {"i": row, "t": sent})],
        ),
    ):
        found = chaos_checks._outbox_sent()
        assert not found.ok and found.detail == {"unsent": 1}
    assert chaos_checks._outbox_sent().ok


def test_chaos_queues_drained(system: Processes) -> None:
    vhost = system.box.name
    queue = Queue(f"probe-{uuid.uuid4().hex[:8]}", durable=False)  # no consumer
    with Connection(settings().broker_url) as conn:
        channel = conn.channel()
        bound = queue(channel)
        bound.declare()
        try:
            Producer(channel).publish(b"left behind", routing_key=queue.name, declare=[])
            found = chaos_checks.queues_drained(vhost, wait_s=2)
            assert not found.ok and found.detail[queue.name] == {"ready": 1, "unacked": 0}
        finally:
            bound.delete()
