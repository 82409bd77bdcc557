"""Moves of stock between available, reserved and sold, one product row at a time.

Rows are touched in SKU order so two transactions never wait on each other in a cycle.
"""

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from models.catalog import Product


class Shortage(Exception):
    """Not enough available stock for a line."""


def _sorted(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(lines, key=lambda line: line["sku"])


def reserve(session: Session, lines: list[dict[str, Any]]) -> None:
    """available -> reserved for every line, or raise Shortage (the caller rolls back)."""
    for line in _sorted(lines):
        qty = line["quantity"]
        moved = session.execute(
            sa.update(Product)
            .where(Product.sku == line["sku"], Product.available >= qty)
            .values(available=Product.available - qty, reserved=Product.reserved + qty)
        )
        if moved.rowcount != 1:  # type: ignore[attr-defined]
            raise Shortage(line["sku"])


def move(session: Session, lines: list[dict[str, Any]], source: str, target: str) -> None:
    """Move each line's quantity from one bucket to another (release, sell, give back)."""
    for line in _sorted(lines):
        qty = line["quantity"]
        session.execute(
            sa.update(Product)
            .where(Product.sku == line["sku"])
            .values(
                {source: getattr(Product, source) - qty, target: getattr(Product, target) + qty}
            )
        )
