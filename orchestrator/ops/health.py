"""Is the database reachable, is the broker reachable: each answers "ok" or "down".

Both read their URL from the settings at every call, so the check always probes what this process
is configured to use. The database check borrows a connection from the process's own pool (the one
requests use); the broker check opens and closes one AMQP connection.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from kombu import Connection

from models.db import get_engine
from orchestrator.ops.config import settings

log = logging.getLogger(__name__)

TIMEOUT_S = 2.0


def _engine(url: str) -> sa.Engine:
    """The process's pool when ``url`` is the configured database (the usual case)."""
    engine = get_engine()
    return engine if engine.url == sa.make_url(url) else get_engine(url)


def database() -> str:
    try:
        with _engine(settings().database_url).connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return "ok"
    except Exception as exc:  # any failure at all means "not usable now"
        log.warning("health: database down: %s", type(exc).__name__)
        return "down"


def broker() -> str:
    try:
        with Connection(settings().broker_url, connect_timeout=TIMEOUT_S) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=TIMEOUT_S)
        return "ok"
    except Exception as exc:
        log.warning("health: broker down: %s", type(exc).__name__)
        return "down"


def check() -> dict[str, str]:
    return {"database": database(), "broker": broker()}
