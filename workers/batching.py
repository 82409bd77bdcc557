"""A participant service's queue consumed in batches (orchestrator/messaging/batches.py): every
command that waits, applied in one transaction, its replies published with pipelined confirms,
then the messages acked.

For one batch, in this order:
1. each message read as a command; one that cannot be (a poison message) is dead-lettered alone;
2. the commands without an injected fault: ``apply_batch``, one transaction; if it fails as a
   whole (the database went away, a command that raises), each of them alone instead;
3. the commands with a fault, each alone (``apply_alone``) after the batch's commit and after
   the others' replies went out, so a ``crash`` there kills the process after the others'
   effects are in (their redelivery replays them) and a ``hang`` holds back neither their
   transaction nor their replies;
4. the consumer publishes every reply, then rejects the dead letters and acks the rest. A
   transient failure's retry is sent here, before that ack, as Celery's ``task.retry`` does it
   (the same message, ``retries`` one higher, delayed by the broker).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from orchestrator.messaging import batches
from orchestrator.messaging.celery_app import app
from orchestrator.messaging.envelopes import PoisonMessage, make_reply, parse_command
from orchestrator.ops import process_metrics, tracing
from orchestrator.ops.config import settings
from workers import faults, limits
from workers.applying import (
    Incoming,
    Verdict,
    apply_alone,
    apply_batch,
    failed,
    has_fault,
    reply_headers,
    send_reply,
)

log = logging.getLogger(__name__)

_wired: set[str] = set()


def wire(queue: str) -> None:
    """Let the worker that consumes ``queue`` consume it in batches (once per queue)."""
    if queue not in _wired:
        _wired.add(queue)
        batches.consume_in_batches(app, queue, handle, name=queue, source=queue)


def handle(deliveries: list[batches.Delivery]) -> batches.Outcome:
    outcome = batches.Outcome()
    plain: list[tuple[batches.Delivery, Incoming]] = []
    faulted: list[tuple[batches.Delivery, Incoming]] = []
    for delivery in deliveries:
        try:
            incoming = _read(delivery)
        except PoisonMessage as exc:
            log.error("poison message rejected: %s", exc)
            outcome.rejected.append((delivery, str(exc)))
            continue
        (faulted if has_fault(incoming) else plain).append((delivery, incoming))
    together = _apply_together(plain)
    # A fault (a hang, a crash) must not hold back the others' replies: with one in the batch,
    # theirs go out now, one confirm each (fault injection only), before it is applied.
    for delivery, verdict in together:
        _settle(outcome, delivery, verdict, now=bool(faulted))
    for delivery, incoming in faulted:
        if not _held(delivery, incoming):
            _settle(outcome, delivery, _after_hang(delivery, incoming))
    replies = [m.task for m in outcome.publish]
    # Counted as a reply sent through Celery is (after_task_publish): the same messages.
    outcome.after_publish = lambda: process_metrics.count_sent(replies)
    return outcome


# A copy of a command whose injected hang was served by the broker's delay, and how it ended.
HANG_HEADER = "saga_hang"


def _held(delivery: batches.Delivery, incoming: Incoming) -> bool:
    """An injected ``hang`` of a second or more is served by the broker, not by a sleep here
    (which would hold every message this consumer has prefetched, and so other sagas): the
    message is acked with no reply, and a copy comes back after the hang, or after the time
    limit that would have ended it, as Celery's limits end a sleeping task."""
    if delivery.headers.get(HANG_HEADER):
        return False
    command = incoming.command
    hang = faults.hang_of(command.typed_payload().fault, incoming.attempt, incoming.redelivered)
    if hang is None or hang < 1.0:
        return False
    cfg = settings()
    soft, hard = cfg.task_soft_time_limit_s, cfg.task_time_limit_s
    if soft and hang >= soft:
        delay, end = soft, "soft"
    elif hang >= hard:
        delay, end = hard, "hard"
    else:
        delay, end = hang, "served"
    with incoming.context():
        faults.fired(command.typed_payload().fault or "", command, incoming.attempt)
        _send_again(delivery, delay, retries=incoming.retries, extra={HANG_HEADER: end})
    return True


def _after_hang(delivery: batches.Delivery, incoming: Incoming) -> Verdict:
    """A command alone; the copy of a held one goes on as its attempt would have after the hang:
    past the soft limit a transient error, past the hard limit (the process killed) redelivered."""
    end = delivery.headers.get(HANG_HEADER)
    if end:
        incoming = dataclasses.replace(incoming, redelivered=True)  # the hang is over
    with incoming.context():
        if end == "soft":
            limit = settings().task_soft_time_limit_s
            log.warning("Soft time limit (%ss) exceeded for %s", limit, incoming.what)
            return failed(incoming, SoftTimeLimitExceeded(f"soft time limit ({limit}s) exceeded"))
        if end == "hard":
            limit = settings().task_time_limit_s
            log.error("Hard time limit (%ss) exceeded for %s", limit, incoming.what)
    return _alone(incoming)


def _read(delivery: batches.Delivery) -> Incoming:
    if len(delivery.args) != 1 or delivery.kwargs:
        raise PoisonMessage(f"{delivery.task} takes one envelope, got {len(delivery.args)} args")
    command = parse_command(delivery.args[0], expected_type=delivery.task)
    return Incoming(
        command,
        retries=int(delivery.headers.get("retries") or 0),
        redelivered=delivery.redelivered,
        task_id=delivery.task_id,
        span=delivery.span,
    )


def _apply_together(
    plain: list[tuple[batches.Delivery, Incoming]],
) -> list[tuple[batches.Delivery, Verdict]]:
    if not plain:
        return []
    batch = [incoming for _, incoming in plain]
    try:
        with limits.watch(f"a batch of {len(batch)} ({batch[0].what}, ...)"):
            verdicts = apply_batch(batch)
    except Exception as exc:  # anything: alone, each command meets its own error (or none)
        if len(batch) > 1:
            log.warning("a batch of %d failed (%r); each command again alone", len(batch), exc)
        verdicts = [_alone(incoming) for incoming in batch]
    else:
        if len(batch) > 1:
            log.info("a batch of %d commands applied in one transaction", len(batch))
    return [(delivery, verdict) for (delivery, _), verdict in zip(plain, verdicts, strict=True)]


def _alone(incoming: Incoming) -> Verdict:
    with limits.watch(incoming.what):
        return apply_alone(incoming)


def _settle(
    outcome: batches.Outcome, delivery: batches.Delivery, verdict: Verdict, now: bool = False
) -> None:
    """Add the verdict to the batch's outcome (``now``: send its reply at once instead). What
    it sends carries the command's trace: its run span is current meanwhile (tracing on)."""
    with tracing.current(delivery.span):
        _add(outcome, delivery, verdict, now)


def _add(
    outcome: batches.Outcome, delivery: batches.Delivery, verdict: Verdict, now: bool
) -> None:
    incoming = verdict.incoming
    if verdict.error is not None:
        outcome.rejected.append((delivery, f"{type(verdict.error).__name__}: {verdict.error}"))
        outcome.states[id(delivery)] = "FAILURE"  # as Celery counts a task that raised
        return
    assert verdict.reply is not None
    if now or verdict.retry_in_s is not None:  # a retry's reply goes out before the retry
        send_reply(incoming.command, incoming.attempt, verdict.reply)
    else:
        envelope = make_reply(incoming.command, incoming.attempt, verdict.reply)
        reply = batches.outgoing("saga.reply", envelope)
        headers = reply_headers(incoming.command, envelope)
        if delivery.span is not None:  # published after the commit: its parent, the run span
            headers.update(tracing.carrier(delivery.span))
        outcome.publish.append(dataclasses.replace(reply, headers=headers))
    if verdict.retry_in_s is not None:
        outcome.states[id(delivery)] = "RETRY"
        # What task.retry(countdown=...) sends: the same task message, one retry more.
        _send_again(delivery, verdict.retry_in_s, retries=incoming.retries + 1)


def _send_again(
    delivery: batches.Delivery, delay: float, retries: int, extra: dict[str, str] | None = None
) -> None:
    """The delivered task message again, delayed by the broker; a wait under a second (which its
    routing keys cannot express) is slept here. Sent before the original is acked."""
    countdown: float | None = delay
    if delay < 1.0:
        time.sleep(delay)
        countdown = None
    options: dict[str, Any] = {"countdown": countdown} if countdown else {}
    app.send_task(
        delivery.task,
        args=delivery.args,
        kwargs=delivery.kwargs,
        task_id=delivery.task_id or None,
        retries=retries,
        headers={
            **{k: v for k, v in delivery.headers.items() if k in _TRACE_HEADERS},
            **(extra or {}),
        },
        argsrepr=delivery.headers.get("argsrepr"),  # masked by its first publisher
        **options,
    )


_TRACE_HEADERS = ("saga_id", "request_id", "order_id")
