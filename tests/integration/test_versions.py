"""Changing a definition while sagas run: sagas held mid-way on version 1 finish on version 1 after
the workers restart with version 2 registered beside it; new sagas run version 2. Real processes.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import registry
from orchestrator.ops.processes import sagactl
from orchestrator.proof.harness import Processes, Sandbox
from tests.extension import system

pytestmark = pytest.mark.own_system

V1_STEPS = ["points.award", "ledger.post"]
V2_STEPS = [*V1_STEPS, "points.bonus"]


@pytest.fixture(scope="module")
def loyalty(sandbox: Sandbox, artifacts: Path) -> Iterator[Processes]:
    # ``sandbox``: the session's, which this process goes back to afterwards.
    with system.loyalty_system(artifacts / "logs-versions", system.V1) as procs:
        yield procs


def definitions(procs: Processes) -> dict[tuple[str, int], dict[str, object]]:
    result = subprocess.run(
        sagactl("definitions", "--json"),
        env=procs.box.env(**procs.extra_env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["definitions"]
    return {(r["name"], r["version"]): r for r in rows}


def test_held_sagas_finish_on_their_version_and_new_ones_run_the_new_one(
    loyalty: Processes,
) -> None:
    loyalty.kill("ledger")  # the sagas get past points.award and wait at ledger.post
    held = [system.start(points=10) for _ in range(3)]
    for saga_id in held:
        system.wait_step(saga_id, "points.award", "succeeded")
        system.wait_step(saga_id, "ledger.post", "running")
    assert definitions(loyalty)[("loyalty", 1)]["in_flight"] == 3

    # Deploy version 2 beside version 1: every process restarts with both registered.
    both = ",".join((system.V1, system.V2))
    loyalty.extra_env[registry.EXTRA_MODULES_ENV] = both
    system.use_modules(system.V1, system.V2)
    for name in ("orchestrator", "points", "relay", "beat"):
        loyalty.restart(name)
    loyalty.start("ledger")

    fresh = system.start(points=20)
    for saga_id in held:
        done = system.wait_state(saga_id, {"completed", "compensated", "failed"})
        assert (done["state"], done["version"]) == ("completed", 1)
        assert [name for name, _, _ in done["steps"]] == V1_STEPS
        assert system.award(saga_id) == {"status": "awarded", "points": 10, "bonus": 0}
    done = system.wait_state(fresh, {"completed", "compensated", "failed"})
    assert (done["state"], done["version"]) == ("completed", 2)
    assert [name for name, _, _ in done["steps"]] == V2_STEPS
    assert system.award(fresh) == {"status": "awarded", "points": 20, "bonus": 2}

    listed = definitions(loyalty)
    assert listed[("loyalty", 1)]["in_flight"] == 0  # version 1 can be retired now
    assert listed[("loyalty", 2)]["lock"] == "locked"


def test_an_orchestrator_with_a_changed_released_version_refuses_to_start(
    loyalty: Processes,
) -> None:
    with pytest.raises(RuntimeError, match="definition loyalty v1 changed"):
        changed = {registry.EXTRA_MODULES_ENV: "tests.extension.loyalty_changed"}
        loyalty.start("orchestrator#changed", True, **changed)
    assert loyalty.running["orchestrator#changed"].proc.returncode == 1
