"""Metrics the working processes count themselves, and the small HTTP endpoint that serves them.

The web's /metrics (orchestrator/ops/metrics.py) reads the database at scrape time; these count
what only the process doing the work sees: tasks and their durations, publishes and confirms, the
relay's delay, dead letters taken in, sweeps. Every process kind runs prometheus-client's
multiprocess mode, because the Celery workers (prefork) and the web (gunicorn) fork:
``metrics_dir.prepare`` gives each process a fresh ``PROMETHEUS_MULTIPROC_DIR`` before
prometheus_client is imported, and the endpoint merges the files of parent and children.
With ``SAGA_METRICS_PORT`` unset a worker, relay or beat serves nothing and writes no files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator.ops.metrics_dir import MULTIPROC_ENV, alive

log = logging.getLogger(__name__)

FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

# ---------------------------------------------------------------- the metrics (one source)

TASKS = Counter(
    "saga_worker_tasks",
    "Celery tasks run by this worker, by task name and outcome",
    ["task", "outcome"],  # outcome: succeeded, failed, retried, rejected, ignored
)
TASK_DURATION = Histogram(
    "saga_worker_task_duration_seconds", "Celery task run time", ["task"], buckets=SLOW
)
TASKS_ACTIVE = Gauge(
    "saga_worker_tasks_active", "Celery tasks running now", multiprocess_mode="livesum"
)
CELERY_SENT = Counter(
    "saga_celery_sent",
    "Task messages a process sent of its own (replies, through Celery or a participant's batch"
    " consumer; beat's ticks), by task",
    ["task"],
)
PUBLISH_DURATION = Histogram(
    "saga_publish_duration_seconds",
    "Publishing one batch of outbox rows until the broker confirmed all of it",
    ["source"],  # relay, fast_path, sweeper
    buckets=FAST,
)
PUBLISHED = Counter(
    "saga_published_messages",
    "Outbox rows published, by source and what the broker answered",
    ["source", "result"],
)
PUBLISH_RESULTS = ("confirmed", "refused", "unconfirmed", "failed")  # nack, timeout, error
RELAY_DELAY = Histogram(
    "saga_relay_delay_seconds",
    "From an outbox row's commit to its publish by the relay (or the sweeper)",
    ["source"],
    buckets=SLOW,
)
DEAD_LETTERS_RECORDED = Counter(
    "saga_dead_letters_recorded", "Dead letters taken in from the dead-letter queues", ["queue"]
)
SWEEPS = Counter("saga_sweeps", "Sweeps run (deadlines and unsent outbox rows)")
SWEEP_ACTIONS = Counter(
    "saga_sweep_actions",
    "What the sweeps did: sagas acted on past a deadline, outbox rows published, sagas acted "
    "on by bulk operations",
    ["action"],  # deadline, outbox, bulk
)
SWEEP_DURATION = Histogram("saga_sweep_duration_seconds", "One sweep", buckets=SLOW)
# Messages per batch of a batched consumer: every size up to 10 is a bucket of its own (most
# batches are small), then coarser up to the largest bound a consumer takes (about 100).
BATCH_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 20, 25, 32, 40, 50, 64, 80, 100, 128, 256,
               512)
BATCH_MESSAGES = Histogram(
    "saga_batch_messages",
    "Messages taken and applied together in one batch, by the queue they came from",
    ["queue"],
    buckets=BATCH_SIZES,
)
# A service's state and its held commands are gauges computed from the database at scrape time
# (orchestrator/ops/metrics.py: saga_service_state, saga_commands_held); the changes are counted here.
SERVICE_CHANGES = Counter(
    "saga_service_changes",
    "Changes of a service's state (operator pause/resume, the breaker opening, probing, closing)",
    ["service", "state"],  # the state entered
)
RELEASED = Counter("saga_commands_released", "Held commands released to their service", ["service"])


# ---------------------------------------------------------------- per-process setup


def _multiproc_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class _ReapDeadChildren(Collector):
    """At scrape time, drop the live gauges of pool children that died without saying so
    (a SIGKILLed child never runs ``worker_process_shutdown``)."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)

    def collect(self) -> Iterator[Metric]:
        for f in self._path.glob("gauge_live*_*.db"):
            pid = f.stem.rsplit("_", 1)[-1]
            if pid.isdigit() and not alive(int(pid)):
                multiprocess.mark_process_dead(int(pid), str(self._path))
        return iter(())


def registry() -> CollectorRegistry:
    """What this process's endpoint serves: the merged files in multiprocess mode, else the
    process-global registry (the web under the Flask test client or ``--dev``)."""
    merged = CollectorRegistry()
    path = _multiproc_dir()
    if path is None:
        merged.register(_Everything())
        return merged
    merged.register(_ReapDeadChildren(path))  # first: reaped before the merge reads the files
    multiprocess.MultiProcessCollector(merged, path=path)
    return merged


class _Everything(Collector):
    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def render() -> bytes:
    return generate_latest(registry())


def mark_exited(pid: int | None = None) -> None:
    """A pool child leaving: its live gauges stop counting (its counters stay, as they should)."""
    path = _multiproc_dir()
    if path is not None:
        multiprocess.mark_process_dead(pid or os.getpid(), path)


_served: list[Any] = []


def serve(port: int | None, addr: str, extra: Collector | None = None) -> None:
    """Start the endpoint (a daemon thread) on ``port``; nothing when it is unset. Once per process."""
    if not port or _served:
        return
    reg = registry()
    if extra is not None:
        reg.register(extra)
    server, _thread = start_http_server(port, addr=addr, registry=reg)
    _served.append(server)
    log.info("metrics on http://%s:%d/metrics", addr, port)


# ---------------------------------------------------------------- Celery task hooks

_OUTCOMES = {
    "SUCCESS": "succeeded",
    "FAILURE": "failed",
    "RETRY": "retried",
    "REJECTED": "rejected",
    "IGNORED": "ignored",
}
_started: dict[str, float] = {}
_started_lock = threading.Lock()


def at_zero(
    tasks: Iterable[str] = (), sources: Iterable[str] = (), queues: Iterable[str] = ()
) -> None:
    """Create the series a process will count in, at 0: a rate or increase over a series that
    appears only with its first event misses that event (Prometheus sees no change)."""
    for task in tasks:
        for outcome in _OUTCOMES.values():
            TASKS.labels(task, outcome)
    for source in sources:
        for result in PUBLISH_RESULTS:
            PUBLISHED.labels(source, result)
    for queue in queues:
        DEAD_LETTERS_RECORDED.labels(queue)


def task_started(task_id: str | None) -> None:
    if task_id:
        with _started_lock:
            _started[task_id] = time.perf_counter()
    TASKS_ACTIVE.inc()


def task_finished(task_id: str | None, task_name: str, state: str | None) -> None:
    TASKS_ACTIVE.dec()
    with _started_lock:
        began = _started.pop(task_id, None) if task_id else None
    outcome = _OUTCOMES.get(state or "", (state or "unknown").lower())
    TASKS.labels(task_name, outcome).inc()
    if began is not None:
        TASK_DURATION.labels(task_name).observe(time.perf_counter() - began)


# ---------------------------------------------------------------- batches


def count_sent(tasks: list[str]) -> None:
    """Task messages sent (and confirmed) outside Celery's send_task, e.g. a batch's replies."""
    for task in tasks:
        CELERY_SENT.labels(task).inc()


def observe_batch(queue: str, size: int) -> None:
    """A batched consumer took ``size`` messages from ``queue`` and applied them together: called
    once per batch (``sagactl bench`` and ``sagactl chaos`` report the distribution)."""
    BATCH_MESSAGES.labels(queue).observe(size)


# ---------------------------------------------------------------- publishing


@contextlib.contextmanager
def publishing(source: str, count: int) -> Iterator[None]:
    """Time one confirmed batch and count its rows by the broker's answer."""
    began = time.perf_counter()
    try:
        yield
    except TimeoutError:
        PUBLISHED.labels(source, "unconfirmed").inc(count)
        raise
    except Exception as exc:
        PUBLISHED.labels(source, "refused" if "refused" in str(exc) else "failed").inc(count)
        raise
    PUBLISH_DURATION.labels(source).observe(time.perf_counter() - began)
    PUBLISHED.labels(source, "confirmed").inc(count)


# ---------------------------------------------------------------- the broker's queues


def queue_counts(
    broker_url: str, queues: Iterable[str], timeout_s: float = 3
) -> dict[str, tuple[int, int]]:
    """Messages ready and consumers of each queue (a passive declare each, one short connection)."""
    from kombu import Connection

    counts = {}
    with Connection(broker_url, connect_timeout=timeout_s) as conn:
        channel = conn.default_channel
        for queue in queues:
            _, messages, consumer_count = channel.queue_declare(queue, passive=True)
            counts[queue] = (int(messages), int(consumer_count))
    return counts


class QueueCollector(Collector):
    """Consumers on and messages in each service queue, asked of the broker at scrape time
    (a passive declare per queue on a short connection): states, so gauges."""

    def __init__(self, broker_url: str, queues: tuple[str, ...]) -> None:
        self._url = broker_url
        self._queues = queues

    def collect(self) -> Iterator[Metric]:
        consumers = GaugeMetricFamily(
            "saga_queue_consumers", "Consumers on a service queue", labels=["queue"]
        )
        depth = GaugeMetricFamily(
            "saga_queue_messages", "Messages ready in a service queue", labels=["queue"]
        )
        up = GaugeMetricFamily(
            "saga_broker_up", "1 when the broker answered this scrape's queue questions"
        )
        try:
            for queue, (messages, consumer_count) in queue_counts(self._url, self._queues).items():
                consumers.add_metric([queue], consumer_count)
                depth.add_metric([queue], messages)
            up.add_metric([], 1)
        except Exception as exc:  # a scrape must answer; the gauge says the broker did not
            log.warning("queue metrics: broker did not answer (%s)", exc)
            up.add_metric([], 0)
            yield up
            return
        yield from (consumers, depth, up)
