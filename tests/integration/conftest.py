"""Integration tier: every process of the contract runs for real against the session's sandbox."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.client import Api
from orchestrator.harness import Processes, Sandbox
from tests.integration.helpers import settle_and_audit


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def system(sandbox: Sandbox, artifacts: Path) -> Iterator[Processes]:
    procs = Processes(sandbox, artifacts / "logs")
    procs.start_all()
    yield procs
    procs.stop_all()


@pytest.fixture(autouse=True)
def _every_process_alive(system: Processes) -> Iterator[None]:
    """A test that kills a process must leave the system whole for the next one."""
    yield
    for name in list(system.running):
        if "#" in name:
            if system.alive(name):
                system.kill(name)
            del system.running[name]
        elif not system.alive(name):
            system.start(name)


@pytest.fixture(scope="module", autouse=True)
def _audit_after_module(system: Processes) -> Iterator[None]:
    """After every integration module, the invariants hold (what ``sagactl audit`` checks)."""
    yield
    report = settle_and_audit()
    assert report.ok, report.violations


@pytest.fixture
def api(system: Processes) -> Api:
    return Api.connect(system.url)
