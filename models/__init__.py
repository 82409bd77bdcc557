"""The database of record: typed SQLAlchemy models, one module per aggregate."""

from models.base import Base
from models.catalog import Product
from models.deadletters import DeadLetter
from models.operations import Operation, OperationItem
from models.orders import IdempotencyKey, Order, OrderLine
from models.outbox import OutboxMessage
from models.participants import Charge, Reservation
from models.sagas import Saga, SagaEvent, SagaStep
from models.services import ServiceAudit, ServiceCalls, ServiceState

__all__ = [
    "Base",
    "Charge",
    "DeadLetter",
    "IdempotencyKey",
    "Operation",
    "OperationItem",
    "Order",
    "OrderLine",
    "OutboxMessage",
    "Product",
    "Reservation",
    "Saga",
    "SagaEvent",
    "SagaStep",
    "ServiceAudit",
    "ServiceCalls",
    "ServiceState",
]
