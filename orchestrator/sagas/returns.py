"""The return saga, as the contract's table: a registry module (definition and payloads only).

Step 0 is done by the web in the transaction that starts the saga (the order moves
``confirmed -> returning``); the refund is the pivot; once it succeeded the stock goes back and
the order ends ``returned``, retried and parked for an operator if need be, never undone.
Starting a return: sagas/returning.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.enums import Reason, SagaState
from orchestrator.kernel.machine import SagaDefinition, Step, StepKind
from orchestrator.messaging.envelopes import OrderPayload, RetrySpec
from orchestrator.registry import Registered, Registry
from orchestrator.sagas import order

LOCK_FILE = Path(__file__).with_name("definitions.lock")

RETURN_SAGA = SagaDefinition(
    "return",
    (
        Step("orders.begin_return", compensation="orders.abort_return"),
        Step("payment.return_refund", "payment.return_refund", kind=StepKind.PIVOT),
        Step("inventory.return_stock", "inventory.return_stock", kind=StepKind.RETRIABLE),
        Step("orders.complete_return", "orders.complete_return", kind=StepKind.RETRIABLE),
    ),
    version=1,
)

# Invariant 4: the order statuses that go with each state of an order's latest return saga.
OUTCOMES = {
    SagaState.RUNNING: ("returning",),
    SagaState.COMPENSATING: ("returning", "confirmed"),
    SagaState.COMPLETED: ("returned",),
    SagaState.COMPENSATED: ("confirmed",),
    SagaState.FAILED: ("returning",),
}


def build_payload(
    command: str, context: dict[str, Any], retry: RetrySpec, reason: Reason | None
) -> OrderPayload:
    """Every command of a return names the order; the participants find the rest by it."""
    fault = (context.get("faults") or {}).get(command)
    return OrderPayload(order_id=context["order_id"], retry=retry, fault=fault)


def register(registry: Registry) -> None:
    for name, module in order.SERVICES.items():
        registry.add_service(name, module)
    registry.add_saga(
        Registered(RETURN_SAGA, build_payload, LOCK_FILE, outcomes=OUTCOMES), {}, OrderPayload
    )
