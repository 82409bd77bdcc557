"""The order saga, as the contract's table: one step per line, no logic in the definition.

Besides the definition: how each command's payload is built from the saga's context and what each
state of the saga means for the order (``on_state``, the business hook the kernel calls). A registry
module: it imports definitions and payload models only (never the engine or the Celery app), since
every process builds the registry before anything else. Starting an order: sagas/placing.py.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from models.enums import OrderStatus, Reason, SagaState
from models.orders import Order
from models.sagas import Saga
from orchestrator.kernel.machine import SagaDefinition, Step, StepKind
from orchestrator.messaging.envelopes import (
    ORDER_PAYLOADS,
    CancelPayload,
    ChargePayload,
    Line,
    OrderPayload,
    ReservePayload,
    RetrySpec,
)
from orchestrator.registry import Registered, Registry

LOCK_FILE = Path(__file__).with_name("definitions.lock")

ORDER_SAGA = SagaDefinition(
    "order",
    (
        Step("orders.create", compensation="orders.cancel"),
        Step(
            "inventory.reserve",
            "inventory.reserve",
            "inventory.release",
            refusal=Reason.OUT_OF_STOCK,
        ),
        Step("payment.charge", "payment.charge", "payment.refund", refusal=Reason.PAYMENT_DECLINED),
        # Confirm has no business "no" of its own; a refusal there is the step giving up.
        Step("orders.confirm", "orders.confirm", kind=StepKind.PIVOT),
    ),
    version=1,
)

# The shop's participant services: name -> the module its worker runs.
SERVICES = {
    "inventory": "workers.inventory",
    "payment": "workers.payment",
    "orders": "workers.orders",
}

# Invariant 4: the order statuses that go with each state of an order saga (the final ones
# as the contract states them; while it runs, the order is pending).
OUTCOMES = {
    SagaState.RUNNING: ("pending",),
    SagaState.COMPENSATING: ("pending",),
    SagaState.COMPLETED: ("confirmed", "returning", "returned"),
    SagaState.COMPENSATED: ("cancelled",),
    SagaState.FAILED: ("failed",),
}


def build_payload(
    command: str, context: dict[str, Any], retry: RetrySpec, reason: Reason | None
) -> OrderPayload:
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
            return OrderPayload(**common)


def on_state(session: Session, saga: Saga, state: SagaState, was: SagaState) -> None:
    """A parked saga fails its order; resuming it makes the order pending again, and a late
    success that completes it makes the order confirmed.

    Confirm and cancel are the orders service's own steps; only these moves follow the saga.
    """
    if state is SagaState.FAILED:
        # From pending, or from confirmed when a late confirm landed after the step timed out.
        values: dict[str, Any] = {"status": OrderStatus.FAILED, "reason": saga.reason}
        sources = [OrderStatus.PENDING, OrderStatus.CONFIRMED]
    elif state in (SagaState.COMPENSATING, SagaState.RUNNING) and was is SagaState.FAILED:
        values, sources = {"status": OrderStatus.PENDING}, [OrderStatus.FAILED]
    elif state is SagaState.COMPLETED and was is SagaState.FAILED:
        # A parked confirm's late success completes the saga straight from failed: the confirm
        # was made (it sold the stock), so the order is confirmed again.
        values = {"status": OrderStatus.CONFIRMED, "reason": None}
        sources = [OrderStatus.FAILED]
    else:
        return
    session.execute(
        sa.update(Order)
        .where(Order.id == uuid.UUID(saga.business_key), Order.status.in_(sources))
        .values(updated_at=sa.func.now(), **values)
    )


def register(registry: Registry) -> None:
    for name, module in SERVICES.items():
        registry.add_service(name, module)
    registry.add_saga(
        Registered(ORDER_SAGA, build_payload, LOCK_FILE, on_state=on_state, outcomes=OUTCOMES),
        dict(ORDER_PAYLOADS),
        OrderPayload,
    )
