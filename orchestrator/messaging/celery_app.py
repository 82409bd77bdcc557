"""The one Celery app, and the settings that make delivery durable (see README, failure model).

- acks_late + acks_on_failure=False: a message is acked only after its task finished; a task that
  fails for good is rejected (not acked), so RabbitMQ dead-letters it.
- time limits: a task past its soft limit gets ``SoftTimeLimitExceeded`` (participants retry it as
  transient); past the hard limit its pool process is killed and, with acks_on_timeout=False, the
  message is requeued (redelivered; the delivery limit dead-letters one that keeps hanging).
- reject_on_worker_lost: a message whose worker process died is requeued, not acked; the quorum
  queue's delivery limit bounds that loop.
- confirm_publish: every publish waits for the broker's confirm (quorum queues need it).
- persistent messages, durable quorum queues, no result backend (replies are messages).
"""

from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_process_init, worker_process_shutdown

from orchestrator.messaging.topology import TASK_EXCHANGE, queue_for_task, service_queues
from orchestrator.ops.config import Settings, settings

# kombu treats a nack during a quorum queue's leader election (about 0.3 s) as a connection error
# and retries at once; Celery's default of 3 retries let 1-2 publishes fail there (FACTS.md). 40
# retries spaced 0.05 s to 0.5 s apart ride out an election or a node's loss (about 15 s in
# all) and still fail, loudly, when no node is left.
PUBLISH_RETRY_POLICY = {
    "max_retries": 40,
    "interval_start": 0.0,
    "interval_step": 0.05,
    "interval_max": 0.5,
}


def _route(
    name: str, args: object, kwargs: object, options: object, task: object = None, **kw: object
) -> dict[str, str]:
    queue = queue_for_task(name)
    return {"queue": queue, "exchange": TASK_EXCHANGE.name, "routing_key": queue}


def celery_settings(cfg: Settings) -> dict[str, Any]:
    """The app's settings, as data (a test checks that Celery 5.7 reads every one of them)."""
    return dict(
        task_queues=list(service_queues().values()),
        task_default_exchange=TASK_EXCHANGE.name,
        task_default_exchange_type=TASK_EXCHANGE.type,
        task_default_queue="saga.orchestrator",
        task_routes=(_route,),
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_acks_on_failure=False,
        task_acks_on_timeout=False,
        task_time_limit=cfg.task_time_limit_s,
        task_soft_time_limit=cfg.task_soft_time_limit_s or None,
        task_reject_on_worker_lost=True,
        task_default_delivery_mode="persistent",
        task_publish_retry=True,
        task_publish_retry_policy=PUBLISH_RETRY_POLICY,
        worker_prefetch_multiplier=cfg.prefetch,
        worker_concurrency=cfg.worker_concurrency,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_consumer="orchestrator.messaging.poison:RejectingConsumer",
        worker_hijack_root_logger=False,
        broker_transport_options={"confirm_publish": True},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_send_task_events=False,
        # No broadcast control channel (pidbox): nothing here uses it, and it is one less
        # exclusive queue per worker name.
        worker_enable_remote_control=False,
        task_send_sent_event=False,
        beat_schedule={
            "sweep": {
                "task": "saga.sweep",
                "schedule": cfg.sweep_s,
                "options": {"expires": cfg.sweep_s * 2},
            },
        },
    )


def create_celery() -> Celery:
    cfg = settings()
    app = Celery("saga", broker=cfg.broker_url)
    app.conf.update(celery_settings(cfg))
    return app


app = create_celery()


@worker_process_init.connect
def _fresh_pool_after_fork(**_: object) -> None:
    from models.db import dispose_after_fork

    dispose_after_fork()


@worker_process_shutdown.connect
def _write_sent_marks(**_: object) -> None:
    """A child leaving cleanly marks what its fast path published (else the relay resends it)."""
    from orchestrator.messaging import fastpath

    fastpath.flush()


@setup_logging.connect
def _our_logging(**_: object) -> None:
    """Replace Celery's log setup: every line carries the saga's ids (see orchestrator.ops.logs)."""
    from orchestrator.ops.logs import setup_logging as configure

    configure(settings().process or "worker")
