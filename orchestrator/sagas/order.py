"""The order saga, as the contract's table: one step per line, no logic in the definition."""

from __future__ import annotations

from typing import Any

from models.enums import Reason
from orchestrator.kernel.machine import SagaDefinition, Step
from orchestrator.messaging.envelopes import (
    CancelPayload,
    ChargePayload,
    CommandPayload,
    Line,
    ReservePayload,
    RetrySpec,
)

ORDER_SAGA = SagaDefinition(
    "order",
    (
        Step("orders.create", compensation="orders.cancel"),
        Step("inventory.reserve", "inventory.reserve", "inventory.release"),
        Step("payment.charge", "payment.charge", "payment.refund"),
        Step("orders.confirm", "orders.confirm"),
    ),
)

# What a business refusal ("fail") of each action means for the order.
REFUSAL_REASON = {
    "inventory.reserve": Reason.OUT_OF_STOCK,
    "payment.charge": Reason.PAYMENT_DECLINED,
    # Confirm has no business "no" of its own; a refusal there is the step giving up.
    "orders.confirm": Reason.RETRIES_EXHAUSTED,
}

DEFINITIONS = {ORDER_SAGA.name: ORDER_SAGA}


def build_payload(
    command: str, context: dict[str, Any], retry: RetrySpec, reason: Reason | None
) -> CommandPayload:
    """The payload of ``command`` from the saga's stored context."""
    common: dict[str, Any] = {
        "order_id": context["order_id"],
        "retry": retry,
        "fault": (context.get("faults") or {}).get(command),
    }
    match command:
        case "inventory.reserve":
            return ReservePayload(items=[Line(**line) for line in context["items"]], **common)
        case "payment.charge":
            return ChargePayload(
                amount_cents=context["total_cents"], card_token=context["card_token"], **common
            )
        case "orders.cancel":
            return CancelPayload(reason=reason or Reason.OPERATOR, **common)
        case _:
            return CommandPayload(**common)
