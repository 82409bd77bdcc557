"""bulk operations by filter: an operation (who, when, note, filter) and its work list

One row per saga the filter matched; the runner (beat's sweep) acts on each once.

Revision ID: 0005_operations
Revises: 0003 (the lead re-chains it at the merge)
Create Date: 2026-12-01 17:45:14.014733
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0005_operations'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('operations',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('actor', sa.String(length=64), nullable=False),
    sa.Column('note', sa.Text(), nullable=True),
    sa.Column('filter', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('total', sa.Integer(), nullable=False),
    sa.Column('done', sa.Integer(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_operations'))
    )
    op.create_index('ix_operations_created_at', 'operations', ['created_at'], unique=False)
    op.create_table('operation_items',
    sa.Column('operation_id', sa.Uuid(), nullable=False),
    sa.Column('saga_id', sa.Uuid(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('status', sa.SmallInteger(), nullable=True),
    sa.Column('state', sa.String(length=24), nullable=True),
    sa.Column('acted_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['operation_id'], ['operations.id'], name=op.f('fk_operation_items_operation_id_operations')),
    sa.PrimaryKeyConstraint('operation_id', 'saga_id', name=op.f('pk_operation_items'))
    )
    op.create_index('ix_operation_items_pending', 'operation_items', ['operation_id', 'position'], unique=False, postgresql_where=sa.text('status IS NULL'))


def downgrade() -> None:
    op.drop_index('ix_operation_items_pending', table_name='operation_items', postgresql_where=sa.text('status IS NULL'))
    op.drop_table('operation_items')
    op.drop_index('ix_operations_created_at', table_name='operations')
    op.drop_table('operations')
