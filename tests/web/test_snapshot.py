"""An order's view reads the order and its saga as of one moment: a saga that moves between the
two reads is not seen ahead of its order (seen once as saga failed, order still pending)."""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from flask.testing import FlaskClient

from models.db import snapshot, transaction
from models.sagas import Saga
from orchestrator import queries
from tests.web.drive import place


def test_a_view_reads_its_order_and_saga_as_of_one_moment(client: FlaskClient) -> None:
    placed = place(client)
    order_id = uuid.UUID(placed["order_id"])
    with snapshot() as session:
        order_status = session.scalar(sa.text("SELECT status FROM orders WHERE id = :o"),
                                      {"o": order_id})
        with transaction() as other:  # a transition commits between the view's two reads
            other.execute(sa.update(Saga).where(Saga.id == uuid.UUID(placed["saga_id"]))
                          .values(state="failed"))
        view = queries.order_view(session, order_id)
    assert view is not None
    assert (order_status, view["status"], view["saga"]["state"]) == ("pending", "pending", "running")
