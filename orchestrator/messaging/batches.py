"""Consuming one queue in batches inside a Celery worker: take what waits, hand it over, publish,
then ack (group commit: one transaction, one round of publisher confirms per batch).

The API (stable; a change is written down in /work/wt/b1-API-CHANGES.md)::

    consume_in_batches(app, queue, handler, *, name, source="batch")
        Wiring, called once where the worker's Celery app is built (e.g. the orchestrator's
        tasks module). A worker whose -Q includes ``queue`` then leaves that queue to batch
        consumers instead of Celery's own consumer: one consumer thread, with its own broker
        connection, in each prefork pool process (a killed pool process is replaced by Celery, as
        a task's would be); with a solo/threads pool, ``--concurrency`` threads in the worker.
        ``name`` names the fail points (``<name>.before_publish``, ``<name>.after_publish``) and
        the log lines; ``source`` labels the publish metrics. ``SAGA_BATCH_MAX=0``: no batching
        (Celery consumes the queue as usual, one task per message).

    handler(deliveries: list[Delivery]) -> Outcome
        Called with every message that was waiting, in delivery order, at most
        ``SAGA_BATCH_MAX`` (a lone message at once: nothing ever waits for a batch to fill).
        It does the batch's work and commits it before returning.
        - raise an exception of ``TRANSIENT`` (sqlalchemy ``DBAPIError``): the whole batch is
          run again after a backoff (1, 2, 4, 8, 10, 10... s, jittered); past
          ``TRANSIENT_RETRIES`` reruns every message is rejected to the dead-letter exchange
          (what Celery's autoretry did for one task);
        - raise anything else: each message is run again alone, and one that still raises is
          rejected alone to the dead-letter exchange (a poison message never takes the others
          with it);
        - return an ``Outcome``.

    Delivery: one message as received (Celery protocol 2): ``task`` (its name), ``task_id``,
        ``args``, ``kwargs``, ``headers``, ``redelivered``; with tracing on, ``span``: its
        CONSUMER span ``run/<task>`` (a child of the ``traceparent`` it came with), started when
        the batch begins and ended when it is acked, rejected or requeued. A handler makes it
        current (``tracing.current``) around that message's work, so what it logs carries the
        trace id and what it sends joins the trace.
    Outcome(publish=[...], rejected=[(delivery, why), ...], after_publish=None)
        ``publish``: messages to send after the commit, each with the attributes
        ``outbox.to_wire`` reads (``message_id, task, queue, headers, envelope``; ``outgoing()``
        builds one); all published on one channel with pipelined publisher confirms.
        ``rejected``: dead-lettered one by one (``basic_reject(requeue=False)``).
        ``after_publish``: called once the broker confirmed ``publish`` (also when it is empty),
        before the acks (the orchestrator marks its outbox rows sent there).
        Every delivery not rejected is acked after that.
    outgoing(task, envelope, message_id=None) -> a message for ``Outcome.publish``.
    BatchConsumer(queue, handler, *, name, source="batch", max_size=None).run(stop_event)
        One consumer, blocking until ``stop_event`` is set (what the wiring runs in a thread);
        ``queue``: a queue of the topology by name, or a kombu ``Queue``.

Order of a batch: handler (commit) -> ``<name>.before_publish`` -> publish, confirms ->
``<name>.after_publish`` -> ``after_publish()`` -> rejects -> acks. A process killed anywhere in
there leaves its unacked messages to the broker, which delivers them again (handlers are
idempotent: a reply that is not awaited, an effect keyed by saga id). A publish that fails after
the commit requeues the batch's messages (their redelivery finds the work done and publishes
again, or, for outbox rows, the relay sends them).

SIGTERM: the batch in hand is finished (published and acked), then the consumer stops; messages
prefetched but not started go back to the queue when its connection closes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from celery import Celery, bootsteps
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready
from kombu import Connection, Consumer, Queue
from sqlalchemy.exc import DBAPIError

from orchestrator.messaging import outbox
from orchestrator.messaging.topology import service_queues
from orchestrator.ops import failpoints, process_metrics, tracing
from orchestrator.ops.config import settings
from orchestrator.ops.logs import log_context

log = logging.getLogger(__name__)

TRANSIENT: tuple[type[BaseException], ...] = (DBAPIError,)
TRANSIENT_RETRIES = 12  # with the backoff below: about a minute, as the reply task's autoretry
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 10.0
POLL_S = 1.0  # how often an idle consumer looks at its stop flag and the heartbeat
HEARTBEAT_S = 60
PUBLISH_TIMEOUT_S = 10.0


@dataclass(frozen=True, eq=False)
class Delivery:
    """One message of a batch, decoded from its Celery protocol 2 body."""

    task: str
    task_id: str
    args: list[Any]
    kwargs: dict[str, Any]
    headers: dict[str, Any]
    redelivered: bool
    message: Any = field(repr=False)  # the kombu message: acked or rejected by the consumer
    span: Any = field(default=None, repr=False)  # tracing on: its run span (tracing.received)


@dataclass
class Outcome:
    publish: list[Any] = field(default_factory=list)
    rejected: list[tuple[Delivery, str]] = field(default_factory=list)
    after_publish: Callable[[], None] | None = None
    # A delivery's end as Celery would name it for the task metrics (id(delivery) -> "RETRY",
    # "FAILURE", ...); unnamed: "SUCCESS" when acked, "REJECTED" when rejected.
    states: dict[int, str] = field(default_factory=dict)


Handler = Callable[[list[Delivery]], Outcome]


def outgoing(task: str, envelope: dict[str, Any], message_id: uuid.UUID | None = None) -> Any:
    """A message for ``Outcome.publish``: a Celery task message of ``task`` with ``envelope``."""
    return outbox.row(task, envelope, message_id)


class Poison(ValueError):
    """A message that cannot be read as a Celery task message."""


def decode(message: Any, traced: bool = False) -> Delivery:
    """The message as a Delivery; ``traced``: with its run span started."""
    headers = dict(message.headers or {})
    task = headers.get("task")
    try:
        body = json.loads(message.body)
        args, kwargs = body[0], body[1]
        if not isinstance(task, str) or not isinstance(args, list) or not isinstance(kwargs, dict):
            raise TypeError("not a Celery task message")
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise Poison(f"undecodable message ({type(exc).__name__}: {exc})") from exc
    return Delivery(
        task=task,
        task_id=str(headers.get("id") or message.properties.get("correlation_id") or ""),
        args=args,
        kwargs=kwargs,
        headers=headers,
        redelivered=bool(message.delivery_info.get("redelivered")),
        message=message,
        span=_run_span(task, args, headers) if traced else None,
    )


def _run_span(task: str, args: list[Any], headers: dict[str, Any]) -> Any:
    """What Celery's instrumentation would start for the task's run: ``run/<task>``, with the
    saga's ids; its attempt counts the tries of this dispatch (a retry's ``retries`` header)."""
    attributes = tracing.envelope_attributes(args[0] if args else {}, headers)
    if isinstance(attributes.get(tracing.ATTEMPT), int) and headers.get("retries"):
        attributes[tracing.ATTEMPT] += int(headers["retries"])
    return tracing.received(headers, f"run/{task}", attributes)


class BatchConsumer:
    """One consumer of one queue on its own broker connection; ``run`` until ``stop`` is set."""

    def __init__(
        self,
        queue: str | Queue,
        handler: Handler,
        *,
        name: str,
        source: str = "batch",
        max_size: int | None = None,
    ) -> None:
        # A queue of the topology by name, or any kombu Queue (declared as given).
        self._queue = queue if isinstance(queue, Queue) else None
        self.queue = queue.name if isinstance(queue, Queue) else queue
        self.handler = handler
        self.name = name
        self.max_size = max(1, max_size or settings().batch_max)
        self._start = random.randrange(len(settings().broker_url.split(";")))
        self._publisher = outbox.ConfirmingPublisher(
            settings().broker_url, connect_timeout_s=2.0, source=source
        )
        self._received: list[Any] = []
        self._conn: Connection | None = None
        self._unsettled: dict[int, Delivery] = {}  # this batch's deliveries not yet settled
        process_metrics.at_zero(sources=[source])

    # ------------------------------------------------------------ the loop

    def run(self, stop: threading.Event) -> None:
        log.info("batch consumer of %s started (up to %d a batch)", self.queue, self.max_size)
        while not stop.is_set():
            try:
                self._consume(stop)
            except Exception as exc:  # the broker went away (or a node of it): connect again
                log.warning(
                    "batch consumer of %s lost its broker (%s); reconnecting", self.queue, exc
                )
                self._drop()
                stop.wait(0.5)
        self._drop()
        self._publisher.close()
        log.info("batch consumer of %s stopped", self.queue)

    def _consume(self, stop: threading.Event) -> None:
        conn = Connection(
            outbox.rotated(settings().broker_url, self._start),
            heartbeat=HEARTBEAT_S,
            connect_timeout=2.0,
            transport_options={"confirm_publish": False},
        )
        self._conn = conn
        self._start += 1  # the next connection starts at the next node
        conn.ensure_connection(max_retries=3, interval_start=0, interval_step=0.2)
        channel = conn.channel()
        channel.basic_qos(0, self.max_size, False)
        queue = self._queue or service_queues()[self.queue]
        consumer = Consumer(channel, queues=[queue], on_message=self._received.append)
        self._received.clear()
        with consumer:
            while not stop.is_set():
                try:
                    conn.drain_events(timeout=POLL_S)
                except TimeoutError:  # socket.timeout: nothing came
                    conn.heartbeat_check()
                    continue
                self._take_ready(conn)
                batch, self._received[:] = list(self._received), []
                if batch:
                    self._run_batch(batch, stop)

    def _take_ready(self, conn: Connection) -> None:
        """Every message already here, up to the bound, without waiting for more."""
        while len(self._received) < self.max_size:
            try:
                conn.drain_events(timeout=0)
            except (TimeoutError, BlockingIOError):
                return

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing a dead connection: nothing to save
                self._conn.release()
        self._conn = None

    # ------------------------------------------------------------ one batch

    def _run_batch(self, messages: list[Any], stop: threading.Event) -> None:
        began = time.perf_counter()
        deliveries: list[Delivery] = []
        traced = tracing.enabled()
        for message in messages:
            try:
                deliveries.append(decode(message, traced))
            except Poison as exc:
                log.error("%s: rejected to the dead-letter queue: %s", self.queue, exc)
                message.reject(requeue=False)
                process_metrics.TASKS.labels("unknown", "rejected").inc()
        if not deliveries:
            return
        process_metrics.observe_batch(self.queue, len(deliveries))
        for d in deliveries:
            process_metrics.task_started(d.task_id)
            _events.send("received", d, name=d.task, retries=d.headers.get("retries") or 0)
        self._unsettled = {id(d): d for d in deliveries}
        try:
            self._process(deliveries, stop)
        finally:
            # Settling raised (the connection died mid-ack): the broker gives the rest back to the
            # queue, so they leave this worker's hands as retries, and the in-hand gauge stays true.
            for d in self._unsettled.values():
                process_metrics.task_finished(d.task_id, d.task, "RETRY")
                tracing.finish(d.span, error="not settled: given back to the queue")
            self._unsettled = {}
        log.debug(
            "%s: batch of %d in %.1f ms",
            self.queue,
            len(deliveries),
            (time.perf_counter() - began) * 1000,
        )

    def _process(self, batch: list[Delivery], stop: threading.Event) -> None:
        outcome = self._handle(batch, stop)
        if outcome is None:
            return
        size = len(batch)
        rejected = {id(d): why for d, why in outcome.rejected}
        if outcome.publish:
            failpoints.hit(f"{self.name}.before_publish", batch=size)
            try:
                self._publisher.publish(
                    [outbox.to_wire(m) for m in outcome.publish], timeout_s=PUBLISH_TIMEOUT_S
                )
            except Exception as exc:
                log.warning(
                    "%s: publishing a batch's %d messages failed (%s); its %d messages go back"
                    " to the queue",
                    self.queue,
                    len(outcome.publish),
                    exc,
                    size,
                )
                self._publisher.close()
                self._settle(batch, rejected, ack=False)
                stop.wait(0.5)
                return
            failpoints.hit(f"{self.name}.after_publish", batch=size)
        if outcome.after_publish is not None:
            outcome.after_publish()
        self._settle(batch, rejected, ack=True, states=outcome.states)

    def _handle(self, batch: list[Delivery], stop: threading.Event) -> Outcome | None:
        """The handler's outcome, after reruns; None when this batch was settled here."""
        for rerun in range(TRANSIENT_RETRIES + 1):
            try:
                return self.handler(batch)
            except TRANSIENT as exc:
                if rerun == TRANSIENT_RETRIES:
                    log.error("%s: batch of %d failed for good: %s", self.queue, len(batch), exc)
                    self._settle(batch, {id(d): str(exc) for d in batch}, ack=True)
                    return None
                delay = random.uniform(0.5, 1.0) * min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**rerun)
                log.warning(
                    "%s: batch of %d failed (%s); again in %.1f s",
                    self.queue,
                    len(batch),
                    exc,
                    delay,
                )
                if self._wait(delay, stop):
                    self._settle(batch, {}, ack=False)  # stopping: the next consumer reruns it
                    return None
            except Exception as exc:
                if len(batch) > 1:
                    log.warning(
                        "%s: batch of %d raised %r; each message again alone",
                        self.queue,
                        len(batch),
                        exc,
                    )
                    for one in batch:
                        self._process([one], stop)
                    return None
                with log_context(task_id=batch[0].task_id):
                    log.exception(
                        "%s: %s rejected to the dead-letter queue", self.queue, batch[0].task
                    )
                self._settle(batch, {id(batch[0]): repr(exc)}, ack=True)
                return None
        raise AssertionError("unreachable")

    def _wait(self, delay_s: float, stop: threading.Event) -> bool:
        """Sleep, keeping the broker connection alive; True if told to stop meanwhile."""
        deadline = time.monotonic() + delay_s
        while (left := deadline - time.monotonic()) > 0:
            if stop.wait(min(left, POLL_S)):
                return True
            if self._conn is not None:
                self._conn.heartbeat_check()
        return stop.is_set()

    def _settle(
        self,
        batch: list[Delivery],
        rejected: dict[int, str],
        *,
        ack: bool,
        states: dict[int, str] | None = None,
    ) -> None:
        """Reject (dead-letter) the named ones first, then ack, or requeue, the others."""
        states = states or {}
        for d in batch:
            if id(d) in rejected:
                d.message.reject(requeue=False)
                self._unsettled.pop(id(d), None)
                process_metrics.task_finished(d.task_id, d.task, states.get(id(d), "REJECTED"))
                _events.send("rejected", d, requeue=False)
                tracing.finish(d.span, error=rejected[id(d)])
        for d in batch:
            if id(d) in rejected:
                continue
            if ack:
                d.message.ack()
                self._unsettled.pop(id(d), None)
                state = states.get(id(d), "SUCCESS")
                process_metrics.task_finished(d.task_id, d.task, state)
                _events.send(_EVENT_OF.get(state, "succeeded"), d)
            else:
                d.message.requeue()
                self._unsettled.pop(id(d), None)
                process_metrics.task_finished(d.task_id, d.task, "RETRY")
                _events.send("retried", d)
            tracing.finish(d.span)


# ---------------------------------------------------------------- wiring into a Celery worker


@dataclass
class _Spec:
    queue: str
    handler: Handler
    name: str
    source: str
    active: bool = False  # this worker consumes the queue (set in the parent, before the fork)


_specs: list[_Spec] = []


class _Running:
    """The batch consumers of this process and their stop flag."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, spec: _Spec, count: int) -> None:
        for i in range(count):
            consumer = BatchConsumer(spec.queue, spec.handler, name=spec.name, source=spec.source)
            thread = threading.Thread(
                target=self._run,
                args=(consumer,),
                name=f"batches-{spec.queue}-{i}",
                daemon=True,
            )
            thread.start()
            self.threads.append(thread)

    def _run(self, consumer: BatchConsumer) -> None:
        while not _gate.wait(POLL_S):  # the worker is not running yet (see _open_gate)
            if self.stop.is_set():
                return
        consumer.run(self.stop)

    def finish(self, timeout_s: float = 60.0) -> None:
        """Stop taking messages, and wait for the batches in hand."""
        self.stop.set()
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))


_running: _Running | None = None


class _TaskEvents:
    """Celery's task events for what a batch consumer runs (``SAGA_CELERY_EVENTS=1``), so Flower
    and ``celery events`` see the worker's work as they do a task's: received, then succeeded,
    failed or retried. Off: nothing is built, nothing is sent."""

    def __init__(self) -> None:
        self.hostname = ""
        self._dispatcher: Any = None
        self._pid = 0

    def send(self, kind: str, delivery: Delivery, **fields: Any) -> None:
        if not settings().celery_events:
            return
        try:
            if self._dispatcher is None or self._pid != os.getpid():
                from orchestrator.messaging.celery_app import app

                self._dispatcher = app.events.Dispatcher(
                    app.connection_for_write(), hostname=self.hostname or None, enabled=True
                )
                self._pid = os.getpid()
            self._dispatcher.send(f"task-{kind}", uuid=delivery.task_id, **fields)
        except Exception as exc:  # monitoring must never stop the work
            log.warning("task event %s not sent: %s", kind, exc)
            self._dispatcher = None


_events = _TaskEvents()
_EVENT_OF = {"SUCCESS": "succeeded", "FAILURE": "failed", "RETRY": "retried"}

# Opened once the worker's event loop runs. Celery stops a worker whose pool process died before
# that ("Could not start worker processes", celery/worker/loops.py): a consumer must not take
# (and maybe die on, at a fail point) a message earlier. Shared with the pool processes (fork).
_gate = multiprocessing.get_context("fork").Event()


def _start_here(count: int) -> None:
    global _running
    _running = _Running()
    for spec in _specs:
        if spec.active:
            _running.start(spec, count)


def _finish_here() -> None:
    global _running
    running, _running = _running, None
    if running is not None:
        running.finish()


class _BatchStep(bootsteps.StartStopStep):
    """In the worker's blueprint: takes the batched queues away from Celery's own consumer."""

    label = "Batches"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        _events.hostname = worker.hostname  # before the fork: the pool processes report as it
        self.in_process = False
        if settings().batch_max <= 0:
            return
        queues = worker.app.amqp.queues
        for spec in _specs:
            if spec.queue in queues.consume_from:
                spec.active = True
        # prefork: each pool process starts its own consumer (worker_process_init, below).
        self.in_process = any(s.active for s in _specs) and not _is_prefork(worker)

    def start(self, worker: Any) -> None:
        # Here, not in __init__: the banner (printed before the steps start) still lists the
        # worker's queues, and Celery's consumer (the last step to start) no longer takes them.
        queues = worker.app.amqp.queues
        for spec in _specs:
            if spec.active and spec.queue in queues.consume_from:
                queues.deselect(spec.queue)  # an empty selection consumes nothing (not all)
        if self.in_process:
            _start_here(int(worker.concurrency or 1))

    def stop(self, worker: Any) -> None:
        if self.in_process:
            _finish_here()


def _is_prefork(worker: Any) -> bool:
    return "prefork" in getattr(worker.pool_cls, "__module__", "")


def consume_in_batches(
    app: Celery, queue: str, handler: Handler, *, name: str, source: str = "batch"
) -> None:
    """Wire batch consumers of ``queue`` into ``app``'s workers (see the module's docstring)."""
    _specs.append(_Spec(queue, handler, name, source))
    if _BatchStep not in app.steps["worker"]:
        app.steps["worker"].add(_BatchStep)
    worker_ready.connect(_open_gate, weak=False)
    worker_process_init.connect(_in_pool_process, weak=False)
    worker_process_shutdown.connect(_pool_process_leaving, weak=False)


def _open_gate(sender: Any = None, **_: Any) -> None:
    hub = getattr(sender, "hub", None)
    if hub is not None:
        hub.call_soon(_gate.set)  # on the loop's first round: after Celery's start-up check
    else:
        _gate.set()


def _in_pool_process(**_: Any) -> None:
    if not any(s.active for s in _specs):
        return
    _start_here(1)
    signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum: int, frame: FrameType | None) -> None:
    """A pool process told to stop (a whole process group's SIGTERM): finish the batch in hand,
    write what a clean exit writes, and leave (Celery replaces it, unless it is shutting down)."""
    from orchestrator.messaging import fastpath

    _finish_here()
    fastpath.flush()
    process_metrics.mark_exited()
    tracing.flush()
    os._exit(0)


def _pool_process_leaving(**_: Any) -> None:
    from orchestrator.messaging import fastpath

    _finish_here()
    fastpath.flush()  # the last batch's sent marks
    tracing.flush()  # and the last batch's spans
