"""The demo catalogue and restocking."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from models.catalog import Product
from models.db import transaction

# (sku, name, price in cents, initial stock). SKU-CHERRY is scarce so stock races show.
DEMO_PRODUCTS = (
    ("SKU-APPLE", "Apple", 250, 1000),
    ("SKU-BANANA", "Banana", 120, 1000),
    ("SKU-PEAR", "Pear", 310, 500),
    ("SKU-CHERRY", "Cherry box", 900, 10),
)


class UnknownProduct(LookupError):
    pass


def seed() -> int:
    """Create the demo products that are missing; never touch existing stock. Returns created."""
    with transaction() as session:
        created = session.execute(
            insert(Product)
            .values(
                [
                    {
                        "sku": sku,
                        "name": name,
                        "price_cents": price,
                        "available": stock,
                        "reserved": 0,
                        "sold": 0,
                        "stock_total": stock,
                    }
                    for sku, name, price, stock in DEMO_PRODUCTS
                ]
            )
            .on_conflict_do_nothing(index_elements=["sku"])
            .returning(Product.sku)
        ).all()
    return len(created)


def restock(sku: str, quantity: int) -> int:
    """Add ``quantity`` units to available stock; returns the new available count."""
    if quantity <= 0:
        raise ValueError("quantity must be positive")
    with transaction() as session:
        available = session.scalar(
            sa.update(Product)
            .where(Product.sku == sku)
            .values(
                available=Product.available + quantity, stock_total=Product.stock_total + quantity
            )
            .returning(Product.available)
        )
    if available is None:
        raise UnknownProduct(sku)
    return int(available)
