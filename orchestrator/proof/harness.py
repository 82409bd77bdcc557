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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa

from orchestrator.ops import failpoints
from orchestrator.ops.config import DEFAULT_BROKER_URL, DEFAULT_DATABASE_URL
from orchestrator.ops.processes import PROCESS_TABLE, sagactl

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
}

READY_MARKERS = {
    "orchestrator": "ready.",
    "inventory": "ready.",
    "payment": "ready.",
    "orders": "ready.",
    "relay": "relay started",
    "beat": "beat: Starting",
}


class ServiceMissing(RuntimeError):
    """PostgreSQL or RabbitMQ is not there: a run that needs them must fail, not skip."""


def _rabbitmqctl(*args: str) -> None:
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    result = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise ServiceMissing(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Sandbox:
    name: str
    database_url: str
    broker_url: str

    @classmethod
    def create(cls, prefix: str = "saga", *, prepare: bool = True) -> Sandbox:
        """A fresh vhost and database, migrated and seeded; ``prepare=False``: an empty vhost and
        no database at all (what ``sagactl db upgrade`` finds on a new machine)."""
        name = f"{prefix}_{secrets.token_hex(4)}"
        base_db = sa.make_url(os.environ.get("SAGA_SANDBOX_DATABASE_URL", DEFAULT_DATABASE_URL))
        database_url = base_db.set(database=name).render_as_string(hide_password=False)
        base_broker = os.environ.get("SAGA_SANDBOX_BROKER_URL", DEFAULT_BROKER_URL)
        authority = base_broker.split("://", 1)[1].split("/", 1)[0]
        broker_url = f"{base_broker.split('://', 1)[0]}://{authority}/{name}"
        _rabbitmqctl("add_vhost", name)
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        box = cls(name, database_url, broker_url)
        if prepare:
            box.prepare()
        return box

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
            **extra,
        }

    def destroy(self) -> None:
        from orchestrator.ops.database import drop_database

        try:
            _rabbitmqctl("delete_vhost", self.name)
        finally:
            drop_database(self.database_url)


def use_sandbox(box: Sandbox) -> None:
    """Point this process's settings, database engine and Celery app at the sandbox."""
    from models import db
    from orchestrator.messaging.celery_app import app
    from orchestrator.ops import config

    os.environ["DATABASE_URL"] = box.database_url
    os.environ["BROKER_URL"] = box.broker_url
    config.settings.cache_clear()
    db.get_engine.cache_clear()
    db._factory.cache_clear()
    app.conf.broker_url = box.broker_url


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
        args = list(PROCESS_TABLE[name.split("#")[0]])
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
            elif READY_MARKERS[base] in self.output(name):
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

    def start_all(self, names: Iterable[str] = tuple(PROCESS_TABLE)) -> None:
        """Start every process and wait until each is ready; on failure, stop them all again."""
        names = list(names)
        try:
            for name in names:
                self.start(name, wait=False)
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
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    listed = subprocess.run(
        [exe, "-q", "list_connections", "pid", "vhost"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    pids = [
        line.split("\t")[0]
        for line in listed.splitlines()
        if line.strip() and line.split("\t")[-1].strip() == vhost
    ]
    for pid in pids:
        subprocess.run(
            [exe, "-q", "close_connection", pid, "closed by a test"],
            capture_output=True,
            timeout=60,
        )
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
