"""Integration tier: every process of the contract runs for real against the session's sandbox.

``system`` (the processes) and ``api`` come from tests/conftest.py, shared with the e2e tier."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from orchestrator.proof.harness import Processes
from tests.integration.helpers import settle_and_audit


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


OWN_SYSTEM = "own_system"  # a module that starts a system of its own (bench, chaos)


def _shared_system(request: pytest.FixtureRequest) -> Processes | None:
    if request.node.get_closest_marker(OWN_SYSTEM):
        return None
    system: Processes = request.getfixturevalue("system")
    return system


_SYSTEM = pytest.StashKey[Processes]()  # the shared system a test ran against


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """A process that died during the test without the test planning it (a harness kill, a fail
    point, ``expect_exit``) fails that test, with the process's name and the end of its log."""
    result = yield
    system: Processes | None = item.stash.get(_SYSTEM, None)
    exits = system.take_unplanned_exits() if system is not None else []
    if exits:
        pytest.fail("unplanned process death(s):\n" + "\n".join(map(str, exits)), pytrace=False)
    return result


@pytest.fixture(autouse=True)
def _every_process_alive(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that kills a process must leave the system whole for the next one (a death it did
    not plan has failed it already, in ``pytest_runtest_call``)."""
    system = _shared_system(request)
    if system is not None:
        between = system.take_unplanned_exits()  # since the last test's call: during teardown
        request.node.stash[_SYSTEM] = system
        if between:
            pytest.fail(
                "unplanned process death(s) after the previous test:\n"
                + "\n".join(map(str, between)),
                pytrace=False,
            )
    yield
    if system is None:
        return
    for name in list(system.running):
        if "#" in name:
            if system.alive(name):
                system.kill(name)
            del system.running[name]
        elif not system.alive(name):
            system.start(name)


@pytest.fixture(scope="module", autouse=True)
def _audit_after_module(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every integration module, the invariants hold (what ``sagactl audit`` checks)."""
    system = _shared_system(request)
    yield
    if system is None:
        return
    report = settle_and_audit()
    assert report.ok, report.violations
