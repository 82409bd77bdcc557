"""The transactional outbox: commands are rows committed with the state change that caused them.

``enqueue`` adds a row inside the caller's transaction. With the fast path on (the default), the
writer publishes its own rows right after commit (orchestrator/messaging/fastpath.py) and the relay only
sends rows left unsent for longer than ``SAGA_OUTBOX_GRACE_S``; with it off, ``enqueue`` adds a
NOTIFY that fires on commit and wakes the relay at once. The relay claims unsent rows under
``FOR UPDATE SKIP LOCKED`` (so two relays never publish one row at the same time), publishes them
as Celery task messages with pipelined publisher confirms, and marks them sent in the same
transaction. A relay killed after publishing and before its commit leaves the
rows unsent: they are published again, and the participants' idempotency makes that harmless.

Traces (when on): a row's headers keep the ``traceparent`` of the span that dispatched it, so
whoever publishes it, now or minutes later, does so in a span of the saga's trace
(``ConfirmingPublisher.publish``, orchestrator/ops/tracing.py).
"""

from __future__ import annotations

import contextlib
import logging
import random
import select
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import amqp
import psycopg
import sqlalchemy as sa
from kombu.serialization import dumps
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from models.outbox import OutboxMessage
from orchestrator.messaging import fastpath
from orchestrator.messaging.celery_app import app as celery_app
from orchestrator.messaging.envelopes import trace_headers
from orchestrator.messaging.topology import TASK_EXCHANGE, declare_all, queue_for_task
from orchestrator.ops import failpoints, process_metrics, tracing
from orchestrator.ops.config import settings

log = logging.getLogger(__name__)

CHANNEL = "outbox"
BATCH = 500
_TABLE = cast(sa.Table, OutboxMessage.__table__)


@dataclass(frozen=True)
class _Row:
    """The columns a message is built from (a row of the outbox, before or after it is written)."""

    message_id: uuid.UUID
    task: str
    queue: str
    headers: dict[str, Any]
    envelope: dict[str, Any]


def row(
    task: str,
    envelope: dict[str, Any],
    message_id: uuid.UUID | None = None,
    trace: dict[str, str] | None = None,
) -> _Row:
    """A command as a row (what ``to_wire`` reads), to ``task``'s queue; ``columns`` adds the
    saga id for an INSERT. ``trace``: the W3C headers of the span it was decided in."""
    headers = trace_headers(envelope)
    if trace:
        headers.update(trace)
    return _Row(
        message_id=message_id or uuid.uuid4(),
        task=task,
        queue=queue_for_task(task),
        headers=headers,
        envelope=envelope,
    )


def columns(new: _Row, *, held: bool = False) -> dict[str, Any]:
    """What an INSERT of ``new`` writes; a ``held`` row waits for its paused service
    (orchestrator/kernel/holds.py): no fast path, relay or sweeper sends it."""
    return {
        **vars(new),
        "saga_id": uuid.UUID(str(new.envelope["saga_id"])),
        "held_at": datetime.now(UTC) if held else None,
    }


def enqueue(
    session: Session,
    task: str,
    envelope: dict[str, Any],
    trace: dict[str, str] | None = None,
    *,
    held: bool = False,
) -> None:
    """Add a command to the outbox in the caller's transaction (see ``defer_inserts``); a
    ``held`` one stays unsent until its service's release dispatches it anew."""
    add(session, row(task, envelope, trace=trace), held=held)


def add(session: Session, new: _Row, *, held: bool = False) -> None:
    """Add a row made by ``row`` to the outbox in the caller's transaction."""
    deferred: list[dict[str, Any]] | None = session.info.get(DEFERRED_KEY)
    if deferred is not None:
        deferred.append(columns(new, held=held))
    else:
        session.execute(sa.insert(_TABLE).values(**columns(new, held=held)))
    if held:
        return
    if fastpath.enabled():
        session.info.setdefault(fastpath.PENDING_KEY, []).append(new)
    else:
        session.execute(sa.select(sa.func.pg_notify(CHANNEL, "")))


DEFERRED_KEY = "outbox.deferred"


def defer_inserts(session: Session) -> None:
    """This transaction's rows are written at its commit, in one multi-row INSERT (a batch of
    replies writes many), instead of one INSERT each (the hook: ``hook_sessions``)."""
    session.info.setdefault(DEFERRED_KEY, [])


def hook_sessions() -> None:
    """Write deferred rows just before commit, forget them on rollback (bootstrap calls this)."""
    for name, fn in (("before_commit", _write_deferred), ("after_rollback", _forget_deferred)):
        if not sa.event.contains(Session, name, fn):
            sa.event.listen(Session, name, fn)


def _write_deferred(session: Session) -> None:
    rows = session.info.pop(DEFERRED_KEY, None)
    if rows:
        session.execute(sa.insert(_TABLE), rows)


def _forget_deferred(session: Session) -> None:
    session.info.pop(DEFERRED_KEY, None)


# Rows waiting to be published: held ones wait for their service instead (not a backlog, no lag).
UNSENT = (OutboxMessage.sent_at.is_(None), OutboxMessage.held_at.is_(None))


def backlog(session: Session | Connection, limit: int) -> int:
    """Unsent rows, counted up to ``limit + 1`` so the check stays cheap when the backlog is huge."""
    unsent = sa.select(sa.literal(1)).where(*UNSENT).limit(limit + 1).subquery()
    return int(session.scalar(sa.select(sa.func.count()).select_from(unsent)) or 0)


def oldest_unsent_age_s(session: Session) -> float:
    age = session.scalar(
        sa.select(
            sa.func.extract("epoch", sa.func.now() - sa.func.min(OutboxMessage.created_at))
        ).where(*UNSENT)
    )
    return float(age or 0.0)


def _mask_args(envelope: dict[str, Any]) -> str:
    """What Celery shows as the task's arguments (events, Flower): never the card token."""
    return f"[<{envelope.get('type')} saga={envelope.get('saga_id')}>]"


@dataclass
class _Wire:
    body: bytes
    properties: dict[str, Any]
    routing_key: str
    task: str = ""
    envelope: dict[str, Any] | None = None  # read only for a span's attributes (tracing on)


def to_wire(row: Any) -> _Wire:
    """A Celery task message (protocol 2) that a worker of ``row.task`` consumes as usual."""
    task_id = str(row.message_id)
    msg = celery_app.amqp.as_task_v2(
        task_id,
        row.task,
        args=[row.envelope],
        kwargs={},
        argsrepr=_mask_args(row.envelope),
        kwargsrepr="{}",
        ignore_result=True,
    )
    content_type, encoding, body = dumps(msg.body, serializer="json")
    headers = {**msg.headers, **row.headers}
    properties = {
        "content_type": content_type,
        "content_encoding": encoding,
        "application_headers": headers,
        "delivery_mode": 2,
        "correlation_id": task_id,
        "priority": 0,
    }
    return _Wire(
        body=body if isinstance(body, bytes) else body.encode(),
        properties=properties,
        routing_key=row.queue,
        task=row.task,
        envelope=row.envelope,
    )


def rotated(url: str, start: int) -> str:
    """A ``;``-separated list of broker nodes (kombu's failover syntax), starting at ``start``."""
    nodes = url.split(";")
    first = start % len(nodes)
    return ";".join(nodes[first:] + nodes[:first])


class ConfirmingPublisher:
    """Publishes a batch on one channel in confirm mode and waits for every confirm at the end.

    With several broker nodes in the URL, each publisher starts at a random one (connections
    spread over the cluster) and, after a failure, reconnects starting at the next one: kombu
    skips a dead node on connect, and a node that is merely paused is left behind at once.

    ``source`` (relay, fast_path, sweeper) labels its publish metrics."""

    def __init__(self, url: str, connect_timeout_s: float = 5.0, source: str = "relay") -> None:
        self._url = url
        self._start = random.randrange(len(url.split(";")))
        self.source = source
        process_metrics.at_zero(sources=[source])
        self._connect_timeout_s = connect_timeout_s
        self._conn: amqp.Connection | None = None
        self._channel: Any = None
        self._next_tag = 1
        self._acked = 0
        self._nacked: set[int] = set()

    def _connect(self) -> None:
        from kombu import Connection

        kconn = Connection(
            rotated(self._url, self._start),
            connect_timeout=self._connect_timeout_s,
            transport_options={"confirm_publish": False},
        )
        kconn.connect()
        declare_all(kconn.default_channel)
        self._conn = kconn.connection
        self._kombu = kconn
        channel = self._conn.channel()
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        self._channel = channel
        self._next_tag = 1
        self._acked = 0

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._acked = max(self._acked, tag)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._nacked.add(tag)
        self._acked = max(self._acked, tag)

    def publish(self, wires: list[_Wire], timeout_s: float = 10.0) -> None:
        """Publish all, then block until the broker confirmed all; raise if any was refused."""
        with process_metrics.publishing(self.source, len(wires)):
            if not tracing.enabled():
                self._publish(wires, timeout_s)
                return
            # A span per message, child of the dispatch its row's headers name; the message
            # then names its publish span, which its consumer's span becomes a child of.
            messages = [
                (w.properties.setdefault("application_headers", {}), f"publish {w.task}", a)
                for w, a in zip(wires, map(self._span_of, wires), strict=True)
            ]
            with tracing.publishing(messages):
                self._publish(wires, timeout_s)

    def _span_of(self, wire: _Wire) -> dict[str, Any]:
        headers = wire.properties.get("application_headers")
        return {
            **tracing.envelope_attributes(wire.envelope or {}, headers),
            tracing.PUBLISHER: self.source,
            "messaging.system": "rabbitmq",
            "messaging.destination.name": wire.routing_key,
        }

    def _publish(self, wires: list[_Wire], timeout_s: float) -> None:
        if self._channel is None:
            self._connect()
        assert self._conn is not None
        self._nacked.clear()
        for wire in wires:
            message = amqp.Message(wire.body, **wire.properties)
            self._channel.basic_publish(
                message, exchange=TASK_EXCHANGE.name, routing_key=wire.routing_key, mandatory=False
            )
            self._next_tag += 1
        last = self._next_tag - 1
        deadline = time.monotonic() + timeout_s
        while self._acked < last:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("broker did not confirm the batch in time")
            self._conn.drain_events(timeout=remaining)
        if self._nacked:
            raise RuntimeError(f"broker refused {len(self._nacked)} message(s)")

    def close(self) -> None:
        """Drop the connection; the next publish connects again, starting at the next node."""
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing a dead connection: nothing to save
                self._kombu.release()
            self._start += 1
        self._conn = None
        self._channel = None


def relay_once(session: Session, publisher: ConfirmingPublisher, min_age_s: float = 0.0) -> int:
    """Claim up to BATCH unsent rows, publish them, mark them sent. Returns how many."""
    # Core, not the ORM: the relay's hot path needs rows, not tracked objects.
    c = _TABLE.c
    query = (
        sa.select(c.id, c.message_id, c.task, c.queue, c.headers, c.envelope, c.created_at)
        .where(c.sent_at.is_(None), c.held_at.is_(None))
        .order_by(c.id)
        .limit(BATCH)
        .with_for_update(skip_locked=True)
    )
    if min_age_s:
        query = query.where(
            c.created_at < sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, float(min_age_s))
        )
    rows = session.execute(query).all()
    if not rows:
        return 0
    publisher.publish([to_wire(row) for row in rows])
    _observe_delay(publisher.source, [row.created_at for row in rows])
    failpoints.hit("relay.after_publish")
    session.execute(
        sa.update(_TABLE).where(c.id.in_([row.id for row in rows])).values(sent_at=sa.func.now())
    )
    return len(rows)


def _observe_delay(source: str, committed: list[Any]) -> None:
    """How long after their commit the relay (or sweeper) got these rows out."""
    now = datetime.now(UTC)
    for created_at in committed:
        process_metrics.RELAY_DELAY.labels(source).observe(
            max(0.0, (now - created_at).total_seconds())
        )


def _listen_connection() -> psycopg.Connection[Any]:
    url = sa.make_url(settings().database_url).set(drivername="postgresql")
    conn = psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)
    conn.execute(f"LISTEN {CHANNEL}")
    return conn


def run_relay(stop: Any = None, poll_s: float = 1.0) -> None:
    """The relay's loop: drain the outbox, then sleep until a NOTIFY (or poll_s) wakes it.

    A NOTIFY comes from a writer without the fast path: its rows are sent at once. A poll sends
    only rows older than the grace period, which the fast path of their writer did not mark sent.
    """
    from models.db import transaction

    publisher = ConfirmingPublisher(settings().broker_url)
    listener: psycopg.Connection[Any] | None = None
    grace_s = settings().outbox_grace_s
    min_age_s = grace_s  # the first round after a (re)start, like any poll
    log.info("relay started")
    while not (stop and stop.is_set()):
        try:
            if listener is None:
                listener = _listen_connection()
            while True:
                with transaction() as session:
                    sent = relay_once(session, publisher, min_age_s=min_age_s)
                if sent:
                    log.debug("relayed %d outbox rows", sent)
                if sent < BATCH:
                    break
            ready, _, _ = select.select([listener.fileno()], [], [], poll_s)
            min_age_s = grace_s
            if ready:
                for _ in listener.notifies(timeout=0):
                    min_age_s = 0.0
        except Exception:
            log.exception("relay cycle failed; reconnecting")
            publisher.close()
            if listener is not None:
                with contextlib.suppress(Exception):
                    listener.close()
            listener = None
            time.sleep(0.5)
    publisher.close()
