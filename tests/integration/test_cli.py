"""The operator's commands against the session's database: seed, restock, prune, audit."""

from __future__ import annotations

import json
import subprocess
import uuid

import sqlalchemy as sa

from models.db import transaction
from orchestrator.ops.processes import sagactl
from orchestrator.proof.client import Api
from orchestrator.proof.harness import Processes
from tests.integration.helpers import make_product, order_body, place, product, wait_final


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
    key = f"prune-{uuid.uuid4()}"
    placed = place(api, order_body(make_product(stock=3)), key)
    wait_final(api, placed["order_id"])
    with transaction() as session:
        session.execute(
            sa.text(
                "UPDATE idempotency_keys SET created_at = now() - interval '40 days' WHERE key = :k"
            ),
            {"k": key},
        )
        session.execute(
            sa.text("UPDATE outbox SET sent_at = now() - interval '40 days' WHERE saga_id = :s"),
            {"s": placed["saga_id"]},
        )
    result = run(system, "prune", "--older-than", "30", "--json")
    assert result.returncode == 0, result.stderr
    removed = json.loads(result.stdout)
    assert removed["idempotency_keys"] >= 1 and removed["outbox"] >= 3
    with transaction() as session:
        left = session.scalar(
            sa.text("SELECT count(*) FROM outbox WHERE saga_id = :s"), {"s": placed["saga_id"]}
        )
    assert left == 0


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
