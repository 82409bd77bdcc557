"""A whole system in a sandbox of its own, for tests, ``sagactl bench`` and ``sagactl chaos``.

``Sandbox.create()`` makes a fresh PostgreSQL database and RabbitMQ vhost (so leftovers of one run
never reach another), migrates and seeds it. ``Processes`` starts the contract's processes exactly
as production does (``python -m orchestrator.ops.cli ...``), each logging to its own file, and can kill
and restart any of them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa

from orchestrator.ops import failpoints
from orchestrator.ops.cluster import Cluster
from orchestrator.ops.config import settings
from orchestrator.ops.processes import base_name, is_worker, process_table, sagactl

# Short retries and deadlines for a system under test (tests, chaos): the contract's variables.
SHORT_TIMINGS = {
    "SAGA_FAULT_INJECTION": "1",
    "SAGA_RETRY_ATTEMPTS": "3",
    "SAGA_RETRY_BASE_S": "0.05",
    "SAGA_RETRY_MAX_S": "0.2",
    "SAGA_COMPENSATION_ATTEMPTS": "3",
    "SAGA_STEP_TIMEOUT_S": "4",
    "SAGA_SWEEP_S": "1",
    "SAGA_OUTBOX_GRACE_S": "2",
    "SAGA_DEADLINE_S": "120",
    "SAGA_WORKER_CONCURRENCY": "2",
    # The circuit breaker out of reach: runs that inject `always` on purpose (the fault matrix,
    # chaos) must not pause a service for what follows them. tests/integration/test_services.py
    # turns it on for its own orchestrator.
    "SAGA_BREAKER_MIN_CALLS": "1000000",
}

# What each process logs once it is ready; every Celery worker (the orchestrator and each
# service of the registry) says "ready.".
READY_MARKERS = {"relay": "relay started", "beat": "beat: Starting"}
WORKER_READY = "ready."


def ready_marker(base: str) -> str:
    return WORKER_READY if is_worker(base) else READY_MARKERS[base]


class ServiceMissing(RuntimeError):
    """PostgreSQL or RabbitMQ is not there: a run that needs them must fail, not skip."""


def _rabbitmqctl(*args: str, timeout_s: float = 60) -> str:
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    result = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise ServiceMissing(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


# The broker the current sandbox lives on (set by ``use_sandbox``): None, the machine's node.
_cluster: Cluster | None = None


def broker_ctl(*args: str, timeout_s: float = 60) -> str:
    """``rabbitmqctl`` against the broker of the current sandbox: a node of its own cluster when
    it has one, else the machine's node (vhost-scoped commands only: never a node-wide one)."""
    if _cluster is not None:
        return _cluster.ctl(*args, timeout_s=timeout_s)
    return _rabbitmqctl(*args, timeout_s=timeout_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Sandbox:
    name: str
    database_url: str
    broker_url: str
    cluster: Cluster | None = None  # a RabbitMQ cluster of the run's own, else the machine's node

    @classmethod
    def create(
        cls,
        prefix: str = "saga",
        cluster: Cluster | None = None,
        database_url: str | None = None,
        *,
        prepare: bool = True,
    ) -> Sandbox:
        """A fresh vhost on ``cluster`` (else the machine's node) and database on the server of
        ``database_url`` (else ``SAGA_SANDBOX_DATABASE_URL``), migrated and seeded;
        ``prepare=False``: an empty vhost and no database at all (what ``sagactl db upgrade``
        finds on a new machine)."""
        name = f"{prefix}_{secrets.token_hex(4)}"
        base_db = sa.make_url(database_url or settings().sandbox_database_url)
        db_url = base_db.set(database=name).render_as_string(hide_password=False)
        if cluster is not None:
            cluster.add_vhost(name)
            broker_url = cluster.url_for_vhost(name)
        else:
            base_broker = settings().sandbox_broker_url
            authority = base_broker.split("://", 1)[1].split("/", 1)[0]
            broker_url = f"{base_broker.split('://', 1)[0]}://{authority}/{name}"
            _rabbitmqctl("add_vhost", name)
            _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        box = cls(name, db_url, broker_url, cluster)
        if prepare:
            box.prepare()
        return box

    @property
    def queue_replicas(self) -> int | None:
        """One replica per node of the run's cluster; on the machine's node, unset (its default)."""
        return len(self.cluster.nodes) if self.cluster is not None else None

    def replicas_env(self) -> dict[str, str]:
        replicas = self.queue_replicas
        return {} if replicas is None else {"SAGA_QUEUE_REPLICAS": str(replicas)}

    def prepare(self) -> None:
        """Migrate and seed, in a child process so this one's cached settings stay untouched."""
        env = self.env()
        for args in (("db", "upgrade"), ("seed",)):
            result = subprocess.run(
                sagactl(*args), env=env, capture_output=True, text=True, timeout=120
            )
            if result.returncode != 0:
                raise ServiceMissing(f"sagactl {' '.join(args)}: {result.stderr.strip()[-2000:]}")

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "BROKER_URL": self.broker_url,
            **self.replicas_env(),
            **extra,
        }

    def destroy(self) -> None:
        from orchestrator.ops.database import drop_database

        try:
            if self.cluster is not None:
                self.cluster.ctl("delete_vhost", self.name)
            else:
                _rabbitmqctl("delete_vhost", self.name)
        finally:
            drop_database(self.database_url)


def use_sandbox(box: Sandbox) -> None:
    """Point this process's settings, database engine and Celery app at the sandbox."""
    os.environ["DATABASE_URL"] = box.database_url
    os.environ["BROKER_URL"] = box.broker_url
    os.environ.pop("SAGA_QUEUE_REPLICAS", None)
    os.environ.update(box.replicas_env())
    _reload(box.cluster)


_SANDBOX_VARIABLES = ("DATABASE_URL", "BROKER_URL", "SAGA_QUEUE_REPLICAS")


def _reload(cluster: Cluster | None) -> None:
    """Settings, engine, session factory and Celery app read the environment again."""
    global _cluster
    from models import db
    from orchestrator.bootstrap import bootstrap
    from orchestrator.messaging import fastpath
    from orchestrator.ops import config

    fastpath.reset()  # its marks belong to the old database, its connection to the old broker
    config.settings.cache_clear()
    db.forget_engine()
    bootstrap()  # the Celery app's broker and queues from the new settings
    _cluster = cluster


@contextlib.contextmanager
def sandbox_in_use(box: Sandbox) -> Iterator[Sandbox]:
    """``use_sandbox`` for a while (a test module on a cluster of its own), then back to whatever
    this process used before, e.g. the test session's shared sandbox."""
    from models.db import get_engine

    saved = {name: os.environ.get(name) for name in _SANDBOX_VARIABLES}
    saved_cluster = _cluster
    use_sandbox(box)
    try:
        yield box
    finally:
        get_engine().dispose()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _reload(saved_cluster)


@dataclass
class Running:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    offset: int
    port: int | None = None  # a web's own port (``start("web#2", PORT=...)``)
    metrics_port: int | None = None  # its metrics endpoint (``Processes(metrics=True)``)
    planned_exit: bool = False  # the harness killed it, or was told it would die
    exit_noted: bool = False  # its death is already in ``Processes.unplanned`` (or was planned)


@dataclass(frozen=True)
class Exit:
    """A process that died without anyone planning it: what a failing test or chaos shows."""

    name: str
    pid: int
    returncode: int | None
    tail: str

    def __str__(self) -> str:
        return f"{self.name} (pid {self.pid}) exited with {self.returncode}; its log ends:\n{self.tail}"


@dataclass
class Processes:
    """Starts, kills and restarts the contract's processes against one sandbox."""

    box: Sandbox
    log_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    metrics: bool = False  # each process but the web serves /metrics on a port of its own
    running: dict[str, Running] = field(default_factory=dict)
    # Deaths nobody planned, oldest first, until ``take_unplanned_exits`` hands them out.
    unplanned: list[Exit] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _argv(self, name: str, port: int) -> list[str]:
        args = list(process_table()[base_name(name)])
        if args[0] == "web":
            args += ["--port", str(port)]
        return sagactl(*args)

    def start(self, name: str, wait: bool = True, **env: str) -> Running:
        """Start ``name`` (``orchestrator#2`` starts a second orchestrator; a second web needs
        its own ``PORT=...``)."""
        if name in self.running:
            self._note_exit(self.running[name])  # a death this start would otherwise hide
        base = name.split("#")[0]
        port = int(env.get("PORT") or self.port)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name.replace('#', '-')}.log"
        offset = log.stat().st_size if log.exists() else 0
        metrics: dict[str, str] = {}
        if self.metrics and base != "web":
            metrics = {
                "SAGA_METRICS_PORT": str(free_port()),
                "SAGA_METRICS_DIR": str(self.log_dir / "metrics"),
            }
        proc_env = self.box.env(
            **{
                "SAGA_PROCESS": name,
                "PORT": str(port),
                "SAGA_BEAT_SCHEDULE": str(self.log_dir / f"beat-{name}.db"),
                **metrics,
                **self.extra_env,
                **env,
            }
        )
        with open(log, "ab") as handle:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                self._argv(name, port),
                env=proc_env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        metrics_port = proc_env.get("SAGA_METRICS_PORT")
        running = Running(
            name, proc, log, offset, port, int(metrics_port) if metrics_port else None
        )
        self.running[name] = running
        if wait:
            self.wait_ready(name, base)
        return running

    def wait_ready(self, name: str, base: str | None = None, timeout_s: float = 60) -> None:
        base = base or name.split("#")[0]
        running = self.running[name]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if running.proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {running.proc.returncode}:\n" + self.tail(name)
                )
            if base == "web":
                try:
                    url = f"http://127.0.0.1:{running.port or self.port}/healthz"
                    if requests.get(url, timeout=1).status_code == 200:
                        return
                except requests.RequestException:
                    pass
            elif ready_marker(base) in self.output(name):
                return
            time.sleep(0.1)
        raise TimeoutError(f"{name} not ready after {timeout_s}s:\n" + self.tail(name))

    def output(self, name: str) -> str:
        running = self.running[name]
        with open(running.log, "rb") as f:
            f.seek(running.offset)
            return f.read().decode("utf-8", errors="replace")

    def tail(self, name: str, lines: int = 40) -> str:
        return "\n".join(self.output(name).splitlines()[-lines:])

    def start_all(
        self, names: Iterable[str] | None = None, env: dict[str, dict[str, str]] | None = None
    ) -> None:
        """Start every process (``env``: extra variables of some, by name) and wait until each is
        ready; on failure, stop them all again."""
        names = list(process_table() if names is None else names)
        try:
            for name in names:
                self.start(name, wait=False, **(env or {}).get(name, {}))
            for name in names:
                self.wait_ready(name)
        except BaseException:
            self.stop_all(signal.SIGKILL, timeout_s=10)
            raise

    def pid(self, name: str) -> int:
        return self.running[name].proc.pid

    def worker_children(self, name: str) -> list[int]:
        """The prefork pool processes of a Celery worker (where tasks actually run)."""
        import psutil

        return [c.pid for c in psutil.Process(self.pid(name)).children()]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill the whole process group, as a machine losing the process would (a planned death;
        one that had already happened on its own is noted as unplanned first)."""
        running = self.running[name]
        self._note_exit(running)
        running.planned_exit = True
        if running.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(running.proc.pid, sig)
        running.proc.wait(timeout=60)

    def restart(self, name: str, sig: int = signal.SIGKILL, **env: str) -> None:
        self.kill(name, sig)
        self.start(name, **env)  # type: ignore[arg-type]

    def alive(self, name: str) -> bool:
        return name in self.running and self.running[name].proc.poll() is None

    def expect_exit(self, name: str) -> None:
        """``name`` is about to die on purpose in a way the harness cannot see (not a kill of its
        own, not a fail point): its death is planned."""
        self.running[name].planned_exit = True

    def _failpoints_dir(self) -> str | None:
        return self.box.env(**self.extra_env).get("SAGA_FAILPOINTS_DIR")

    def _note_exit(self, running: Running) -> None:
        """If ``running`` has died and nobody planned it (no kill of ours, no fail point that
        fired in it), keep it in ``unplanned``, once."""
        if running.exit_noted or running.proc.poll() is None:
            return
        running.exit_noted = True
        if running.planned_exit or running.proc.pid in failpoints.fired_pids(
            self._failpoints_dir()
        ):
            return
        self.unplanned.append(
            Exit(running.name, running.proc.pid, running.proc.returncode, self.tail(running.name))
        )

    def take_unplanned_exits(self) -> list[Exit]:
        """Every death since the last call that no kill, fail point or ``expect_exit`` explains."""
        for running in list(self.running.values()):
            self._note_exit(running)
        taken, self.unplanned = self.unplanned, []
        return taken

    def stop_all(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> None:
        for running in self.running.values():
            running.planned_exit = True
            if running.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(running.proc.pid, sig)
        deadline = time.monotonic() + timeout_s
        for running in self.running.values():
            try:
                running.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(running.proc.pid, signal.SIGKILL)
                running.proc.wait()

    def describe(self) -> dict[str, Any]:
        return {name: r.proc.pid for name, r in self.running.items()}


def close_broker_connections(vhost: str) -> int:
    """Close every AMQP connection of one vhost (as a network blip would). Returns how many."""
    listed = broker_ctl("-q", "list_connections", "pid", "vhost")
    pids = [
        line.split("\t")[0]
        for line in listed.splitlines()
        if line.strip() and line.split("\t")[-1].strip() == vhost
    ]
    for pid in pids:
        with contextlib.suppress(Exception):  # it may have closed on its own
            broker_ctl("-q", "close_connection", pid, "closed by a test")
    return len(pids)


def terminate_database_connections(database_url: str) -> int:
    """pg_terminate_backend on every session of one database but ours. Returns how many."""
    import psycopg

    target = sa.make_url(database_url)
    admin = target.set(drivername="postgresql", database="postgres")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (target.database,),
        ).fetchall()
    return len(rows)
