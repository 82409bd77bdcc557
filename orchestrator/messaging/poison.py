"""A Celery consumer that dead-letters a message it cannot decode instead of acking it away.

Celery's stock consumer acks an undecodable message (``on_decode_error``), which would drop it
silently; the contract wants every poison message in the dead-letter queue with its reason.
It also sets up Celery's delayed delivery once per cluster rather than once per node (delayed.py).
"""

import logging
from typing import Any

from celery.worker.consumer import Consumer

log = logging.getLogger(__name__)


class RejectingConsumer(Consumer):
    class Blueprint(Consumer.Blueprint):
        # Celery's own steps, but delayed delivery set up once per cluster (delayed.py).
        default_steps = [
            "orchestrator.messaging.delayed:ClusterDelayedDelivery"
            if step.endswith(":DelayedDelivery")
            else step
            for step in Consumer.Blueprint.default_steps
        ]

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        log.error(
            "undecodable message rejected to the dead-letter queue: %s (content type %s)",
            exc,
            message.content_type,
        )
        message.reject(requeue=False)
