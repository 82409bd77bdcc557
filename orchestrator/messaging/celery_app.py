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
- task events and remote control (pidbox) only with ``SAGA_CELERY_EVENTS=1``: Flower and
  ``celery inspect`` then see every worker. Off by default: each task then costs no event
  messages, and each worker no control queue.
"""

from typing import Any

from celery import Celery

from orchestrator import registry
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
        # Events and the broadcast control channel (pidbox) for Flower and `celery inspect`.
        # Safe to turn on: every worker has a node name of its own (`<name>-<pid>@host`, or
        # SAGA_WORKER_NODE), so two workers never share one mailbox.
        worker_send_task_events=cfg.celery_events,
        worker_enable_remote_control=cfg.celery_events,
        task_send_sent_event=cfg.celery_events,
        beat_schedule={
            "sweep": {
                "task": "saga.sweep",
                "schedule": cfg.sweep_s,
                "options": {"expires": cfg.sweep_s * 2},
            },
        },
    )


def configure(app: Celery, cfg: Settings) -> Celery:
    """Give ``app`` the settings above (the process's bootstrap does this once)."""
    if app.conf.broker_url != cfg.broker_url:
        # Its pooled connections still lead to the old broker (a test that switched sandboxes,
        # from a cluster that is gone), and its queue declarations carry the old replica count:
        # both dropped here, made anew from the settings below on the next publish.
        app.close()
        for cached in ("queues", "default_queue"):
            vars(app.amqp).pop(cached, None)
    app.conf.broker_url = cfg.broker_url
    app.conf.update(celery_settings(cfg))
    return app


def create_celery() -> Celery:
    """A configured app of its own (the bench's raw chain: the same settings as the saga's)."""
    return configure(Celery("saga"), settings())


# The app the tasks are declared on. Importing this module configures nothing beyond the broker
# URL (enough for ``celery -A orchestrator.messaging.celery_app inspect ping``); queues, routes,
# acks and signals are wired by orchestrator/bootstrap.py.
app = Celery("saga", broker=settings().broker_url)


def missing_handlers(app: Celery, queues: list[str]) -> list[str]:
    """The registry's commands (or orchestrator tasks) of ``queues`` with no task in ``app``."""
    reg = registry.current()
    wanted: list[str] = []
    for queue in queues:
        if queue == registry.ORCHESTRATOR_QUEUE:
            wanted += registry.ORCHESTRATOR_TASKS
        else:
            wanted += reg.commands_of(reg.service(queue).name)
    return [name for name in wanted if name not in app.tasks]
