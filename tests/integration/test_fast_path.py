"""The outbox fast path from the writer's side: this test process is the writer (``place_order``
in-process, as the web does), the session's system processes the sagas."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from orchestrator.messaging import fastpath
from orchestrator.ops.config import settings
from orchestrator.proof.client import Api
from orchestrator.sagas.placing import NewOrder, place_order
from tests.integration.helpers import make_product, wait_final


def outbox_rows(saga_id: uuid.UUID) -> list[tuple[str, Any]]:
    """Read outside SQLAlchemy's Session: a Session's commit would carry the marks itself."""
    url = sa.make_url(settings().database_url).set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(hide_password=False)) as conn:
        return [
            (task, sent_at)
            for task, sent_at in conn.execute(
                "SELECT task, sent_at FROM outbox WHERE saga_id = %s ORDER BY id", (saga_id,)
            )
        ]


def test_the_writers_next_transaction_carries_its_sent_marks(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fastpath, "MARK_EVERY_S", 3600.0)  # no idle flush: only carrying marks
    sku = make_product(stock=5)
    first = place_order(NewOrder("c-fast", [(sku, 1)], "tok_visa"))
    # Published right after commit (the system runs the saga), not yet marked sent.
    assert outbox_rows(first.saga_id)[0] == ("inventory.reserve", None)
    make_product(stock=1)  # any next transaction of this process
    task, sent_at = outbox_rows(first.saga_id)[0]
    assert task == "inventory.reserve" and sent_at is not None
    view = wait_final(api, str(first.order_id))
    assert view["status"] == "confirmed"
