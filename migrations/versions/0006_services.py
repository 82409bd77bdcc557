"""services: pause and resume a participant service, its circuit breaker, held commands

A service's state (running, paused, breaker_open, half_open) and an audit of every change; the
replies of each service per flush (the breaker's window); outbox rows held for a paused service;
the time a saga's command in hand has been held. The unsent index leaves the held rows out: the
relay's claim and the web's backlog check (every order) never walk them.

Revision ID: 0006_services
Revises: 0005_operations
Create Date: 2026-12-01 18:00:00 (re-chained after 0005 on 2026-12-01)
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0006_services'
down_revision: str | None = '0005_operations'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UNSENT_WAS = 'sent_at IS NULL'
_UNSENT = 'sent_at IS NULL AND held_at IS NULL'


def upgrade() -> None:
    op.create_table(
        'service_states',
        sa.Column('service', sa.String(length=64), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('since', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                  nullable=False),
        sa.Column('by', sa.String(length=255), nullable=True),
        sa.Column('note', sa.Text(), nullable=True),
        sa.Column('hold_compensations', sa.Boolean(), server_default=sa.text('true'),
                  nullable=False),
        sa.CheckConstraint("state IN ('running', 'paused', 'breaker_open', 'half_open')",
                           name=op.f('ck_service_states_state')),
        sa.PrimaryKeyConstraint('service', name=op.f('pk_service_states')),
    )
    op.create_table(
        'service_audit',
        sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column('service', sa.String(length=64), nullable=False),
        sa.Column('action', sa.String(length=32), nullable=False),
        sa.Column('actor', sa.String(length=255), nullable=False),
        sa.Column('note', sa.Text(), nullable=True),
        sa.Column('held', sa.Integer(), server_default='0', nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                  nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_service_audit')),
    )
    op.create_index(op.f('ix_service_audit_service'), 'service_audit', ['service'], unique=False)
    op.create_table(
        'service_calls',
        sa.Column('service', sa.String(length=64), nullable=False),
        sa.Column('flushed_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('ok', sa.Integer(), server_default='0', nullable=False),
        sa.Column('transient', sa.Integer(), server_default='0', nullable=False),
        sa.PrimaryKeyConstraint('service', 'flushed_at', name=op.f('pk_service_calls')),
    )
    op.add_column('outbox', sa.Column('held_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_outbox_held', 'outbox', ['queue', 'id'], unique=False,
                    postgresql_where=sa.text('held_at IS NOT NULL AND sent_at IS NULL'))
    op.drop_index('ix_outbox_unsent', table_name='outbox', postgresql_where=sa.text(_UNSENT_WAS))
    op.create_index('ix_outbox_unsent', 'outbox', ['id'], unique=False,
                    postgresql_where=sa.text(_UNSENT))
    op.add_column('sagas', sa.Column('held_since', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('sagas', 'held_since')
    op.drop_index('ix_outbox_unsent', table_name='outbox', postgresql_where=sa.text(_UNSENT))
    op.create_index('ix_outbox_unsent', 'outbox', ['id'], unique=False,
                    postgresql_where=sa.text(_UNSENT_WAS))
    op.drop_index('ix_outbox_held', table_name='outbox',
                  postgresql_where=sa.text('held_at IS NOT NULL AND sent_at IS NULL'))
    op.drop_column('outbox', 'held_at')
    op.drop_table('service_calls')
    op.drop_index(op.f('ix_service_audit_service'), table_name='service_audit')
    op.drop_table('service_audit')
    op.drop_table('service_states')
