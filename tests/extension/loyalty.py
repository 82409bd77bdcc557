"""The loyalty saga, version 1: a registry module (definitions and payload models only).

Award a member points, then post their cost to the ledger (the pivot). A ledger refusal (a cost
over its limit) takes the points back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from models.enums import Reason
from orchestrator.kernel.machine import SagaDefinition, Step, StepKind
from orchestrator.messaging.envelopes import CommandPayload, RetrySpec
from orchestrator.registry import Registered, Registry

LOCK_FILE = Path(__file__).with_name("definitions.lock")
LEDGER_TIMEOUT_S = 120.0

LOYALTY_V1 = SagaDefinition(
    "loyalty",
    (
        Step("points.award", "points.award", "points.revoke"),
        # A posting may wait a while for the ledger (the versions test holds it there).
        Step("ledger.post", "ledger.post", kind=StepKind.PIVOT, timeout_s=LEDGER_TIMEOUT_S),
    ),
    version=1,
)


class MemberPayload(CommandPayload):
    """Every loyalty command is about one member."""

    member: str = Field(min_length=1, max_length=64)

    @property
    def business_key(self) -> str | None:
        return self.member


class AwardPayload(MemberPayload):
    points: int = Field(ge=1, le=10_000)


class PostPayload(MemberPayload):
    cost_cents: int = Field(ge=0)


PAYLOADS: dict[str, type[CommandPayload]] = {
    "points.award": AwardPayload,
    "ledger.post": PostPayload,
}


def build_payload(
    command: str, context: dict[str, Any], retry: RetrySpec, reason: Reason | None
) -> CommandPayload:
    fields = {
        "member": context["member"],
        "points": context["points"],
        "cost_cents": context["points"] * 10,
        "retry": retry,
        "fault": (context.get("faults") or {}).get(command),
    }
    model = PAYLOADS.get(command, MemberPayload)
    return model(**{k: v for k, v in fields.items() if k in model.model_fields})


def register(registry: Registry) -> None:
    registry.add_service("points", "tests.extension.worker")
    registry.add_service("ledger", "tests.extension.worker")
    registry.add_saga(Registered(LOYALTY_V1, build_payload, LOCK_FILE), PAYLOADS, MemberPayload)
