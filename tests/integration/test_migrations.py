"""Migration 0003 on a database with sagas in it: existing rows become generic sagas of version 1,
and the way back keeps the order sagas."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command

from orchestrator.ops import database
from orchestrator.proof.harness import Sandbox

pytestmark = pytest.mark.own_system


@pytest.fixture
def old_database(sandbox: Sandbox) -> Iterator[str]:
    url = sa.make_url(sandbox.database_url).set(database=f"sagamig_{secrets.token_hex(4)}")
    text = url.render_as_string(hide_password=False)
    database.upgrade(text, revision="0002")
    try:
        yield text
    finally:
        database.drop_database(text)


def _sql(url: str, query: str, *args: object) -> list[tuple[object, ...]]:
    plain = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain, autocommit=True) as conn:
        cur = conn.execute(query, args)
        return cur.fetchall() if cur.description else []


def test_existing_sagas_keep_their_order_as_business_key_and_run_version_1(
    old_database: str,
) -> None:
    order_id, saga_id = uuid.uuid4(), uuid.uuid4()
    _sql(
        old_database,
        "INSERT INTO orders (id, customer_id, status, total_cents, card_last4) "
        "VALUES (%s, 'c-1', 'pending', 100, 'visa')",
        order_id,
    )
    _sql(
        old_database,
        "INSERT INTO sagas (id, order_id, definition, state, current_step, "
        "context, deadline_at) VALUES (%s, %s, 'order', 'running', 1, '{}', now())",
        saga_id,
        order_id,
    )
    _sql(
        old_database,
        "INSERT INTO idempotency_keys (key, fingerprint, order_id) VALUES ('k-1', 'f', %s)",
        order_id,
    )

    command.upgrade(database.alembic_config(old_database), "0003")
    assert _sql(old_database, "SELECT business_key, definition, definition_version FROM sagas") == [
        (str(order_id), "order", 1)
    ]
    assert _sql(old_database, "SELECT scope, key FROM idempotency_keys") == [("orders", "k-1")]
    # An order may now have more sagas than one, and be returned.
    _sql(
        old_database,
        "INSERT INTO sagas (id, business_key, definition, state, current_step, "
        "context, deadline_at) VALUES (%s, %s, 'return', 'running', 0, '{}', now())",
        uuid.uuid4(),
        str(order_id),
    )
    _sql(old_database, "UPDATE orders SET status = 'returned' WHERE id = %s", order_id)

    _sql(old_database, "UPDATE orders SET status = 'confirmed' WHERE id = %s", order_id)
    command.downgrade(database.alembic_config(old_database), "0002")
    assert _sql(old_database, "SELECT id, order_id FROM sagas") == [(saga_id, order_id)]


def test_the_services_migration_comes_after_the_operations_one_and_goes_back(
    old_database: str,
) -> None:
    """One head: 0006_services on 0005_operations; down to 0005 drops its tables and columns and
    puts the unsent index back as it was, and up again restores them."""
    config = database.alembic_config(old_database)
    command.upgrade(config, "head")
    assert _sql(old_database, "SELECT version_num FROM alembic_version") == [("0006_services",)]
    unsent = "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_outbox_unsent'"
    assert "held_at IS NULL" in str(_sql(old_database, unsent)[0][0])
    command.downgrade(config, "0005_operations")
    assert _sql(old_database, "SELECT to_regclass('service_states')") == [(None,)]
    assert "held_at" not in str(_sql(old_database, unsent)[0][0])
    command.upgrade(config, "head")
    assert _sql(old_database, "SELECT count(*) FROM service_states") == [(0,)]
