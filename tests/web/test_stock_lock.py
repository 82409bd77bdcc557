"""An order is written while a batch of stock moves holds its product's row.

Seen in a bench run at 60 orders/s: the web's one statement spent most of its time waiting on a
row lock. Its order line's foreign key takes FOR KEY SHARE on the product, and the participants
locked products FOR UPDATE, which conflicts with it: every POST for a product waited for the
stock batch that held it to commit. Stock moves change no key, so FOR NO KEY UPDATE serializes
them just the same and lets the order lines in.
"""

from __future__ import annotations

import threading
from typing import Any

from flask.testing import FlaskClient

from models.db import transaction
from tests.web.conftest import valid_order
from workers import stock


def test_an_order_is_written_while_a_stock_batch_holds_its_product(client: FlaskClient) -> None:
    sku = valid_order()["items"][0]["sku"]
    held, release = threading.Event(), threading.Event()

    def stock_batch() -> None:
        with transaction() as session:
            stock.ledger(session).lock({sku})  # as a participant's batch does, before its effects
            stock.reserve(session, [{"sku": sku, "quantity": 1}])
            held.set()
            release.wait(30)
            stock.move(session, [{"sku": sku, "quantity": 1}], "reserved", "available")  # as found

    answered: dict[str, Any] = {}

    def order() -> None:
        response = client.post("/orders", json=valid_order())
        answered["status"] = response.status_code

    holder = threading.Thread(target=stock_batch)
    holder.start()
    try:
        assert held.wait(10), "the stock batch never took its lock"
        placing = threading.Thread(target=order)
        placing.start()
        placing.join(10)  # a wait for the lock would last until the release below
        assert not placing.is_alive(), "POST /orders waited for the stock batch's lock"
        assert answered["status"] == 202
    finally:
        release.set()
        holder.join(30)
