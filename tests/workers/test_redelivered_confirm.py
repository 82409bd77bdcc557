"""A redelivered orders.confirm after a return already started: the confirm took effect, so it is
replayed as a success, never refused (seen in a chaos run: the order saga compensated a
confirmed order, and the return then found no sold stock)."""

from __future__ import annotations

import sqlalchemy as sa

import workers.inventory
import workers.orders  # noqa: F401  (registers the order handlers)
from models.db import transaction
from orchestrator.messaging.envelopes import OrderPayload, ReplyOutcome, parse_command
from orchestrator.sagas.placing import NewOrder, Placement, place_order
from tests.integration.helpers import make_product
from tests.workers.test_batches import RETRY, command, outcomes
from workers.applying import Incoming, apply_batch


def test_a_confirm_redelivered_while_the_order_is_returning_replays_its_success() -> None:
    sku, placed = _placed_and_reserved("c-redeliver")
    confirm = command(
        "orders.confirm", OrderPayload(order_id=placed.order_id, retry=RETRY), placed.saga_id
    )
    assert outcomes(apply_batch([confirm])) == [("succeeded", None)]
    with transaction() as session:  # what the web's return does, in its own transaction
        session.execute(
            sa.text("UPDATE orders SET status = 'returning' WHERE id = :o"), {"o": placed.order_id}
        )
    [again] = apply_batch([confirm])  # the same command, redelivered
    assert again.reply is not None and again.reply.outcome is ReplyOutcome.SUCCEEDED, again
    with transaction() as session:
        sold = session.scalar(sa.text("SELECT sold FROM products WHERE sku = :s"), {"s": sku})
    assert sold == 1  # moved once


def test_a_confirm_retried_after_its_saga_parked_finds_its_sale_and_confirms() -> None:
    """The confirm sold the stock, its saga then parked past the deadline (order failed) and an
    operator's retry made the order pending again: the retry's confirm is a success, not fenced
    (fenced, the saga would cancel an order whose stock it had sold)."""
    sku, placed = _placed_and_reserved("c-parked")
    payload = OrderPayload(order_id=placed.order_id, retry=RETRY)
    assert outcomes(apply_batch([command("orders.confirm", payload, placed.saga_id)])) == [
        ("succeeded", None)
    ]
    with transaction() as session:  # parked (failed), then retried (pending): the saga's hook
        session.execute(
            sa.text("UPDATE orders SET status = 'pending' WHERE id = :o"), {"o": placed.order_id}
        )
    [retried] = apply_batch([command("orders.confirm", payload, placed.saga_id)])  # a new request
    assert retried.reply is not None and retried.reply.outcome is ReplyOutcome.SUCCEEDED, retried
    with transaction() as session:
        status = session.scalar(
            sa.text("SELECT status FROM orders WHERE id = :o"), {"o": placed.order_id}
        )
        sold = session.scalar(sa.text("SELECT sold FROM products WHERE sku = :s"), {"s": sku})
    assert (status, sold) == ("confirmed", 1)  # confirmed again, sold once


def _placed_and_reserved(customer: str) -> tuple[str, Placement]:
    """An order placed for one unit of a new product, its reservation applied."""
    sku = make_product(stock=3)
    placed = place_order(NewOrder(customer, [(sku, 1)], "tok_visa"))
    with transaction() as session:
        envelope = session.scalar(
            sa.text("SELECT envelope FROM outbox WHERE saga_id = :s AND task = 'inventory.reserve'"),
            {"s": placed.saga_id},
        )
    assert outcomes(apply_batch([Incoming(parse_command(envelope))])) == [("succeeded", None)]
    return sku, placed
