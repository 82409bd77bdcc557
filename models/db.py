"""Engine and sessions: one pool per process, disposed after a fork."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError, InvalidatePoolError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")

# Processes that rerun a transaction whose connection died (run_in_transaction) need no ping:
# every Celery worker (the orchestrator and each participant service) and the relay. The web,
# beat and command-line tools do not, so they ping a connection that sat idle in the pool.
_PINGING_PROCESSES = {"web", "beat"}
# A connection back in use within this time is trusted without a ping: under load the web's
# connections never wait that long, so its requests pay no round trip (and no commit) for it,
# while one that sat idle through a database restart is still found dead and replaced.
PING_AFTER_IDLE_S = 1.0

# SQLSTATEs worth retrying as a whole transaction: serialization failure, deadlock.
RETRYABLE_SQLSTATES = {"40001", "40P01"}


@lru_cache(maxsize=4)
def get_engine(url: str | None = None) -> sa.Engine:
    from orchestrator.ops.config import settings  # late: models must not need the app to import

    # Small pools: a Celery child runs one task at a time, and a whole system on one machine must
    # stay well under PostgreSQL's max_connections (100 by default).
    cfg = settings()
    engine = sa.create_engine(
        url or cfg.database_url,
        pool_size=pool_size(cfg.process, cfg.db_pool_size, cfg.web_threads),
        max_overflow=cfg.db_pool_overflow,
        pool_timeout=10,
        connect_args={"connect_timeout": 5},  # a silent database must not hang /healthz
        pool_recycle=1800,
    )
    if _pings(cfg.process):
        ping_when_idle(engine)
    return engine


def ping_when_idle(engine: sa.Engine, idle_s: float | None = None) -> None:
    """``pool_pre_ping``, for connections idle longer than ``idle_s`` only: a dead one raises
    ``InvalidatePoolError`` at checkout, and the pool replaces it (and every connection pooled
    before it) before anyone uses it."""
    threshold = PING_AFTER_IDLE_S if idle_s is None else idle_s

    @event.listens_for(engine, "checkin")
    def _back(dbapi_connection: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _out(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.get(_IDLE_SINCE)
        if since is None or time.monotonic() - since <= threshold:
            return  # new (just connected) or busy: no round trip
        try:
            ok = engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # as pre-ping does: every pooled connection is suspect now
            raise InvalidatePoolError(f"an idle connection failed its ping: {exc}") from exc
        if not ok:
            raise InvalidatePoolError("an idle connection failed its ping")


_IDLE_SINCE = "saga.idle_since"


def pool_size(process: str | None, configured: int, web_threads: int) -> int:
    """The connections a process keeps. A web worker serves ``web_threads`` requests at once, a
    connection each, and its publisher's thread writes sent marks: with fewer kept, every request
    over the pool opened a connection and closed it at checkin (seen: 300 PostgreSQL sessions
    started in a 17 s bench, each a backend forked and a statement cache lost)."""
    if _kind(process) == "web":
        return max(configured, web_threads + 1)
    return configured


def _pings(process: str | None) -> bool:
    return process is None or _kind(process) in _PINGING_PROCESSES


def _kind(process: str | None) -> str | None:
    """``SAGA_PROCESS`` is the process name (``orchestrator#2`` for a second one); unset: a tool."""
    return None if process is None else process.split("#")[0]


@lru_cache(maxsize=4)
def _factory(url: str | None = None) -> sessionmaker[Session]:
    # get_engine() and get_engine(None) are two lru_cache keys: call it as everyone else does.
    return sessionmaker(get_engine(url) if url else get_engine(), expire_on_commit=False)


def forget_engine() -> None:
    """The next engine and sessions are built from the settings again (a new database URL or pool
    size); the settings' own cache is the caller's to clear first."""
    get_engine.cache_clear()
    _factory.cache_clear()


def new_session() -> Session:
    return _factory()()


@contextmanager
def transaction() -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with new_session() as session, session.begin():
        yield session


@contextmanager
def snapshot() -> Iterator[Session]:
    """A read of several tables as of one moment (REPEATABLE READ): a view that reads an order and
    then its saga never shows one ahead of the other (READ COMMITTED lets a commit land between)."""
    with new_session() as session, session.begin():
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        yield session


def dispose_after_fork() -> None:
    """A forked child must not share its parent's sockets (SQLAlchemy pooling docs)."""
    get_engine().dispose(close=False)


def is_retryable(exc: BaseException) -> bool:
    """A lost connection or a serialization/deadlock abort: the whole transaction may be rerun."""
    if isinstance(exc, OperationalError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        sqlstate = getattr(exc.orig, "sqlstate", None)
        return sqlstate in RETRYABLE_SQLSTATES
    return False


def run_in_transaction(work: Callable[[Session], T], attempts: int = 5) -> T:
    """Run `work` in its own transaction, rerunning it on serialization failures and deadlocks."""
    for attempt in range(1, attempts + 1):
        try:
            with transaction() as session:
                return work(session)
        except DBAPIError as exc:
            if attempt == attempts or not is_retryable(exc):
                raise
            time.sleep(0.01 * 2**attempt)
    raise AssertionError("unreachable")
