"""Is the database reachable, is the broker reachable: each answers "ok" or "down"."""

from __future__ import annotations

import sqlalchemy as sa
from kombu import Connection

from models.db import get_engine
from orchestrator.config import settings


def database() -> str:
    try:
        with get_engine().connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return "ok"
    except Exception:
        return "down"


def broker() -> str:
    try:
        with Connection(settings().broker_url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception:
        return "down"


def check() -> dict[str, str]:
    return {"database": database(), "broker": broker()}
