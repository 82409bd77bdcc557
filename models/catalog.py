"""Products and their stock: available + reserved + sold always equals stock_total."""

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base


class Product(Base):
    __tablename__ = "products"
    __table_args__ = (
        sa.CheckConstraint("available >= 0", name="available_not_negative"),
        sa.CheckConstraint("reserved >= 0", name="reserved_not_negative"),
        sa.CheckConstraint("sold >= 0", name="sold_not_negative"),
        sa.CheckConstraint("price_cents > 0", name="price_positive"),
        sa.CheckConstraint("available + reserved + sold = stock_total", name="stock_balances"),
    )

    sku: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    price_cents: Mapped[int]
    available: Mapped[int]
    reserved: Mapped[int] = mapped_column(default=0)
    sold: Mapped[int] = mapped_column(default=0)
    # Initial stock plus every restock: the invariant's right-hand side.
    stock_total: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())
