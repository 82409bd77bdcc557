"""The operator's commands against the session's database: seed, restock, prune, audit."""

from __future__ import annotations

import json
import subprocess
import uuid

import sqlalchemy as sa

from models.db import get_engine, transaction
from orchestrator.ops.processes import sagactl
from orchestrator.proof.client import Api
from orchestrator.proof.harness import Processes, free_port
from tests.integration.helpers import (
    add_dead_letter,
    make_product,
    order_body,
    place,
    product,
    wait_final,
)


def run(system: Processes, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sagactl(*args), env=system.box.env(), capture_output=True, text=True, timeout=120
    )


def test_seed_is_idempotent_and_never_resets_stock(api: Api, system: Processes) -> None:
    view = wait_final(api, place(api, order_body("SKU-APPLE"))["order_id"])
    assert view["status"] == "confirmed"
    before = product("SKU-APPLE")
    result = run(system, "seed")
    assert result.returncode == 0 and "0 product(s) created" in result.stdout
    assert product("SKU-APPLE") == before


def test_restock_adds_stock_and_refuses_an_unknown_sku(system: Processes) -> None:
    sku = make_product(stock=2)
    assert run(system, "restock", sku, "5").returncode == 0
    assert product(sku)["available"] == 7
    unknown = run(system, "restock", "SKU-NOPE", "5")
    assert unknown.returncode == 2 and "unknown sku" in unknown.stderr
    assert run(system, "restock", sku, "0").returncode == 2  # a click usage error


def test_prune_removes_only_what_is_old_and_resolved(api: Api, system: Processes) -> None:
    """Gone: sent outbox rows, resolved dead letters and idempotency keys older than the cut-off.
    Kept: everything younger, dead letters not resolved (however old), outbox rows never sent."""
    old_key, young_key = f"prune-{uuid.uuid4()}", f"prune-{uuid.uuid4()}"
    old = place(api, order_body(make_product(stock=3)), old_key)
    young = place(api, order_body(make_product(stock=3)), young_key)
    wait_final(api, old["order_id"])
    wait_final(api, young["order_id"])
    with transaction() as session:
        session.execute(
            sa.text(
                "UPDATE idempotency_keys SET created_at = now() - interval '40 days' WHERE key = :k"
            ),
            {"k": old_key},
        )
        session.execute(
            sa.text("UPDATE outbox SET sent_at = now() - interval '40 days' WHERE saga_id = :s"),
            {"s": old["saga_id"]},
        )
        young_rows = session.scalars(
            sa.text("SELECT id FROM outbox WHERE saga_id = :s ORDER BY id"),
            {"s": young["saga_id"]},
        ).all()
    letters = {
        "old_resolved": add_dead_letter(None, "discarded", age_days=40),
        "old_replayed": add_dead_letter(None, "replayed", age_days=40),
        "old_dead": add_dead_letter(None, "dead", age_days=40),
        "young_resolved": add_dead_letter(None, "discarded", age_days=1),
    }
    never_sent = young_rows[0]  # made 40 days old and unsent; held, so the relay leaves it be
    with transaction() as session:
        sent_at = session.scalar(
            sa.text("SELECT sent_at FROM outbox WHERE id = :i"), {"i": never_sent}
        )
    try:
        with get_engine().connect() as hold:
            hold.execute(
                sa.text("SELECT 1 FROM outbox WHERE id = :i FOR KEY SHARE"), {"i": never_sent}
            )
            with transaction() as session:
                session.execute(
                    sa.text(
                        "UPDATE outbox SET sent_at = NULL, created_at = now() - interval '40 days'"
                        " WHERE id = :i"
                    ),
                    {"i": never_sent},
                )
            result = run(system, "prune", "--older-than", "30", "--json")
            hold.rollback()
        assert result.returncode == 0, result.stderr
        removed = json.loads(result.stdout)
        assert removed["idempotency_keys"] >= 1 and removed["outbox"] >= 3
        assert removed["dead_letters"] >= 2
        with transaction() as session:

            def count(sql: str, **params: object) -> int:
                return int(session.scalar(sa.text(sql), params) or 0)

            outbox = "SELECT count(*) FROM outbox WHERE saga_id = :s"
            assert count(outbox, s=old["saga_id"]) == 0
            assert count(outbox, s=young["saga_id"]) == len(young_rows)  # the unsent one too
            keys = "SELECT count(*) FROM idempotency_keys WHERE key = :k"
            assert (count(keys, k=old_key), count(keys, k=young_key)) == (0, 1)
            left = set(
                session.scalars(
                    sa.text("SELECT id FROM dead_letters WHERE id = ANY(:i)"),
                    {"i": list(letters.values())},
                )
            )
        assert left == {letters["old_dead"], letters["young_resolved"]}
    finally:
        with transaction() as session:
            session.execute(
                sa.text("UPDATE outbox SET sent_at = :t WHERE id = :i"),
                {"i": never_sent, "t": sent_at},
            )
            session.execute(
                sa.text("DELETE FROM dead_letters WHERE id = ANY(:i)"),
                {"i": list(letters.values())},
            )


def test_audit_reports_a_breach_by_order_and_exits_1(system: Processes) -> None:
    sku = make_product(stock=4)
    clean = run(system, "audit", "--json")
    assert clean.returncode == 0, clean.stdout
    with transaction() as session:  # break invariant 1 on purpose, then put it back
        session.execute(sa.text("ALTER TABLE products DROP CONSTRAINT ck_products_stock_balances"))
        session.execute(
            sa.text("UPDATE products SET available = available + 1 WHERE sku = :s"), {"s": sku}
        )
    try:
        broken = run(system, "audit", "--json")
        assert broken.returncode == 1
        report = json.loads(broken.stdout)
        assert not report["ok"]
        assert [v["invariant"] for v in report["violations"]] == [1]
        assert sku in report["violations"][0]["detail"]
    finally:
        with transaction() as session:
            session.execute(
                sa.text("UPDATE products SET available = available - 1 WHERE sku = :s"), {"s": sku}
            )
            session.execute(
                sa.text(
                    "ALTER TABLE products ADD CONSTRAINT ck_products_stock_balances"
                    " CHECK (available + reserved + sold = stock_total)"
                )
            )


def test_an_unreachable_broker_is_exit_3_in_one_line(system: Processes) -> None:
    port = free_port()  # nothing listens there
    env = system.box.env(BROKER_URL=f"amqp://guest:hunter2@127.0.0.1:{port}//")
    result = subprocess.run(
        sagactl("dlq", "replay", "1"), env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cannot reach the broker at amqp://guest:")
    assert f"@127.0.0.1:{port}//" in lines[0] and "hunter2" not in lines[0]
