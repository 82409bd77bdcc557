"""Every status vocabulary of the contract, shared by the state machine, the models and the pages."""

from enum import StrEnum


class SagaState(StrEnum):
    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.FAILED)


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


class CompensationStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PARKED = "parked"


class OrderStatus(StrEnum):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    RETURNING = "returning"  # a return saga is refunding it and taking the stock back
    RETURNED = "returned"


class Reason(StrEnum):
    """Why an order was cancelled or failed: the cause that started the compensation."""

    OUT_OF_STOCK = "out_of_stock"
    PAYMENT_DECLINED = "payment_declined"
    RETRIES_EXHAUSTED = "retries_exhausted"
    TIMEOUT = "timeout"
    OPERATOR = "operator"


class ReservationStatus(StrEnum):
    RESERVED = "reserved"
    REJECTED = "rejected"  # out of stock: nothing held
    SOLD = "sold"  # the order was confirmed
    RELEASED = "released"
    VOIDED = "voided"  # released before any reserve arrived: fences a late reserve
    RETURNED = "returned"  # sold, then the order was returned: the stock is available again


class ChargeStatus(StrEnum):
    CHARGED = "charged"
    DECLINED = "declined"
    REFUNDED = "refunded"
    VOIDED = "voided"  # refunded before any charge arrived: fences a late charge


class DeadLetterState(StrEnum):
    DEAD = "dead"
    REPLAYED = "replayed"
    DISCARDED = "discarded"
