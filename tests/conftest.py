"""Fixtures shared by every tier. Tiers that need PostgreSQL and RabbitMQ get a sandbox of their own
(a fresh database and vhost); if either service is missing the run fails loudly, never skips."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from orchestrator.proof.harness import SHORT_TIMINGS

if TYPE_CHECKING:  # imported lazily at run time: the unit tier needs no services
    from orchestrator.proof.client import Api
    from orchestrator.proof.harness import Processes, Sandbox

# Short timings for every process a test starts (the contract's variables).
TEST_TIMINGS = SHORT_TIMINGS


def pytest_configure(config: pytest.Config) -> None:
    """The test process is a process like the others: wired once (orchestrator/bootstrap.py)."""
    from orchestrator.bootstrap import bootstrap

    bootstrap()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    path = Path(os.environ.get("SAGA_TEST_ARTIFACTS", "artifacts")) / uuid.uuid4().hex[:8]
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def sandbox(artifacts: Path) -> Iterator[object]:
    from orchestrator.proof.harness import Sandbox, use_sandbox

    os.environ.update(TEST_TIMINGS)
    os.environ["SAGA_FAILPOINTS_DIR"] = str(artifacts / "failpoints")
    (artifacts / "failpoints").mkdir(exist_ok=True)
    os.environ.setdefault("SAGA_STATE_DIR", str(artifacts / "state"))
    box = Sandbox.create("sagatest")
    use_sandbox(box)
    yield box
    from models.db import get_engine

    get_engine().dispose()
    if os.environ.get("SAGA_KEEP_SANDBOX") != "1":
        box.destroy()


@pytest.fixture(scope="session")
def system(sandbox: Sandbox, artifacts: Path) -> Iterator[Processes]:
    """Every process of the contract, started once per session, shared by integration and e2e."""
    from orchestrator.proof.harness import Processes

    procs = Processes(sandbox, artifacts / "logs")
    try:
        procs.start_all()
    except BaseException:
        procs.stop_all()  # a process that never got ready must not outlive the run
        raise
    yield procs
    procs.stop_all()


@pytest.fixture
def api(system: Processes) -> Api:
    from orchestrator.proof.client import Api

    return Api.connect(system.url)
