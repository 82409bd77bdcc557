"""generic sagas: business key and definition version; returns' statuses; route-scoped keys

A saga is about a business key (the order id, for the shop's sagas) instead of a foreign key to
one order: an order now has its order saga and any number of return sagas. Every saga records the
version of its definition (existing sagas ran version 1). Orders and reservations gain the
statuses of a return; an idempotency key is scoped to its route.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 15:10:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ORDER_STATUSES = ('pending', 'confirmed', 'cancelled', 'failed')
RESERVATION_STATUSES = ('reserved', 'rejected', 'sold', 'released', 'voided')


def _check(table: str, name: str, column: str, values: tuple[str, ...]) -> None:
    op.drop_constraint(op.f(f'ck_{table}_{name}'), table, type_='check')
    listed = ', '.join(f"'{v}'" for v in values)
    op.create_check_constraint(op.f(f'ck_{table}_{name}'), table, f'{column} IN ({listed})')


def upgrade() -> None:
    op.add_column('sagas', sa.Column('business_key', sa.String(length=64), nullable=True))
    op.add_column('sagas', sa.Column('definition_version', sa.Integer(), server_default='1',
                                     nullable=False))
    op.execute('UPDATE sagas SET business_key = order_id::text')
    op.alter_column('sagas', 'business_key', nullable=False)
    op.drop_constraint('uq_sagas_order_id', 'sagas', type_='unique')
    op.drop_constraint('fk_sagas_order_id_orders', 'sagas', type_='foreignkey')
    op.drop_column('sagas', 'order_id')
    op.create_index('ix_sagas_business_key', 'sagas', ['business_key', 'definition'])

    _check('orders', 'orderstatus', 'status', (*ORDER_STATUSES, 'returning', 'returned'))
    _check('reservations', 'reservationstatus', 'status', (*RESERVATION_STATUSES, 'returned'))

    op.add_column('idempotency_keys', sa.Column('scope', sa.String(length=16),
                                                server_default='orders', nullable=False))
    op.add_column('idempotency_keys', sa.Column('saga_id', sa.Uuid(), nullable=True))
    op.drop_constraint('pk_idempotency_keys', 'idempotency_keys', type_='primary')
    op.create_primary_key('pk_idempotency_keys', 'idempotency_keys', ['scope', 'key'])


def downgrade() -> None:
    op.execute("DELETE FROM idempotency_keys WHERE scope <> 'orders'")
    op.drop_constraint('pk_idempotency_keys', 'idempotency_keys', type_='primary')
    op.create_primary_key('pk_idempotency_keys', 'idempotency_keys', ['key'])
    op.drop_column('idempotency_keys', 'saga_id')
    op.drop_column('idempotency_keys', 'scope')

    _check('reservations', 'reservationstatus', 'status', RESERVATION_STATUSES)
    _check('orders', 'orderstatus', 'status', ORDER_STATUSES)

    # Only one saga per order fits the old shape: the order sagas stay, the others go.
    op.execute("DELETE FROM saga_events WHERE saga_id IN "
               "(SELECT id FROM sagas WHERE definition <> 'order')")
    op.execute("DELETE FROM saga_steps WHERE saga_id IN "
               "(SELECT id FROM sagas WHERE definition <> 'order')")
    op.execute("DELETE FROM sagas WHERE definition <> 'order'")
    op.drop_index('ix_sagas_business_key', table_name='sagas')
    op.add_column('sagas', sa.Column('order_id', sa.Uuid(), nullable=True))
    op.execute('UPDATE sagas SET order_id = business_key::uuid')
    op.alter_column('sagas', 'order_id', nullable=False)
    op.create_foreign_key('fk_sagas_order_id_orders', 'sagas', 'orders', ['order_id'], ['id'])
    op.create_unique_constraint('uq_sagas_order_id', 'sagas', ['order_id'])
    op.drop_column('sagas', 'definition_version')
    op.drop_column('sagas', 'business_key')
