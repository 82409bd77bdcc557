"""Moves of stock between available, reserved and sold: each product read and written once per
transaction, however many commands of a batch move it.

A transaction first locks every product its commands may touch (``lock_for``), in SKU order, so
two transactions never wait on each other in a cycle. The moves are then made on those locked
numbers in memory, one command after the other (so out-of-stock refusals are decided per saga, in
delivery order), and written back with one UPDATE per changed product just before the commit: a
scarce product that many reservations race for costs one row lock and one write per batch, not a
queue of transactions waiting on its row.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

from models.catalog import Product
from models.participants import Reservation
from orchestrator.messaging.envelopes import Command

BUCKETS = ("available", "reserved", "sold")
_KEY = "stock_ledger"  # where a session keeps its ledger (Session.info)


# Built once, values bound per transaction: building and cache-keying a statement per batch was a
# third of a small batch's CPU. FOR NO KEY UPDATE, not FOR UPDATE: stock moves still wait for each
# other, but an order line's foreign key (FOR KEY SHARE on its product) no longer waits for the
# stock batch holding the product; with FOR UPDATE the web's order statement spent most of its
# time in that wait at 60 orders/s (tests/web/test_stock_lock.py).
_PRODUCTS = cast(sa.Table, Product.__table__)
_LOCK_PRODUCTS = (
    sa.select(_PRODUCTS.c.sku, _PRODUCTS.c.available, _PRODUCTS.c.reserved, _PRODUCTS.c.sold)
    .where(_PRODUCTS.c.sku.in_(sa.bindparam("skus", expanding=True)))
    .order_by(_PRODUCTS.c.sku)
    .with_for_update(key_share=True)
)
_WRITE_PRODUCT = (
    sa.update(_PRODUCTS)
    .where(_PRODUCTS.c.sku == sa.bindparam("b_sku"))
    .values(
        available=sa.bindparam("b_available"),
        reserved=sa.bindparam("b_reserved"),
        sold=sa.bindparam("b_sold"),
    )
)
_RESERVED_LINES = sa.select(Reservation.lines).where(
    sa.or_(
        Reservation.saga_id.in_(sa.bindparam("sagas", expanding=True)),
        Reservation.order_id.in_(sa.bindparam("orders", expanding=True)),
    )
)


class Shortage(Exception):
    """Not enough available stock for a line (or no such product)."""


@dataclass
class _Level:
    available: int
    reserved: int
    sold: int


class Ledger:
    """The locked stock levels of one transaction, and the moves made on them."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.levels: dict[str, _Level | None] = {}  # None: no such product
        self.changed: set[str] = set()

    def lock(self, skus: Iterable[str]) -> None:
        """Lock the products not locked yet, in SKU order, and read their levels."""
        wanted = sorted(set(skus) - self.levels.keys())
        if not wanted:
            return
        rows = self.session.execute(_LOCK_PRODUCTS, {"skus": wanted})
        found = {sku: _Level(available, reserved, sold) for sku, available, reserved, sold in rows}
        for sku in wanted:
            self.levels[sku] = found.get(sku)

    def reserve(self, lines: list[dict[str, Any]]) -> None:
        """available -> reserved for every line, or raise Shortage and move nothing."""
        needed = _quantities(lines)
        self.lock(needed)
        for sku, qty in sorted(needed.items()):
            level = self.levels[sku]
            if level is None or level.available < qty:
                raise Shortage(sku)
        self.move(lines, "available", "reserved")

    def move(self, lines: list[dict[str, Any]], source: str, target: str) -> None:
        """Move each line's quantity from one bucket to another (release, sell, give back). A move
        that would leave a bucket negative is refused by the table's checks at the write."""
        assert source in BUCKETS and target in BUCKETS
        quantities = _quantities(lines)
        self.lock(quantities)
        for sku, qty in quantities.items():
            level = self.levels[sku]
            if level is None:
                raise LookupError(f"product {sku} does not exist")
            setattr(level, source, getattr(level, source) - qty)
            setattr(level, target, getattr(level, target) + qty)
            self.changed.add(sku)

    def write(self) -> None:
        """One UPDATE per changed product (rows locked since ``lock``: plain values are safe)."""
        if not self.changed:
            return
        rows = []
        for sku in sorted(self.changed):
            level = self.levels[sku]
            assert level is not None
            rows.append(
                {
                    "b_sku": sku,
                    "b_available": level.available,
                    "b_reserved": level.reserved,
                    "b_sold": level.sold,
                }
            )
        self.changed.clear()
        self.session.execute(_WRITE_PRODUCT, rows)  # one statement, executed for every row


def _quantities(lines: list[dict[str, Any]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for line in lines:
        total[line["sku"]] = total.get(line["sku"], 0) + int(line["quantity"])
    return total


def ledger(session: Session) -> Ledger:
    """The session's ledger; the first use arranges for its moves to be written before commit."""
    found: Ledger | None = session.info.get(_KEY)
    if found is None:
        found = session.info[_KEY] = Ledger(session)
        # The write belongs to the commit of whatever transaction made the moves (one command or
        # a batch), so no caller can forget it.
        event.listen(session, "before_commit", lambda _: found.write() if found else None)
    return found


def reserve(session: Session, lines: list[dict[str, Any]]) -> None:
    ledger(session).reserve(lines)


def move(session: Session, lines: list[dict[str, Any]], source: str, target: str) -> None:
    ledger(session).move(lines, source, target)


def lock_for(session: Session, commands: list[Command]) -> None:
    """Before a transaction's first row lock: lock every product its commands may move, the
    lines of reserves and those of the reservations of the other commands' sagas and orders."""
    skus: set[str] = set()
    sagas: set[uuid.UUID] = set()
    orders: set[uuid.UUID] = set()
    for command in commands:
        items = command.payload.get("items")
        if items:  # a reserve moves its own lines or, redelivered, nothing: no lookup
            skus.update(item["sku"] for item in items)
            continue
        sagas.add(command.saga_id)
        key = command.typed_payload().business_key
        with contextlib.suppress(ValueError, TypeError):  # a saga whose key is not an order id
            orders.add(uuid.UUID(str(key)))
    if sagas:
        rows = session.scalars(_RESERVED_LINES, {"sagas": list(sagas), "orders": list(orders)})
        for lines in rows:
            skus.update(line["sku"] for line in lines)
    ledger(session).lock(skus)
