"""A released version changed in place (a timeout added to loyalty v1 without a new version):
what the lock file exists to catch. Used by tests only, to see processes refuse to start."""

from __future__ import annotations

from dataclasses import replace

from orchestrator.kernel.machine import SagaDefinition
from orchestrator.registry import Registered, Registry
from tests.extension import loyalty

CHANGED_V1 = SagaDefinition(
    "loyalty",
    (replace(loyalty.LOYALTY_V1.steps[0], timeout_s=99.0), *loyalty.LOYALTY_V1.steps[1:]),
    version=1,
)


def register(registry: Registry) -> None:
    registry.add_service("points", "tests.extension.worker")
    registry.add_service("ledger", "tests.extension.worker")
    registry.add_saga(
        Registered(CHANGED_V1, loyalty.build_payload, loyalty.LOCK_FILE),
        loyalty.PAYLOADS,
        loyalty.MemberPayload,
    )
