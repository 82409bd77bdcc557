"""Dead-letter intake, replay and discard.

The orchestrator drains every ``<queue>.dead`` queue into the ``dead_letters`` table (so nothing
waits unseen in RabbitMQ) and tells the engine that the step named by the message gave up. A
message is acked only after its row committed; a redelivered copy is recognised by its fingerprint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from celery import bootsteps
from kombu import Connection, Consumer, Producer
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from models.db import run_in_transaction, transaction
from models.deadletters import DeadLetter
from models.enums import DeadLetterState, Reason
from orchestrator.kernel import engine
from orchestrator.messaging.celery_app import PUBLISH_RETRY_POLICY
from orchestrator.messaging.topology import TASK_EXCHANGE, dead_letter_queues, declare_all
from orchestrator.ops import process_metrics, tracing
from orchestrator.ops.config import settings
from orchestrator.ops.masking import mask_text
from orchestrator.registry import TimelineEvent

log = logging.getLogger(__name__)

# Headers RabbitMQ adds when it dead-letters; a replay starts the message's life afresh.
_DEATH_HEADERS = (
    "x-death",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-first-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-last-death-exchange",
    "x-delivery-count",
)


@dataclass(frozen=True)
class Identified:
    saga_id: uuid.UUID | None
    command: str | None
    request_id: uuid.UUID | None
    problem: str | None  # why the body could not be read, if it could not
    attempt: int | None = None  # the attempt that gave up: envelope attempt + Celery retries


def identify(body: bytes, headers: dict[str, Any]) -> Identified:
    """Find the saga, command and request a dead message names: from its body, else its headers."""
    try:
        decoded = json.loads(body)
        envelope = decoded[0][0] if isinstance(decoded, list) else decoded
        return Identified(
            uuid.UUID(str(envelope["saga_id"])),
            str(envelope["type"]),
            uuid.UUID(str(envelope["request_id"])),
            None,
            int(envelope["attempt"]) + int(headers.get("retries") or 0),
        )
    except Exception as exc:  # poison: anything at all may be in there
        saga = _uuid_or_none(headers.get("saga_id"))
        return Identified(
            saga,
            headers.get("task"),
            _uuid_or_none(headers.get("request_id")),
            f"undecodable body ({type(exc).__name__})",
        )


def _uuid_or_none(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except (ValueError, TypeError):
        return None


def _death_reason(headers: dict[str, Any], queue: str) -> str:
    deaths = headers.get("x-death") or []
    first = deaths[0] if deaths else {}
    why = str(first.get("reason", "unknown"))
    meaning = {
        "rejected": "rejected by its consumer (retries exhausted, or a poison message)",
        "delivery_limit": "redelivered past the delivery limit (its worker kept dying)",
        "expired": "expired before delivery",
        "maxlen": "dropped by the queue's length limit",
    }.get(why, why)
    return f"{why}: {meaning}; from queue {first.get('queue', queue)}"


def _fingerprint(queue: str, body: bytes, headers: dict[str, Any]) -> str:
    deaths = headers.get("x-death") or [{}]
    marker = f"{queue}|{deaths[0].get('count')}|{deaths[0].get('time')}|"
    return hashlib.sha256(marker.encode() + body).hexdigest()


def _is_sweep_tick(body: bytes, headers: dict[str, Any]) -> bool:
    """Beat's periodic ``saga.sweep`` (a Celery message with no arguments), not a saga's work."""
    if headers.get("task") != "saga.sweep":
        return False
    try:
        decoded = json.loads(body)
    except ValueError:
        return False
    return isinstance(decoded, list) and decoded[:1] == [[]]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def take_in(
    queue: str,
    body: bytes,
    headers: dict[str, Any],
    properties: dict[str, Any],
    exchange: str,
    routing_key: str,
) -> int | None:
    """Record one dead message and tell the engine; returns the row id (None: seen before)."""
    if _is_sweep_tick(body, headers):
        # Expired behind a busy or restarting orchestrator, or failed on a lost database
        # connection: the next tick does the same work, so there is nothing to keep.
        log.info("dropped a dead saga.sweep tick from %s", queue)
        return None
    who = identify(body, headers)
    reason = _death_reason(headers, queue)
    if who.problem:
        reason = f"{reason}; {who.problem}"
    source_queue = queue.removesuffix(".dead")

    def work(session: Session) -> int | None:
        row_id = session.scalar(
            insert(DeadLetter)
            .values(
                saga_id=who.saga_id,
                step=who.command,
                request_id=who.request_id,
                queue=source_queue,
                reason=reason,
                state=DeadLetterState.DEAD,
                exchange=exchange or TASK_EXCHANGE.name,
                routing_key=source_queue,
                headers=_jsonable(headers),
                properties=_jsonable(properties),
                body=body,
                fingerprint=_fingerprint(queue, body, headers),
            )
            .on_conflict_do_nothing(index_elements=["fingerprint"])
            .returning(DeadLetter.id)
        )
        if row_id is None or who.saga_id is None or who.command is None:
            return row_id
        saga = engine.lock_saga(session, who.saga_id)
        if saga is None or who.command.endswith(".reply"):
            return row_id
        # LookupError: a command this saga's definition does not know (forged or foreign).
        with contextlib.suppress(LookupError):
            engine.on_exhausted(
                session,
                saga,
                who.command,
                who.request_id,
                reason,
                cause=TimelineEvent.STEP_DEAD_LETTERED,
                reason=Reason.RETRIES_EXHAUSTED,
                attempt=who.attempt,
            )
        return row_id

    row_id = run_in_transaction(work)
    if row_id is not None:
        process_metrics.DEAD_LETTERS_RECORDED.labels(source_queue).inc()
    log.warning(
        "dead letter from %s: %s",
        source_queue,
        reason,
        extra={"saga_id": str(who.saga_id) if who.saga_id else None},
    )
    return row_id


class DeadLetterIntake(bootsteps.ConsumerStep):
    """A consumer in the orchestrator worker that drains every dead-letter queue."""

    def get_consumers(self, channel: Any) -> list[Consumer]:
        process_metrics.at_zero(queues=dead_letter_queues())
        return [
            Consumer(
                channel,
                queues=list(dead_letter_queues().values()),
                on_message=self.on_message,
                prefetch_count=10,
            )
        ]

    def on_message(self, message: Any) -> None:
        info = message.delivery_info
        queue = info.get("routing_key", "unknown")
        properties = {k: v for k, v in message.properties.items() if k != "application_headers"}
        body = message.body if isinstance(message.body, bytes) else message.body.encode()
        try:
            take_in(
                queue,
                body,
                dict(message.headers or {}),
                properties,
                info.get("exchange", ""),
                queue,
            )
        except Exception:
            log.exception("dead letter intake failed; the message stays queued")
            time.sleep(1)  # the database is likely down: do not spin on the same message
            message.requeue()
            return
        message.ack()


# ---------------------------------------------------------------- operator side


class DeadLetterNotFound(LookupError):
    pass


class DeadLetterResolved(Exception):
    """Replay or discard of a letter that is no longer dead (a 409)."""


def _load_dead(session: Session, letter_id: int) -> DeadLetter:
    letter = session.get(DeadLetter, letter_id, with_for_update=True)
    if letter is None:
        raise DeadLetterNotFound(str(letter_id))
    if letter.state is not DeadLetterState.DEAD:
        raise DeadLetterResolved(f"dead letter {letter_id} is already {letter.state.value}")
    return letter


def replay(letter_id: int, actor: str) -> None:
    """Publish the original message to its queue again, then mark the letter replayed.

    Publish first: a crash in between leaves it dead and replayable, and a second replay of an
    idempotent command changes nothing.
    """
    with transaction() as session:
        letter = _load_dead(session, letter_id)
        headers = {k: v for k, v in letter.headers.items() if k not in _DEATH_HEADERS}
        props = {
            k: v
            for k, v in letter.properties.items()
            if k
            in ("content_type", "content_encoding", "correlation_id", "priority", "delivery_mode")
        }
        body, routing_key = letter.body, letter.routing_key
    with Connection(settings().broker_url, transport_options={"confirm_publish": True}) as conn:
        # Declared first: an undeclared exchange fails the publish, a missing queue drops it.
        declare_all(conn.default_channel)
        producer = Producer(conn.default_channel)
        # In the saga's trace: the letter kept the traceparent its message was published with.
        replayed = {tracing.SAGA_ID: headers.get("saga_id"), tracing.PUBLISHER: "replay"}
        with tracing.publishing([(headers, f"replay {routing_key}", replayed)]):
            producer.publish(
                body,
                exchange=TASK_EXCHANGE,
                routing_key=routing_key,
                headers=headers,
                content_type=props.get("content_type", "application/json"),
                content_encoding=props.get("content_encoding", "utf-8"),
                correlation_id=props.get("correlation_id"),
                delivery_mode=2,
                retry=True,
                retry_policy=PUBLISH_RETRY_POLICY,
            )
    _resolve(letter_id, DeadLetterState.REPLAYED, actor)


def discard(letter_id: int, actor: str) -> None:
    _resolve(letter_id, DeadLetterState.DISCARDED, actor)


def _resolve(letter_id: int, state: DeadLetterState, actor: str) -> None:
    with transaction() as session:
        letter = _load_dead(session, letter_id)
        letter.state = state
        letter.resolved_at = engine.utcnow()
        letter.resolved_by = actor
        if letter.saga_id is not None:
            saga = engine.lock_saga(session, letter.saga_id)
            if saga is not None:
                engine.record(
                    session,
                    saga,
                    TimelineEvent(f"dead_letter.{state.value}"),
                    step=letter.step,
                    actor=actor,
                    detail=f"dead letter {letter_id}",
                )


def body_preview(letter: DeadLetter, limit: int = 4000) -> str:
    """The body as text for people: decoded leniently, card tokens masked, cut at ``limit``."""
    text = letter.body.decode("utf-8", errors="replace")
    return mask_text(text)[:limit]


def as_dict(letter: DeadLetter, *, with_body: bool = False) -> dict[str, Any]:
    """The contract's view of a dead letter (the body, masked, only when asked)."""
    view: dict[str, Any] = {
        "id": letter.id,
        "saga_id": str(letter.saga_id) if letter.saga_id else None,
        "step": letter.step,
        "queue": letter.queue,
        "reason": letter.reason,
        "at": letter.at.isoformat(),
        "state": letter.state.value,
    }
    if with_body:
        view["body"] = body_preview(letter)
    return view


def list_letters(session: Session, limit: int = 200) -> list[DeadLetter]:
    return list(session.scalars(sa.select(DeadLetter).order_by(DeadLetter.id.desc()).limit(limit)))
