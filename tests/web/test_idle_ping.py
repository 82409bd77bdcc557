"""The web's pool pings a connection only when it sat idle (models/db.py ``ping_when_idle``): a
busy connection goes straight to work, an idle one whose backend died is replaced unseen."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from models import db
from orchestrator.proof.harness import Sandbox
from tests.web.drive import backend_of, terminate_backend


def _engine(box: Sandbox, idle_s: float) -> tuple[sa.Engine, list[int]]:
    engine = sa.create_engine(box.database_url, pool_size=1, max_overflow=0)
    pings: list[int] = []
    ping = engine.dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:
        pings.append(1)
        return ping(dbapi_connection)

    engine.dialect.do_ping = counted  # type: ignore[method-assign]
    db.ping_when_idle(engine, idle_s=idle_s)
    return engine, pings


@pytest.fixture
def engines(web_sandbox: Sandbox) -> Iterator[list[sa.Engine]]:
    made: list[sa.Engine] = []
    yield made
    for engine in made:
        engine.dispose()


def test_a_connection_back_in_use_within_the_window_is_not_pinged(
    web_sandbox: Sandbox, engines: list[sa.Engine]
) -> None:
    engine, pings = _engine(web_sandbox, idle_s=3600)
    engines.append(engine)
    pids = {backend_of(engine) for _ in range(5)}
    assert len(pids) == 1 and pings == []
    # The trade-off, shown: a backend that dies inside the window is found by its next use.
    terminate_backend(web_sandbox.database_url, pids.pop())
    with pytest.raises(OperationalError):
        backend_of(engine)


def test_an_idle_connection_is_pinged_and_a_dead_one_replaced_before_use(
    web_sandbox: Sandbox, engines: list[sa.Engine]
) -> None:
    engine, pings = _engine(web_sandbox, idle_s=0)
    engines.append(engine)
    first = backend_of(engine)  # a new connection: no ping
    assert backend_of(engine) == first and len(pings) == 1
    terminate_backend(web_sandbox.database_url, first)
    assert backend_of(engine) != first, "the dead connection was replaced at checkout"
