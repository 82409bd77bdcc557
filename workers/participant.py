"""What every participant task does around its local work: validate, apply faults, retry, reply.

A task is a thin named wrapper over a plain function ``(session, command, payload) -> Result`` that
does the local change and records its outcome under the saga's unique key in one transaction. A
business refusal is a failure reply; only transient errors raise, and they retry with exponential
backoff and full jitter (delayed by the broker, not held in memory). When the budget is spent the
error propagates: the message is rejected and RabbitMQ dead-letters it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from models.db import is_retryable, run_in_transaction
from orchestrator.kernel.machine import RetryPolicy
from orchestrator.messaging.celery_app import app
from orchestrator.messaging.envelopes import (
    Command,
    CommandPayload,
    PoisonMessage,
    ReplyOutcome,
    ReplyPayload,
    make_reply,
    parse_command,
    trace_headers,
)
from orchestrator.ops import tracing
from orchestrator.ops.logs import log_context
from workers import faults

log = logging.getLogger(__name__)

P = TypeVar("P", bound=CommandPayload)


@dataclass(frozen=True)
class Result:
    succeeded: bool
    reason: str | None = None
    applied_now: bool = False  # this attempt made the change (not found it recorded)


Handler = Callable[[Session, Command, Any], Result]


def _is_transient(exc: BaseException) -> bool:
    # A task past its soft time limit (a hung call) is tried again like any other passing failure.
    transient = (
        faults.TransientError,
        BrokerError,
        ConnectionError,
        TimeoutError,
        SoftTimeLimitExceeded,
    )
    if isinstance(exc, transient):
        return True
    return isinstance(exc, DBAPIError) and is_retryable(exc)


def send_reply(command: Command, attempt: int, payload: ReplyPayload) -> None:
    envelope = make_reply(command, attempt, payload)
    headers = trace_headers(
        {**envelope, "payload": {"order_id": command.typed_payload().business_key}}
    )
    attributes = tracing.envelope_attributes(envelope, headers)
    with tracing.producing(headers, f"reply {envelope['type']}", attributes):
        app.send_task("saga.reply", args=[envelope], headers=headers)


def run(task: Task, envelope: Any, handler: Handler) -> str:
    try:
        command = parse_command(envelope, expected_type=task.name)
    except PoisonMessage as exc:
        log.error("poison message rejected: %s", exc)
        raise Reject(str(exc), requeue=False) from exc
    payload = command.typed_payload()
    tries = task.request.retries + 1  # tries of this dispatch, against its budget
    attempt = command.attempt + task.request.retries  # the step's attempt number, for people
    redelivered = bool((task.request.delivery_info or {}).get("redelivered"))
    tracing.tag({**tracing.envelope_attributes(envelope), tracing.ATTEMPT: attempt})
    with log_context(
        saga_id=command.saga_id,
        order_id=payload.business_key,
        step=command.type,
        request_id=command.request_id,
    ):
        try:
            faults.before_work(payload.fault, command, attempt, redelivered)
            result = run_in_transaction(lambda session: handler(session, command, payload))
            faults.after_work(payload.fault, command, attempt, result.applied_now)
        except faults.InjectedRefusal as exc:
            result = Result(False, reason=str(exc))
        except Exception as exc:
            if not _is_transient(exc):
                raise
            if tries >= payload.retry.attempts:
                log.error("attempt %d failed, no attempts left (dead-lettering): %s", attempt, exc)
                raise
            policy = RetryPolicy(payload.retry.attempts, payload.retry.base_s, payload.retry.max_s)
            delay = policy.delay(tries)
            log.warning("attempt %d failed, retrying in %.2fs: %s", attempt, delay, exc)
            send_reply(
                command,
                attempt,
                ReplyPayload(
                    outcome=ReplyOutcome.RETRYING,
                    error=f"{type(exc).__name__}: {exc}"[:500],
                    retry_in_s=round(delay, 3),
                ),
            )
            raise _retry_later(task, delay) from exc
        outcome = ReplyOutcome.SUCCEEDED if result.succeeded else ReplyOutcome.FAILED
        send_reply(command, attempt, ReplyPayload(outcome=outcome, reason=result.reason))
        # "changed nothing" marks a duplicate, a redelivery or a compensation with nothing to
        # undo: what tests wait for before they assert that nothing changed.
        notes = [
            *([result.reason] if result.reason else []),
            *([] if result.applied_now else ["changed nothing"]),
            *(["redelivered"] if redelivered else []),
        ]
        log.info(
            "attempt %d %s%s", attempt, outcome.value, f" ({', '.join(notes)})" if notes else ""
        )
        return outcome.value


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


def participant(name: str) -> Callable[[Callable[[Session, Command, P], Result]], Task]:
    """Register ``fn`` as the Celery task ``name`` (routed to its service's queue)."""

    def register(fn: Callable[[Session, Command, P], Result]) -> Task:
        def task_body(self: Task, envelope: Any) -> str:
            return run(self, envelope, fn)

        task_body.__name__ = fn.__name__
        task_body.__doc__ = fn.__doc__
        task: Task = app.task(name=name, bind=True)(task_body)
        return task

    return register
