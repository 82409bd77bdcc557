"""Celery's native delayed delivery set up once per cluster, not once per node of ``BROKER_URL``.

Celery's ``DelayedDelivery`` consumer step treats each ``;``-separated URL as a broker of its own
and declares its exchanges and bindings on every one, retrying a dead node for about nine seconds
(1 + 3 + 5 s) before it lets the consumer start. On a cluster those declarations are cluster-wide,
so one node that answers is enough: seen here, a worker reconnecting after a node's SIGKILL
consumed nothing for about 15 s until this step gave up on the dead node.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer.delayed_delivery import DelayedDelivery
from kombu.utils.url import maybe_sanitize_url

from orchestrator.messaging.topology import declare_all

log = logging.getLogger(__name__)

ROUNDS = 3  # over every node, before giving up as Celery's own step does


class ClusterDelayedDelivery(DelayedDelivery):
    def start(self, c: Any) -> None:
        # Celery binds every task queue to its delay exchanges here, and a queue that does not
        # exist yet fails the whole setup (then a countdown's message is lost). Celery's own
        # consumer used to declare the worker's queue first; a batched queue is left to its batch
        # consumer (batches.py), so every queue is declared here, before the bindings.
        with c.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=3)
            declare_all(conn.default_channel)
        urls = self._validate_broker_urls(c.app.conf.broker_url)
        if len(urls) == 1:
            super().start(c)  # one broker: Celery's retries as they are
            return
        self._validate_configuration(c.app)
        for _ in range(ROUNDS):
            for url in urls:
                try:
                    self._setup_delayed_delivery(c, url)
                    return
                except Exception as exc:  # the next node may answer
                    log.warning(
                        "delayed delivery setup on %s failed (%s); trying the next node",
                        maybe_sanitize_url(url),
                        exc,
                    )
        log.critical("delayed delivery could not be set up on any node of %d", len(urls))
