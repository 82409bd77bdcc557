"""Applying a participant's commands: a batch in one transaction, or one command on its own.

Either way each command's handler records its outcome under the saga's key in the same
transaction as its effect (exactly once: a redelivery replays the recorded outcome), and each
command gets its own verdict: the reply to send, or a retry after a backoff, or a dead letter.
What to do with the verdicts (publish, ack, reject) is the caller's: the Celery task of one
message (participant.py) or the batch consumer of a queue (batching.py).

- ``apply_batch``: commands that carry no injected fault, one transaction, handlers in delivery
  order; the products they may move are locked first, in SKU order (stock.lock_for). Anything
  that fails the transaction fails the batch as a whole: the caller then applies each alone.
- ``apply_alone``: one command in a transaction of its own, with its injected fault (which keeps
  the contract's meaning: ``crash`` kills the process right after this command's commit, ``hang``
  sleeps before it); a business refusal is a failure reply, a transient error a retry of this
  command alone with the step's backoff, full jitter and budget, and past the budget (or on an
  error that is not transient) a dead letter. A transient error while the command's service is
  paused (by an operator or its breaker) is no retry: the reply says ``held`` and the
  orchestrator puts the command back with the held ones (orchestrator/kernel/holds.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from models.db import is_retryable, run_in_transaction
from orchestrator.kernel import holds
from orchestrator.kernel.machine import RetryPolicy
from orchestrator.messaging.celery_app import app
from orchestrator.messaging.envelopes import (
    Command,
    ReplyOutcome,
    ReplyPayload,
    make_reply,
    trace_headers,
)
from orchestrator.messaging.topology import queue_for_task
from orchestrator.ops import failpoints, tracing
from orchestrator.ops.logs import log_context
from workers import faults

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    succeeded: bool
    reason: str | None = None
    applied_now: bool = False  # this attempt made the change (not found it recorded)


Handler = Callable[[Session, Command, Any], Result]
# Called once at the start of a transaction with its commands of one kind (e.g. lock stock).
Prepare = Callable[[Session, list[Command]], None]


@dataclass(frozen=True)
class Participant:
    """A command's handler, and what its transaction must do before any handler runs."""

    command: str
    handler: Handler
    prepare: Prepare | None = None


PARTICIPANTS: dict[str, Participant] = {}


@dataclass(frozen=True)
class Incoming:
    """A command as delivered: ``retries`` is Celery's count of earlier tries of this dispatch;
    ``task_id`` is given where Celery does not log the task's end itself (a batch consumer);
    ``span``: its run span there (tracing on), current wherever ``context()`` is."""

    command: Command
    retries: int = 0
    redelivered: bool = False
    task_id: str | None = None
    span: Any = None

    @property
    def what(self) -> str:
        """``task[id]``, as Celery names a task in its log lines."""
        return f"{self.command.type}[{self.task_id}]"

    @property
    def tries(self) -> int:
        """Tries of this dispatch, this one included, against its budget."""
        return self.retries + 1

    @property
    def attempt(self) -> int:
        """The step's attempt number, for people (and the faults)."""
        return self.command.attempt + self.retries

    def context(self) -> Any:
        """Its ids on every log line, and its run span current (tracing on, in a batch)."""
        payload = self.command.typed_payload()
        ids = log_context(
            saga_id=self.command.saga_id,
            order_id=payload.business_key,
            step=self.command.type,
            request_id=self.command.request_id,
        )
        return ids if self.span is None else _both(tracing.current(self.span), ids)


@contextmanager
def _both(first: Any, second: Any) -> Iterator[None]:
    with first, second:
        yield


@dataclass(frozen=True)
class Verdict:
    """What becomes of one command: ``reply`` to send (none for a dead letter); ``retry_in_s``:
    send the command again after that long; ``error``: dead-letter it (reject, no requeue)."""

    incoming: Incoming
    reply: ReplyPayload | None
    retry_in_s: float | None = None
    error: BaseException | None = None


def reply_headers(command: Command, envelope: dict[str, Any]) -> dict[str, str]:
    """A reply's headers: its ids, and what its command was about (the order id)."""
    return trace_headers(
        {**envelope, "payload": {"order_id": command.typed_payload().business_key}}
    )


def send_reply(command: Command, attempt: int, payload: ReplyPayload) -> None:
    """Publish one reply now (its own publisher confirm): the path of one message a task. With
    tracing on, in a span of its own, child of the current one (the command's run)."""
    envelope = make_reply(command, attempt, payload)
    headers = reply_headers(command, envelope)
    if not tracing.enabled():
        app.send_task("saga.reply", args=[envelope], headers=headers)
        return
    attributes = tracing.envelope_attributes(envelope, headers)
    with tracing.producing(headers, f"reply {envelope['type']}", attributes):
        app.send_task("saga.reply", args=[envelope], headers=headers)


def has_fault(incoming: Incoming) -> bool:
    return faults.enabled(incoming.command.typed_payload().fault)


def is_transient(exc: BaseException) -> bool:
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


def _apply(session: Session, batch: list[Incoming]) -> list[Result]:
    """Every handler of ``batch`` in this session's transaction, after their preparations."""
    kinds: dict[Prepare, list[Command]] = {}
    for incoming in batch:
        prepare = PARTICIPANTS[incoming.command.type].prepare
        if prepare is not None:
            kinds.setdefault(prepare, []).append(incoming.command)
    for prepare, commands in kinds.items():
        prepare(session, commands)
    results = []
    for i, incoming in enumerate(batch):
        if len(batch) > 1 and i == len(batch) // 2:
            # Half the batch applied, nothing committed: a death here redelivers all of it.
            failpoints.hit(f"{queue_for_task(incoming.command.type)}.mid_batch", batch=len(batch))
        command = incoming.command
        with incoming.context():
            handler = PARTICIPANTS[command.type].handler
            results.append(handler(session, command, command.typed_payload()))
    return results


def apply_batch(batch: list[Incoming]) -> list[Verdict]:
    """Commands without faults, in one transaction; raises if the transaction fails."""
    results = run_in_transaction(lambda session: _apply(session, batch))
    return [replied(incoming, result) for incoming, result in zip(batch, results, strict=True)]


def apply_alone(incoming: Incoming) -> Verdict:
    command = incoming.command
    payload = command.typed_payload()
    attempt = incoming.attempt
    with incoming.context():
        try:
            faults.before_work(payload.fault, command, attempt, incoming.redelivered)
            result = run_in_transaction(lambda session: _apply(session, [incoming])[0])
            faults.after_work(payload.fault, command, attempt, result.applied_now)
        except faults.InjectedRefusal as exc:
            result = Result(False, reason=str(exc))
        except Exception as exc:
            return failed(incoming, exc)
        return replied(incoming, result)


def failed(incoming: Incoming, exc: BaseException) -> Verdict:
    """The verdict on a command whose attempt raised: a retry within the budget, if transient."""
    retry = incoming.command.typed_payload().retry
    attempt = incoming.attempt
    with incoming.context():
        if not is_transient(exc):
            log.error("attempt %d failed (dead-lettering): %r", attempt, exc)
            return Verdict(incoming, None, error=exc)
        error = f"{type(exc).__name__}: {exc}"[:500]
        if _held_now(incoming.command):
            log.warning("attempt %d failed while its service is paused: held (%s)", attempt, exc)
            return Verdict(incoming, ReplyPayload(outcome=ReplyOutcome.RETRYING, error=error,
                                                  held=True))
        if incoming.tries >= retry.attempts:
            log.error("attempt %d failed, no attempts left (dead-lettering): %s", attempt, exc)
            return Verdict(incoming, None, error=exc)
        delay = RetryPolicy(retry.attempts, retry.base_s, retry.max_s).delay(incoming.tries)
        log.warning("attempt %d failed, retrying in %.2fs: %s", attempt, delay, exc)
        reply = ReplyPayload(
            outcome=ReplyOutcome.RETRYING, error=error, retry_in_s=round(delay, 3)
        )
        return Verdict(incoming, reply, retry_in_s=delay)


def _held_now(command: Command) -> bool:
    """Would the orchestrator hold this command now? (holds.py decides, from the database.)"""
    kind = holds.kind_of(command.type, command.step)
    try:
        return run_in_transaction(lambda s: holds.held(s, command.type, kind) is not None)
    except DBAPIError:
        return False  # the database is what failed: retry as usual


def replied(incoming: Incoming, result: Result) -> Verdict:
    outcome = ReplyOutcome.SUCCEEDED if result.succeeded else ReplyOutcome.FAILED
    # "changed nothing" marks a duplicate, a redelivery or a compensation with nothing to undo:
    # what tests wait for before they assert that nothing changed.
    notes = [
        *([result.reason] if result.reason else []),
        *([] if result.applied_now else ["changed nothing"]),
        *(["redelivered"] if incoming.redelivered else []),
    ]
    # Where Celery logs no "Task name[id] succeeded" line of its own, this line is that line.
    ended = f"Task {incoming.what} {outcome.value}: " if incoming.task_id else ""
    with incoming.context():
        log.info(
            "%sattempt %d %s%s",
            ended,
            incoming.attempt,
            outcome.value,
            f" ({', '.join(notes)})" if notes else "",
        )
    return Verdict(incoming, ReplyPayload(outcome=outcome, reason=result.reason))
