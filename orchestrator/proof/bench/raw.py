"""The raw Celery baselines of ``sagactl bench``.

- ``chain``: reserve -> charge -> confirm as a Celery chain, nothing else.
- ``floor`` (``--floor``): the least any orchestrated saga over Celery with durable state can do:
  each of the three actions is followed by a reply task on one "orchestrator" queue
  (reserve -> reply -> charge -> reply -> confirm -> reply: six messages), and every task commits
  one row to PostgreSQL with plain psycopg (six commits). No saga logic, no outbox, no ORM.

Same broker server (a vhost of its own), same Celery settings as the saga workers (copied from
``orchestrator.messaging.celery_app``), same queue arguments, one queue and one worker process per task; no
database, no orchestrator, no result backend. The last task reports its completion time in a tiny
message that the bench consumes. Workers run it as ``celery -A orchestrator.proof.bench.raw worker``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from celery import Celery, chain, signals
from kombu import Connection, Exchange, Queue

from orchestrator.messaging.topology import service_queues
from orchestrator.ops import processes
from orchestrator.ops.config import settings

TASKS = ("bench.reserve", "bench.charge", "bench.confirm")
FLOOR_TASKS = ("floor.reserve", "floor.charge", "floor.confirm", "floor.reply")
KIND_TASKS = {"chain": TASKS, "floor": FLOOR_TASKS}
FLOOR_TABLE = "bench_floor"
EXCHANGE = Exchange("bench", type="topic", durable=True)
DONE_QUEUE = Queue("bench.done", Exchange(""), routing_key="bench.done", durable=False)
# Where messages go is the baseline's own; every other setting the project changed is shared.
_TOPOLOGY_SETTINGS = {"broker_url", "task_queues", "task_routes", "task_default_queue",
                      "task_default_exchange", "task_default_routing_key", "beat_schedule"}


def queue_name(task: str) -> str:
    return task


def _queues() -> list[Queue]:
    # The saga's service queues' arguments (quorum, delivery limit, overflow), so both sides pay
    # the same per-message broker cost. Their dead-letter exchange does not exist here: unused.
    arguments = dict(getattr(next(iter(service_queues().values())), "queue_arguments", None) or {})
    return [Queue(queue_name(t), EXCHANGE, routing_key=queue_name(t), durable=True,
                  queue_arguments=arguments) for t in (*TASKS, *FLOOR_TASKS)]


def project_settings() -> dict[str, Any]:
    """Every setting of the project's Celery app that differs from Celery's defaults."""
    from orchestrator.messaging.celery_app import create_celery

    ours, stock = create_celery().conf, Celery("stock").conf
    return {key: ours[key] for key in ours
            if key not in _TOPOLOGY_SETTINGS and not key.startswith("beat_")
            and ours[key] != stock[key]}


def create_raw_celery(broker_url: str) -> Celery:
    raw = Celery("bench_raw", broker=broker_url)
    raw.conf.update(project_settings())
    # The saga's batch consumers keep up to SAGA_BATCH_MAX messages unacked each, one per pool
    # process: the raw workers get the same window (prefetch multiplier x concurrency).
    raw.conf.update(worker_prefetch_multiplier=max(settings().prefetch, settings().batch_max))
    raw.conf.update(
        task_queues=_queues(),
        task_default_exchange=EXCHANGE.name,
        task_default_queue=queue_name(TASKS[0]),
        task_routes={t: {"queue": queue_name(t), "exchange": EXCHANGE.name,
                         "routing_key": queue_name(t)} for t in (*TASKS, *FLOOR_TASKS)},
    )
    return raw


app = create_raw_celery(settings().broker_url)


@signals.worker_init.connect
def _at_the_saga_workers_priority(**_: Any) -> None:
    processes.yield_cpu_to_the_web()  # as `sagactl worker` does (SAGA_BACKGROUND_NICE)


@app.task(name="bench.reserve")
def reserve(chain_id: str) -> str:
    return chain_id


@app.task(name="bench.charge")
def charge(chain_id: str) -> str:
    return chain_id


@app.task(name="bench.confirm", bind=True)
def confirm(self: Any, chain_id: str) -> str:
    _report_done(self.app, chain_id)
    return chain_id


def _report_done(celery_app: Celery, chain_id: str) -> None:
    done_at = time.time()
    with celery_app.producer_or_acquire() as producer:
        producer.publish({"id": chain_id, "at": done_at}, exchange="", routing_key=DONE_QUEUE.name,
                         serializer="json", delivery_mode=1, retry=True)


_floor_db: dict[int, psycopg.Connection[Any]] = {}


def _commit(chain_id: str, step: str) -> None:
    """One durable row: what a participant or an orchestrator writes at the least, per hop."""
    conn = _floor_db.get(os.getpid())
    if conn is None:  # one connection per pool process (never shared across a fork)
        conn = _floor_db[os.getpid()] = psycopg.connect(os.environ["BENCH_FLOOR_DSN"],
                                                        autocommit=True)
    conn.execute(f"INSERT INTO {FLOOR_TABLE} (chain_id, step) VALUES (%s, %s)", (chain_id, step))


@app.task(name="floor.reserve")
def floor_reserve(chain_id: str) -> None:
    _commit(chain_id, "reserve")


@app.task(name="floor.charge")
def floor_charge(chain_id: str) -> None:
    _commit(chain_id, "charge")


@app.task(name="floor.confirm")
def floor_confirm(chain_id: str) -> None:
    _commit(chain_id, "confirm")


@app.task(name="floor.reply", bind=True)
def floor_reply(self: Any, chain_id: str, step: str) -> None:
    _commit(chain_id, f"reply {step}")
    if step == "confirm":
        _report_done(self.app, chain_id)


# ---------------------------------------------------------------- the bench's side


def worker_argv(task: str, concurrency: int | None = None) -> list[str]:
    """The saga workers' arguments (orchestrator.ops.processes.worker_args) for this app: the
    same pool and, by default, the same concurrency (SAGA_WORKER_CONCURRENCY)."""
    return [sys.executable, "-m", "celery", "-A", "orchestrator.proof.bench.raw",
            *processes.worker_args(queue_name(task), f"raw-{task}@%h",
                                   concurrency or settings().worker_concurrency,
                                   processes.WORKER_POOL)]


@dataclass
class RawBaseline:
    """One worker process per task on one vhost, the chain's publisher, the completion listener."""

    broker_url: str
    log_dir: Path
    concurrency: int
    vhost: str | None = None
    kind: str = "chain"  # or "floor"
    floor_dsn: str | None = None  # libpq URL of the database the floor's rows go to
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    done: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _listener: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.app = create_raw_celery(self.broker_url)

    def start(self, timeout_s: float = 60) -> None:
        with Connection(self.broker_url) as conn:
            DONE_QUEUE.bind(conn.default_channel).declare()
        self._listener = threading.Thread(target=self._listen, name="raw-done", daemon=True)
        self._listener.start()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "BROKER_URL": self.broker_url, "SAGA_PROCESS": "raw"}
        if self.kind == "floor":
            assert self.floor_dsn, "the floor baseline needs a database"
            with psycopg.connect(self.floor_dsn, autocommit=True) as conn:
                conn.execute(f"CREATE TABLE IF NOT EXISTS {FLOOR_TABLE} (id bigserial PRIMARY KEY,"
                             " chain_id text NOT NULL, step text NOT NULL)")
            env["BENCH_FLOOR_DSN"] = self.floor_dsn
        for task in KIND_TASKS[self.kind]:
            log = self.log_dir / f"raw-{task}.log"
            with open(log, "ab") as handle:
                self.procs[task] = subprocess.Popen(
                    worker_argv(task, self.concurrency), env=env, stdout=handle,
                    stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        for task, proc in self.procs.items():
            log = self.log_dir / f"raw-{task}.log"
            while "ready." not in log.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"raw worker {task} did not start; see {log}")
                time.sleep(0.1)

    def _listen(self) -> None:
        def on_message(body: dict[str, Any], message: Any) -> None:
            self.done[str(body["id"])] = float(body["at"])

        with Connection(self.broker_url) as conn, conn.Consumer(
                DONE_QUEUE, callbacks=[on_message], accept=["json"], no_ack=True):
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.25)

    def place(self, chain_id: str) -> None:
        """Publish the chain's first message (publisher-confirmed, as the saga side's are)."""
        sig = self.app.signature
        if self.kind == "floor":
            hops = []
            for action in FLOOR_TASKS[:3]:
                step = action.split(".")[1]
                hops += [sig(action, args=(chain_id,), immutable=True),
                         sig("floor.reply", args=(chain_id, step), immutable=True)]
            chain(*hops).apply_async()
            return
        chain(sig(TASKS[0], args=(chain_id,), immutable=True), sig(TASKS[1]),
              sig(TASKS[2])).apply_async()

    def pids(self) -> dict[str, int]:
        return {f"raw {task}": proc.pid for task, proc in self.procs.items()}

    def stop(self, timeout_s: float = 30) -> None:
        self._stop.set()
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._listener is not None:
            self._listener.join(timeout=5)
