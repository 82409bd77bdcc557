"""``sagactl bench``, the measuring: percentiles, the database's commit and row counters, CPU
seconds per process tree, broker messages, and what machine and code were measured.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
import requests
import sqlalchemy as sa

from orchestrator.ops.config import settings

FINAL_STATES = ["completed", "compensated", "failed"]
# One participant reply each (runs without dead letters or timeouts; the bench checks for those).
REPLY_EVENTS = ["step.succeeded", "step.failed", "compensation.succeeded", "compensation.failed"]


# ---------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: a p99 is a latency that really happened)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def latency_ms(values_s: list[float], prefix: str = "") -> dict[str, float]:
    if not values_s:
        return {}
    ms = [v * 1000 for v in values_s]
    return {f"{prefix}p50_ms": round(percentile(ms, 50), 1),
            f"{prefix}p95_ms": round(percentile(ms, 95), 1),
            f"{prefix}p99_ms": round(percentile(ms, 99), 1),
            f"{prefix}max_ms": round(max(ms), 1)}


# ---------------------------------------------------------------- the database side


class Db:
    """One autocommit connection for polling and counters; counts its own transactions."""

    def __init__(self, database_url: str) -> None:
        url = sa.make_url(database_url).set(drivername="postgresql")
        self.conn = psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)
        self.own = 0

    def rows(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        self.own += 1
        return list(self.conn.execute(query, params).fetchall())

    def counters(self) -> tuple[dict[str, int], float]:
        """This database's commit and row counters (as flushed by the backends so far)."""
        cols = ("xact_commit", "tup_inserted", "tup_updated", "tup_deleted")
        row = self.rows(f"SELECT {', '.join(cols)} FROM pg_stat_database "
                        "WHERE datname = current_database()")[0]
        return dict(zip(cols, map(int, row), strict=True)), time.time()

    def final(self, ids: list[str]) -> set[str]:
        found = self.rows("SELECT id::text FROM sagas WHERE id = ANY(%s::uuid[]) "
                          "AND state::text = ANY(%s)", (ids, FINAL_STATES))
        return {r[0] for r in found}

    def backend_pids(self) -> list[int]:
        return [r[0] for r in self.rows(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()")]

    def close(self) -> None:
        self.conn.close()


def hops(db: Db, ids: list[str]) -> dict[str, dict[str, float]]:
    """Where a command's time goes: waiting for the relay, then the round trip to its reply.

    ``created_at`` and ``sent_at`` are now() of the writing and the relaying transactions (their
    start), the event time is the orchestrator's clock_timestamp() when it applied the reply.
    """
    found = db.rows(
        "SELECT extract(epoch FROM o.sent_at - o.created_at)::float8, "
        "extract(epoch FROM e.at - o.sent_at)::float8 FROM outbox o JOIN saga_events e "
        "ON e.saga_id = o.saga_id AND e.step = o.task AND e.event = 'step.succeeded' "
        "WHERE o.saga_id = ANY(%s::uuid[]) AND o.sent_at IS NOT NULL", (ids,))
    return {"relay_pickup": latency_ms([r[0] for r in found]),
            "sent_to_reply_applied": latency_ms([r[1] for r in found])}


# ---------------------------------------------------------------- CPU


def _tree_cpu(pid: int) -> float:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _pids_cpu(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
    return out


def _rabbit_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "beam.smp"]


@dataclass
class CpuMeter:
    """CPU seconds (user + system) of each named process tree, plus PostgreSQL and RabbitMQ."""

    trees: dict[str, int]
    db: Db | None
    _start: dict[str, Any] = field(default_factory=dict)

    def _sample(self) -> dict[str, Any]:
        own = psutil.Process().cpu_times()
        return {"trees": {name: _tree_cpu(pid) for name, pid in self.trees.items()},
                "bench": own.user + own.system,
                "postgres": _pids_cpu(self.db.backend_pids()) if self.db else {},
                "rabbitmq": _pids_cpu(_rabbit_pids())}

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        end, start = self._sample(), self._start
        out = {name: end["trees"][name] - start["trees"].get(name, 0.0) for name in self.trees}
        out["bench (this process)"] = end["bench"] - start["bench"]
        for key, label in (("postgres", "postgres (sandbox backends)"),
                           ("rabbitmq", "rabbitmq (whole server, shared)")):
            out[label] = sum(v - start[key].get(pid, 0.0) for pid, v in end[key].items())
        return {k: round(v, 2) for k, v in out.items()}


# ---------------------------------------------------------------- messages


def management_publishes(broker_url: str) -> int | None:
    """Messages published into the vhost, from the management API when it is enabled."""
    from urllib.parse import quote, urlsplit

    parts = urlsplit(broker_url)
    vhost = parts.path.lstrip("/") or "/"
    api = settings().rabbitmq_api or f"http://{parts.hostname or '127.0.0.1'}:15672"
    try:
        r = requests.get(f"{api}/api/vhosts/{quote(vhost, safe='')}", timeout=2,
                         auth=(parts.username or "guest", parts.password or "guest"))
    except requests.RequestException:
        return None
    if r.status_code != 200:
        return None
    return int(r.json().get("message_stats", {}).get("publish", 0))


def counted_messages(db: Db, ids: list[str]) -> dict[str, int]:
    """Commands published by the relay (outbox rows) and the participants' replies."""
    commands = db.rows("SELECT count(*) FROM outbox WHERE saga_id = ANY(%s::uuid[])", (ids,))
    replies = db.rows("SELECT count(*) FROM saga_events WHERE saga_id = ANY(%s::uuid[]) "
                      "AND event = ANY(%s)", (ids, REPLY_EVENTS))
    return {"commands": int(commands[0][0]), "replies": int(replies[0][0])}


# ---------------------------------------------------------------- the machine


def machine(db: Db) -> dict[str, Any]:
    import celery
    import kombu

    server = db.rows("SHOW server_version")[0][0]
    try:  # which code was measured (a checkout; an installed package has no git)
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"code": commit or None, "nproc": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "celery": celery.__version__,
            "kombu": kombu.__version__, "sqlalchemy": sa.__version__,
            "psycopg": psycopg.__version__, "postgresql": server}
