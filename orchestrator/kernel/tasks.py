"""The orchestrator's Celery tasks: participant replies, the periodic sweep, and the release of a
resumed service's held commands (orchestrator/kernel/release.py).

Like a web view: unpack, call the engine, return. Started by ``sagactl worker orchestrator``
(orchestrator/bootstrap.py wires the worker: these tasks, the batch consumer, the dead-letter
intake, the hooks).

The worker takes its queue in batches (``on_batch``, through orchestrator/messaging/batches.py):
every reply that is waiting, applied in one transaction, the commands published after the
commit with pipelined confirms, then the acks. ``SAGA_BATCH_MAX=0`` turns that off: Celery then
runs the ``saga.reply`` task below for each reply, one transaction each.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from celery import Task
from celery.exceptions import Reject
from sqlalchemy.exc import DBAPIError

from models.db import run_in_transaction
from orchestrator.kernel import engine, release, replies, service_states, sweeper
from orchestrator.messaging import batches, fastpath
from orchestrator.messaging.celery_app import app
from orchestrator.messaging.envelopes import PoisonMessage, Reply, parse_reply
from orchestrator.ops import failpoints, tracing
from orchestrator.registry import ORCHESTRATOR_QUEUE

log = logging.getLogger(__name__)

# A database outage is retried for a while (about a minute); past that the reply is
# dead-lettered, recorded, and the step's deadline makes the sweeper ask again. Celery counts this
# backoff in whole seconds (int(max(1.0, backoff)) in celery/app/autoretry.py): 1, 2, 4, 8, 10...
# each an upper bound under jitter. A batch reruns on the same schedule (batches.TRANSIENT_RETRIES).
_DB_RETRY = {
    "autoretry_for": (DBAPIError,),
    "max_retries": 12,
    "retry_backoff": 1,
    "retry_backoff_max": 10,
    "retry_jitter": True,
}


@app.task(name="saga.reply", bind=True, **_DB_RETRY)
def reply(self: Task, envelope: Any) -> str:
    try:
        msg = parse_reply(envelope)
    except PoisonMessage as exc:
        raise Reject(str(exc), requeue=False) from exc
    tracing.tag(tracing.envelope_attributes(envelope, vars(self.request)))  # the run's span

    def work(session: Any) -> str:
        saga = engine.lock_saga(session, msg.saga_id)
        if saga is None:
            return replies.UNKNOWN_SAGA
        return replies.apply_reply(session, saga, msg)

    result = run_in_transaction(work)
    if result != replies.UNKNOWN_SAGA:
        replies.observe(msg)
    failpoints.hit("orchestrator.after_commit")
    replies.log_applied(msg, result)
    return result


@app.task(name="saga.sweep")
def sweep() -> dict[str, int]:
    report = sweeper.sweep()
    if report.sagas_acted_on or report.outbox_relayed or report.bulk_acted or report.probes:
        log.info("sweep: %s", report)
    return {
        "sagas": report.sagas_acted_on,
        "outbox": report.outbox_relayed,
        "bulk": report.bulk_acted,
        "probes": report.probes,
    }


def on_batch(deliveries: list[batches.Delivery]) -> batches.Outcome:
    """Every message waiting on the orchestrator's queue: the replies in one transaction, then
    (beat's ticks) one sweep, and the releases asked for (each drains beside the consumer, at its
    rate: release.drain_in_background). Returns the commands to publish and what to dead-letter."""
    outcome = batches.Outcome()
    taken: list[tuple[batches.Delivery, Reply]] = []
    ticks = []
    releases: list[batches.Delivery] = []
    for d in deliveries:
        if d.task == "saga.sweep":
            ticks.append(d)
        elif d.task == service_states.RELEASE_TASK:
            releases.append(d)
        elif d.task != "saga.reply":
            outcome.rejected.append((d, f"no handler for {d.task} on {ORCHESTRATOR_QUEUE}"))
        else:
            try:
                taken.append((d, parse_reply(d.args[0] if d.args else None)))
            except PoisonMessage as exc:
                log.error("poison reply rejected to the dead-letter queue: %s", exc)
                outcome.rejected.append((d, str(exc)))
    if taken:
        spans = [d.span for d, _ in taken] if tracing.enabled() else None
        applied = replies.apply_batch([msg for _, msg in taken], spans)
        for i, ((d, msg), result) in enumerate(zip(taken, applied.results, strict=True)):
            if i in applied.refused:
                outcome.rejected.append((d, applied.refused[i]))
            else:
                replies.observe(msg)
            with tracing.current(d.span):
                replies.log_applied(msg, result or applied.refused[i])
        outcome.publish = applied.publish  # the batch's commands, sent by batches.py

        def after_publish() -> None:
            fastpath.published(applied.publish)  # marked sent by this process's next commit
            failpoints.hit("orchestrator.after_commit", batch=len(taken))

        outcome.after_publish = after_publish
    due = [d for d in ticks if not _expired(d)]
    if due:
        with tracing.current(due[0].span):  # what it re-sends links to this run
            sweep()  # several ticks in one batch: one sweep does their work
    for d in releases:
        service = d.args[0] if d.args and isinstance(d.args[0], str) else None
        if service is None:
            outcome.rejected.append((d, f"{d.task} takes a service's name"))
        else:
            release.drain_in_background(service)
    return outcome


def _expired(tick: batches.Delivery) -> bool:
    """Beat's ticks expire (``expires``): one that waited past it is left to the next one."""
    expires = tick.headers.get("expires")
    if not expires:
        return False
    try:
        return datetime.fromisoformat(str(expires)) < datetime.now(UTC)
    except ValueError:
        return False

