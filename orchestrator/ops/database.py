"""Database administration: create the database when missing, migrate it with Alembic."""

from __future__ import annotations

from pathlib import Path

import psycopg
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

import migrations
from orchestrator.ops.config import settings

MIGRATIONS_DIR = Path(migrations.__file__).parent


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", (url or settings().database_url).replace("%", "%%"))
    return cfg


def create_database_if_missing(url: str | None = None) -> bool:
    """CREATE DATABASE through the server's ``postgres`` database; True if it was created."""
    target = sa.make_url(url or settings().database_url)
    admin = target.set(drivername="postgresql", database="postgres")
    name = target.database
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists:
            return False
        try:
            conn.execute(f'CREATE DATABASE "{name}"')
        except psycopg.errors.DuplicateDatabase:  # another process won the race
            return False
    return True


def upgrade(url: str | None = None, revision: str = "head") -> None:
    create_database_if_missing(url)
    command.upgrade(alembic_config(url), revision)


def drop_database(url: str) -> None:
    target = sa.make_url(url)
    admin = target.set(drivername="postgresql", database="postgres")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{target.database}" WITH (FORCE)')
