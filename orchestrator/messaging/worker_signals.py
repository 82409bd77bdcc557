"""Celery's signal handlers for our processes: logging, metrics, fork safety, startup checks.

Nothing here is connected at import: ``connect()`` is called once by the process's bootstrap
(orchestrator/bootstrap.py), so a module that merely imports Celery tasks attaches no behaviour.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import (
    after_task_publish,
    beat_init,
    setup_logging,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)

from orchestrator.messaging.celery_app import app, missing_handlers
from orchestrator.ops.config import settings


def _every_command_has_a_handler(sender: object = None, **_: object) -> None:
    """A worker whose module lacks a handler for one of its service's commands must not start:
    the command would wait in its queue for ever."""
    worker_app: Celery | None = getattr(sender, "app", None)
    if worker_app is None:
        return
    queues = [q.name for q in worker_app.amqp.queues.consume_from.values()]
    missing = missing_handlers(worker_app, queues)
    if missing:
        raise SystemExit(f"no handler for {', '.join(missing)} in this worker: add its participant")


def _fresh_pool_after_fork(**_: object) -> None:
    from models.db import dispose_after_fork
    from orchestrator.ops import tracing

    dispose_after_fork()
    tracing.after_fork()  # this pool process's own span exporter


def _write_sent_marks(**_: object) -> None:
    """A child leaving cleanly marks what its fast path published (else the relay resends it),
    its live gauges stop counting, and its spans are exported."""
    from orchestrator.messaging import fastpath
    from orchestrator.ops import process_metrics, tracing

    fastpath.flush()
    process_metrics.mark_exited()
    tracing.flush()  # a pool process leaves by os._exit: no atexit export


def _serve_metrics(**_: object) -> None:
    """The worker's (after its pool started) or beat's metrics endpoint, if it has a port."""
    from orchestrator.ops import process_metrics

    process_metrics.at_zero(tasks=[name for name in app.tasks if not name.startswith("celery.")])
    process_metrics.serve(settings().metrics_port, settings().metrics_addr)


def _task_started(task_id: str | None = None, **_: object) -> None:
    from orchestrator.ops import process_metrics

    process_metrics.task_started(task_id)


def _task_finished(
    task_id: str | None = None, task: Any = None, state: str | None = None, **_: object
) -> None:
    from orchestrator.ops import process_metrics

    process_metrics.task_finished(task_id, getattr(task, "name", "unknown"), state)


def _sent(sender: str | None = None, **_: object) -> None:
    from orchestrator.ops import process_metrics

    process_metrics.count_sent([sender or "unknown"])


def _our_logging(**_: object) -> None:
    """Replace Celery's log setup: every line carries the saga's ids (see orchestrator.ops.logs)."""
    from orchestrator.ops.logs import setup_logging as configure

    configure(settings().process or "worker")


def connect() -> None:
    """Attach every handler (Celery's signals hold them weakly unless told otherwise)."""
    worker_init.connect(_every_command_has_a_handler, weak=False)
    worker_process_init.connect(_fresh_pool_after_fork, weak=False)
    worker_process_shutdown.connect(_write_sent_marks, weak=False)
    worker_ready.connect(_serve_metrics, weak=False)
    beat_init.connect(_serve_metrics, weak=False)
    task_prerun.connect(_task_started, weak=False)
    task_postrun.connect(_task_finished, weak=False)
    after_task_publish.connect(_sent, weak=False)
    setup_logging.connect(_our_logging, weak=False)
