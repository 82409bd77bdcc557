"""docs/extending.md, followed: a new saga with new participant services and steps, added through
the registry's extension point only, runs on real workers to completion and through compensation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.proof.harness import Processes, Sandbox
from tests.extension import system
from tests.extension.worker import LEDGER_LIMIT_CENTS

pytestmark = pytest.mark.own_system


@pytest.fixture(scope="module")
def loyalty(sandbox: Sandbox, artifacts: Path) -> Iterator[Processes]:
    # ``sandbox``: the session's, which this process goes back to afterwards.
    with system.loyalty_system(artifacts / "logs-extension", system.V1) as procs:
        yield procs


def test_a_loyalty_saga_runs_to_completion_on_its_own_workers(loyalty: Processes) -> None:
    saga_id = system.start(points=10)
    done = system.wait_state(saga_id, {"completed", "compensated", "failed"})
    assert done == {
        "state": "completed",
        "version": 1,
        "steps": [("points.award", "succeeded", "pending"), ("ledger.post", "succeeded", None)],
    }
    assert system.award(saga_id) == {"status": "awarded", "points": 10, "bonus": 0}


def test_a_ledger_refusal_takes_the_points_back(loyalty: Processes) -> None:
    too_much = LEDGER_LIMIT_CENTS // 10 + 1  # points cost 10 cents each
    saga_id = system.start(points=too_much)
    done = system.wait_state(saga_id, {"completed", "compensated", "failed"})
    assert done["state"] == "compensated"
    assert done["steps"] == [
        ("points.award", "succeeded", "succeeded"),
        ("ledger.post", "failed", None),
    ]
    assert system.award(saga_id) == {"status": "revoked", "points": too_much, "bonus": 0}


def test_each_new_service_runs_its_own_worker_on_its_own_queue(loyalty: Processes) -> None:
    for name, other in (("points", "ledger"), ("ledger", "points")):
        banner = loyalty.output(name)
        assert f".> {name} " in banner and f".> {other} " not in banner, banner[-2000:]
