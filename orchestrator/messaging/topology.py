"""Exchanges and queues, declared once, as data, from the registry's services. Routing key = queue name.

Every service queue is a durable quorum queue that dead-letters (at least once) into ``saga.dlx``,
where each service has its own ``<queue>.dead`` queue. The delivery limit ends redelivery loops of a
message that kills its worker. The task exchange is a topic exchange because Celery's native delayed
delivery (retries with a countdown, held by the broker, not in worker memory) requires one.

Each quorum queue starts with ``SAGA_QUEUE_REPLICAS`` replicas (``x-quorum-initial-group-size``;
not sent when the setting is unset, so queues declared before it existed stay acceptable), read
when the queues are built, so a process pointed at another broker (``use_sandbox``) declares what
the processes it talks to declare. Declaring is idempotent: many processes may declare at
once, as long as they agree on the arguments (the broker refuses an inequivalent one).
"""

from kombu import Exchange, Queue

from orchestrator import registry
from orchestrator.ops.config import settings

TASK_EXCHANGE = Exchange("saga", type="topic", durable=True)
DEAD_LETTER_EXCHANGE = Exchange("saga.dlx", type="direct", durable=True)

# Well above the redeliveries a healthy message sees when connections are cut (FACTS.md).
DELIVERY_LIMIT = 20

ORCHESTRATOR_QUEUE = registry.ORCHESTRATOR_QUEUE


def service_queue_names() -> tuple[str, ...]:
    """Every participant service's queue (from the registry), then the orchestrator's."""
    return (*(s.queue for s in registry.current().services.values()), ORCHESTRATOR_QUEUE)


def dead_letter_queue_name(queue: str) -> str:
    return f"{queue}.dead"


def replicas_argument(replicas: int | None) -> dict[str, int]:
    return {} if replicas is None else {"x-quorum-initial-group-size": replicas}


def service_queue(name: str, replicas: int | None) -> Queue:
    """A work queue as the services' are: quorum, dead-lettering into ``<name>.dead``."""
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
            **replicas_argument(replicas),
        },
    )


def dead_letter_queue(name: str, replicas: int | None) -> Queue:
    dead = dead_letter_queue_name(name)
    return Queue(
        dead,
        DEAD_LETTER_EXCHANGE,
        routing_key=dead,
        durable=True,
        queue_arguments={"x-queue-type": "quorum", **replicas_argument(replicas)},
    )


def service_queues() -> dict[str, Queue]:
    """The task queues, with the configured replica count."""
    replicas = settings().queue_replicas
    return {name: service_queue(name, replicas) for name in service_queue_names()}


def dead_letter_queues() -> dict[str, Queue]:
    """Not in Celery's task_queues: only the orchestrator's dead-letter intake consumes these."""
    replicas = settings().queue_replicas
    return {name: dead_letter_queue(name, replicas) for name in service_queue_names()}


def queue_for_task(task_name: str) -> str:
    """``payment.charge`` -> ``payment``; ``saga.reply``/``saga.sweep`` -> the orchestrator's.

    An unknown task raises ``registry.UnknownName``: nothing is routed to a default queue.
    """
    return registry.current().queue_for(task_name)


def declare_all(channel: object) -> None:
    """Declare every exchange and queue (idempotent); run by every process that publishes."""
    for queue in (*service_queues().values(), *dead_letter_queues().values()):
        queue.bind(channel).declare()
