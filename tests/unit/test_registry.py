"""The registry and the definition lock: one vocabulary, unknown names refused, released versions
frozen."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator import registry
from orchestrator.kernel import versions
from orchestrator.kernel.machine import SagaDefinition, Step, StepKind
from orchestrator.ops.processes import sagactl
from orchestrator.registry import Registered, Registry, RegistryError, UnknownName
from orchestrator.sagas.order import ORDER_SAGA, build_payload

EXTENSION = "tests.extension.loyalty,tests.extension.loyalty_v2"


def test_every_released_definition_matches_its_lock_file() -> None:
    """Change a released version's steps without a new version, and this fails."""
    built = registry.build([*registry.BUILTIN, *EXTENSION.split(",")])
    assert versions.problems(built) == []
    assert {key for key in built.definitions} >= {("order", 1), ("loyalty", 1), ("loyalty", 2)}


def test_a_changed_released_version_is_named_with_what_to_do() -> None:
    built = registry.build([*registry.BUILTIN, "tests.extension.loyalty_changed"])
    [problem] = versions.problems(built)
    assert "definition loyalty v1 changed" in problem
    assert "register the new steps as loyalty v2" in problem
    with pytest.raises(versions.DefinitionChanged, match="loyalty v1"):
        versions.check(built)


def test_a_worker_refuses_to_start_on_a_changed_released_version() -> None:
    env = {
        **__import__("os").environ,
        registry.EXTRA_MODULES_ENV: "tests.extension.loyalty_changed",
    }
    result = subprocess.run(
        sagactl("worker", "points"), env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stderr
    assert "definition loyalty v1 changed" in result.stderr


def test_locking_adds_new_versions_and_never_rewrites_a_recorded_one(tmp_path: Path) -> None:
    lock = tmp_path / "definitions.lock"
    lock.write_text(json.dumps({"order": {"1": "recorded-long-ago"}}))
    v1 = Registered(ORDER_SAGA, build_payload, lock)
    v2 = Registered(replace(ORDER_SAGA, version=2), build_payload, lock)
    assert versions.lock_new([v1, v2]) == ["order v2"]
    assert json.loads(lock.read_text()) == {
        "order": {"1": "recorded-long-ago", "2": ORDER_SAGA.fingerprint()}
    }


def test_the_fingerprint_covers_what_a_step_is() -> None:
    base = ORDER_SAGA.fingerprint()
    assert replace(ORDER_SAGA, version=2).fingerprint() == base  # the version is not a step
    changed = [
        (*ORDER_SAGA.steps[:3], replace(ORDER_SAGA.steps[3], kind=StepKind.COMPENSATABLE)),
        (*ORDER_SAGA.steps[:1], replace(ORDER_SAGA.steps[1], timeout_s=5.0), *ORDER_SAGA.steps[2:]),
        (*ORDER_SAGA.steps, Step("orders.ship", "orders.ship", kind=StepKind.RETRIABLE)),
    ]
    for steps in changed:
        assert SagaDefinition("order", steps).fingerprint() != base


def test_an_unknown_task_has_no_queue() -> None:
    built = registry.build(registry.BUILTIN)
    assert built.queue_for("payment.charge") == "payment"
    assert built.queue_for("saga.reply") == registry.ORCHESTRATOR_QUEUE
    for unknown in ("shipping.send", "payment.teleport", "saga.unknown"):
        with pytest.raises(UnknownName):
            built.queue_for(unknown)


def test_a_command_of_an_undeclared_service_stops_the_registry() -> None:
    reg = Registry()
    definition = SagaDefinition("gift", (Step("wrap.it", "wrap.it"),))
    reg.add_saga(Registered(definition, build_payload, Path("unused.lock")), {}, object)  # type: ignore[arg-type]
    with pytest.raises(RegistryError, match="service 'wrap'"):
        reg.validate()


def test_definitions_keep_their_kinds_in_order() -> None:
    with pytest.raises(ValueError, match="after the pivot"):
        SagaDefinition("bad", (Step("a.x", "a.x", kind=StepKind.RETRIABLE),))
    with pytest.raises(ValueError, match="no compensation"):
        Step("a.x", "a.x", "a.undo", kind=StepKind.PIVOT)


def test_a_worker_without_a_handler_for_one_of_its_commands_is_found_out() -> None:
    import orchestrator.kernel.tasks  # noqa: F401  (the orchestrator's tasks)
    import workers.inventory
    import workers.orders
    import workers.payment  # noqa: F401
    from orchestrator.messaging.celery_app import app, missing_handlers

    queues = ["inventory", "payment", "orders", registry.ORCHESTRATOR_QUEUE]
    assert missing_handlers(app, queues) == []
    reg = registry.current()
    extra = SagaDefinition("spare", (Step("inventory.count", "inventory.count"),))
    reg.add_saga(Registered(extra, build_payload, Path("unused.lock")), {}, object)  # type: ignore[arg-type]
    try:
        assert missing_handlers(app, ["inventory"]) == ["inventory.count"]
    finally:
        registry.reset()
