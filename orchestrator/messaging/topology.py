"""Exchanges and queues, declared once, as data. Routing key = queue name.

Every service queue is a durable quorum queue that dead-letters (at least once) into ``saga.dlx``,
where each service has its own ``<queue>.dead`` queue. The delivery limit ends redelivery loops of a
message that kills its worker. The task exchange is a topic exchange because Celery's native delayed
delivery (retries with a countdown, held by the broker, not in worker memory) requires one.
"""

from kombu import Exchange, Queue

TASK_EXCHANGE = Exchange("saga", type="topic", durable=True)
DEAD_LETTER_EXCHANGE = Exchange("saga.dlx", type="direct", durable=True)

# Well above the redeliveries a healthy message sees when connections are cut (FACTS.md).
DELIVERY_LIMIT = 20

SERVICES = ("inventory", "payment", "orders")
ORCHESTRATOR_QUEUE = "saga.orchestrator"
SERVICE_QUEUE_NAMES = (*SERVICES, ORCHESTRATOR_QUEUE)


def dead_letter_queue_name(queue: str) -> str:
    return f"{queue}.dead"


def _service_queue(name: str) -> Queue:
    return Queue(
        name,
        TASK_EXCHANGE,
        routing_key=name,
        durable=True,
        queue_arguments={
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE.name,
            "x-dead-letter-routing-key": dead_letter_queue_name(name),
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
            "x-delivery-limit": DELIVERY_LIMIT,
        },
    )


def _dead_letter_queue(name: str) -> Queue:
    dead = dead_letter_queue_name(name)
    return Queue(
        dead,
        DEAD_LETTER_EXCHANGE,
        routing_key=dead,
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )


SERVICE_QUEUES: dict[str, Queue] = {name: _service_queue(name) for name in SERVICE_QUEUE_NAMES}
# Not in Celery's task_queues: only the orchestrator's dead-letter intake consumes these.
DEAD_LETTER_QUEUES: dict[str, Queue] = {
    name: _dead_letter_queue(name) for name in SERVICE_QUEUE_NAMES
}


def queue_for_task(task_name: str) -> str:
    """``payment.charge`` -> ``payment``; orchestrator tasks (``saga.*``) -> its own queue."""
    service = task_name.split(".", 1)[0]
    return service if service in SERVICES else ORCHESTRATOR_QUEUE


def declare_all(channel: object) -> None:
    """Declare every exchange and queue (idempotent); run by every process that publishes."""
    for queue in (*SERVICE_QUEUES.values(), *DEAD_LETTER_QUEUES.values()):
        queue.bind(channel).declare()
