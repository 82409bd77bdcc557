"""The loyalty saga, version 2: one more step (a retriable bonus after the pivot).

Registered beside version 1 (``SAGA_REGISTRY_MODULES=tests.extension.loyalty,
tests.extension.loyalty_v2``): sagas started on version 1 finish on it; new ones run this one.
Adding the step took its line below, its payload model and its handler (``bonus`` in worker.py),
plus the lock-file entry ``sagactl definitions --lock`` wrote.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from models.enums import Reason
from orchestrator.kernel.machine import SagaDefinition, Step, StepKind
from orchestrator.messaging.envelopes import CommandPayload, RetrySpec
from orchestrator.registry import Registered, Registry
from tests.extension import loyalty

LOYALTY_V2 = SagaDefinition(
    "loyalty",
    (
        Step("points.award", "points.award", "points.revoke"),
        Step("ledger.post", "ledger.post", kind=StepKind.PIVOT, timeout_s=loyalty.LEDGER_TIMEOUT_S),
        Step("points.bonus", "points.bonus", kind=StepKind.RETRIABLE),
    ),
    version=2,
)


class BonusPayload(loyalty.MemberPayload):
    bonus: int = Field(ge=0)


def build_payload(
    command: str, context: dict[str, Any], retry: RetrySpec, reason: Reason | None
) -> CommandPayload:
    if command == "points.bonus":
        fault = (context.get("faults") or {}).get(command)
        return BonusPayload(
            member=context["member"], bonus=context["points"] // 10, retry=retry, fault=fault
        )
    return loyalty.build_payload(command, context, retry, reason)


def register(registry: Registry) -> None:
    registry.add_saga(
        Registered(LOYALTY_V2, build_payload, loyalty.LOCK_FILE),
        {**loyalty.PAYLOADS, "points.bonus": BonusPayload},
        loyalty.MemberPayload,
    )
