"""What every participant task does around its local work: validate, apply faults, retry, reply.

A task is a thin named wrapper over a plain function ``(session, command, payload) -> Result`` that
does the local change and records its outcome under the saga's unique key in one transaction
(workers/applying.py). A business refusal is a failure reply; only transient errors raise, and
they retry with exponential backoff and full jitter (delayed by the broker, not held in memory).
When the budget is spent the error propagates: the message is rejected and RabbitMQ dead-letters
it. This is the path of one message per Celery task; under a batch consumer (batching.py, the
default) the same functions apply whole batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Task
from celery.exceptions import Reject
from sqlalchemy.orm import Session

from orchestrator.messaging.celery_app import app
from orchestrator.messaging.envelopes import (
    Command,
    CommandPayload,
    PoisonMessage,
    parse_command,
)
from orchestrator.ops import tracing
from workers.applying import (
    PARTICIPANTS,
    Incoming,
    Participant,
    Prepare,
    Result,
    apply_alone,
    send_reply,
)

__all__ = ["Result", "participant", "run", "send_reply"]

log = logging.getLogger(__name__)

P = TypeVar("P", bound=CommandPayload)


def run(task: Task, envelope: Any) -> str:
    try:
        command = parse_command(envelope, expected_type=task.name)
    except PoisonMessage as exc:
        log.error("poison message rejected: %s", exc)
        raise Reject(str(exc), requeue=False) from exc
    incoming = Incoming(
        command,
        retries=task.request.retries,
        redelivered=bool((task.request.delivery_info or {}).get("redelivered")),
    )
    if tracing.enabled():  # the Celery instrumentation's run span: the saga's ids on it
        tracing.tag({**tracing.envelope_attributes(envelope), tracing.ATTEMPT: incoming.attempt})
    verdict = apply_alone(incoming)
    if verdict.error is not None:
        raise verdict.error  # Celery rejects it (acks_on_failure off): dead-lettered
    assert verdict.reply is not None
    send_reply(command, incoming.attempt, verdict.reply)
    if verdict.retry_in_s is not None:
        raise _retry_later(task, verdict.retry_in_s)
    return verdict.reply.outcome.value


def _retry_later(task: Task, delay: float) -> Exception:
    """Schedule the next attempt ``delay`` seconds from now.

    RabbitMQ holds delays of a second or more (Celery's native delayed delivery on quorum queues),
    but its routing key counts whole seconds and refuses a countdown under one; a shorter wait is
    slept here, which holds the message for less than a second.
    """
    if delay < 1.0:
        time.sleep(delay)
        return task.retry(countdown=0, max_retries=None)  # None would mean 3 minutes
    return task.retry(countdown=delay, max_retries=None)


def participant(
    name: str, *, prepare: Prepare | None = None
) -> Callable[[Callable[[Session, Command, P], Result]], Task]:
    """Register ``fn`` as the handler of command ``name``: the Celery task ``name`` (routed to
    its service's queue; one message a task when ``SAGA_BATCH_MAX=0``) and the handler the batch
    consumer of that queue calls (workers/batching.py, wired by orchestrator/bootstrap.py). ``prepare`` runs once at the start of
    each transaction, with all its commands of this kind (stock.lock_for locks their products)."""

    def register(fn: Callable[[Session, Command, P], Result]) -> Task:
        PARTICIPANTS[name] = Participant(name, fn, prepare)

        def task_body(self: Task, envelope: Any) -> str:
            return run(self, envelope)

        task_body.__name__ = fn.__name__
        task_body.__doc__ = fn.__doc__
        task: Task = app.task(name=name, bind=True)(task_body)
        return task

    return register
