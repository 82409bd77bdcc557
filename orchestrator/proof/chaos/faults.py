"""``sagactl chaos``, the disruptions: on a seeded schedule, kill and restart processes, cut the
sandbox's RabbitMQ connections, terminate its PostgreSQL backends, arm fail points, restock.

Only the sandbox's own vhost and database are touched. Servers are stopped only when the run owns
them: RabbitMQ nodes of its own cluster (``--broker-nodes``, ``--allow-broker-restart``; see
broker_nodes.py) and a PostgreSQL of its own (``--allow-db-restart``); never the machine's.
With ``--scale``, a kill takes one instance of a kind and its twin keeps running.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa

from orchestrator import registry
from orchestrator.ops import failpoints
from orchestrator.ops.processes import base_name
from orchestrator.proof.chaos.load import SCARCE
from orchestrator.proof.harness import Processes, Sandbox, broker_ctl
from orchestrator.sagas import catalog

# A scheduled disruption: (seconds after the start, action, target, what doing it means).
Scheduled = tuple[float, str, str, Callable[[], object]]
# (action, weight)
ACTIONS = (("kill", 40), ("kill_child", 14), ("close_connections", 12),
           ("terminate_backends", 12), ("failpoint", 8), ("restock", 8))


def workers() -> tuple[str, ...]:
    """Every Celery worker process: the orchestrator and each service of the registry."""
    return tuple(registry.current().worker_names)


def kill_targets() -> tuple[tuple[str, int], ...]:
    """(process, weight). The web is killed too, less often: the client then sees connection
    errors and resends."""
    services = tuple((s, 2) for s in registry.current().services)
    return (("orchestrator", 3), ("relay", 3), *services, ("beat", 2), ("web", 1))


def rabbitmqctl(*args: str, timeout_s: float = 60) -> str:
    """Against the sandbox's broker: a node of the run's cluster, or the machine's node."""
    return broker_ctl(*args, timeout_s=timeout_s)


def close_vhost_connections(vhost: str) -> int:
    """Close the connections of ``vhost`` only (``-p``, no ``--global``: seen to leave other
    vhosts' connections open), in one call. Returns how many the broker closed."""
    out = rabbitmqctl("-q", "close_all_connections", "-p", vhost, "chaos")
    found = re.search(r"Closed (\d+) connection", out)
    return int(found.group(1)) if found else 0


def terminate_backends(database_url: str) -> int:
    """Terminate every PostgreSQL backend of the sandbox database but this one."""
    url = sa.make_url(database_url)
    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()", (url.database,)).fetchall()
    return sum(1 for (done,) in rows if done)


@dataclass
class Disruptor:
    """Runs the schedule in its own thread; the only thread that touches ``procs``."""

    procs: Processes
    box: Sandbox
    seed: int
    failpoints_dir: Path
    say: Callable[[str], None]
    interval_s: tuple[float, float] = (1.5, 4.0)
    broker_restart_at: float | None = None  # seconds after start; None: never
    scheduled: list[Scheduled] = field(default_factory=list)  # broker nodes, database restart
    counts: Counter[str] = field(default_factory=Counter)
    events: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # each unplanned death, with its log tail
    last_at: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _started: float = 0.0

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="chaos-faults", daemon=True)
        self._thread.start()

    def finish(self) -> None:
        """Stop the schedule, disarm fail points, and bring every process back."""
        self.stop.set()
        if self._thread:
            self._thread.join(timeout=300)
        for name in failpoints.NAMES:
            if (self.failpoints_dir / name).exists():
                self.counts[f"failpoint_unfired:{name}"] += 1
            (self.failpoints_dir / name).unlink(missing_ok=True)
        self.supervise(final=True)

    def _loop(self) -> None:
        rng = random.Random(f"{self.seed}/faults")
        # Every kind once first (in a seeded order), then by weight: a short run on a slow
        # machine, which fits few disruptions in its time, still has one of each.
        first_round = [a for a, _ in ACTIONS]
        rng.shuffle(first_round)
        while not self.stop.wait(rng.uniform(*self.interval_s)):
            self.supervise()
            if (self.broker_restart_at is not None
                    and time.monotonic() - self._started >= self.broker_restart_at):
                self.broker_restart_at = None
                self._do("broker_restart", "rabbitmq", self._restart_broker)
                continue
            due = [s for s in self.scheduled if time.monotonic() - self._started >= s[0]]
            if due:
                self.scheduled.remove(due[0])
                self._do(*due[0][1:])
                continue
            action = (
                first_round.pop(0)
                if first_round
                else rng.choices([a for a, _ in ACTIONS], weights=[w for _, w in ACTIONS])[0]
            )
            target, act = self._plan(action, rng)
            if action == "kill" and self._twins(target):
                action = "kill_twin"  # one instance of a scaled kind; another keeps running
            self._do(action, target, act)

    def _instance(self, kind: str, rng: random.Random) -> str:
        """One running instance of ``kind`` (``relay`` or ``relay#2``...)."""
        names = sorted(n for n in self.procs.running if base_name(n) == kind) or [kind]
        return rng.choice(names)

    def _twins(self, instance: str) -> list[str]:
        """The other live instances of ``instance``'s kind."""
        return [n for n in self.procs.running if n != instance
                and base_name(n) == base_name(instance) and self.procs.alive(n)]

    def _plan(self, action: str, rng: random.Random) -> tuple[str, Callable[[], object]]:
        """The target of one disruption and what doing it means (drawn from the run's seed)."""
        if action == "kill":
            targets = kill_targets()
            kind = rng.choices([n for n, _ in targets], [w for _, w in targets])[0]
            name = self._instance(kind, rng)
            return name, partial(self._kill_restart, name, rng.uniform(0, 2.0))
        if action == "kill_child":
            name = self._instance(rng.choice(workers()), rng)
            return name, partial(self._kill_child, name, rng)
        if action == "close_connections":
            return self.box.name, partial(close_vhost_connections, self.box.name)
        if action == "terminate_backends":
            return self.box.name, partial(terminate_backends, self.box.database_url)
        if action == "failpoint":
            point = rng.choice(failpoints.NAMES)
            return point, (self.failpoints_dir / point).touch
        return SCARCE[0], partial(catalog.restock, SCARCE[0], rng.randint(2, 6))

    def _do(self, action: str, target: str, act: Callable[[], object]) -> None:
        at = round(time.monotonic() - self._started, 1)
        try:
            result = act()
        except Exception as exc:  # one failed disruption must not end the run
            self.errors.append(f"{action} {target}: {type(exc).__name__}: {exc}"[:300])
            self.say(f"chaos: {action} {target} failed: {exc}")
            return
        self.counts[f"{action}:{target}"] += 1
        self.events.append({"at_s": at, "action": action, "target": target,
                            "result": result if isinstance(result, int | str | dict) else None})
        self.last_at = time.monotonic()
        self.say(f"chaos t={at:.0f}s: {action} {target}"
                 + (f" -> {result}" if isinstance(result, int | str | dict) else ""))

    def _kill_restart(self, name: str, downtime: float) -> str:
        twins = self._twins(name)
        self.procs.kill(name, signal.SIGKILL)
        time.sleep(downtime)
        self.procs.start(name)
        return f"down {downtime:.1f}s" + (f", {', '.join(twins)} running" if twins else "")

    def _kill_child(self, name: str, rng: random.Random) -> str:
        children = self.procs.worker_children(name)
        if not children:
            return "no pool process"
        pid = rng.choice(children)
        signal_pid(pid)
        return f"pid {pid}"

    def _restart_broker(self) -> str:
        """Stop and start a node of the run's own broker; never the machine's node."""
        if self.box.cluster is None:
            raise RuntimeError("no broker of the run's own to restart (the machine's is not ours)")
        from orchestrator.proof.chaos.broker_nodes import BrokerChaos

        done = BrokerChaos(self.box.cluster, self.box.name, self._started).restart_one(
            random.Random(f"{self.seed}/broker"))
        return f"{done['node']} stopped and started, down {done['down_s']}s"

    def supervise(self, final: bool = False) -> None:
        """Restart a process that died without being killed by the schedule: after a fail point
        that fired in it (planned), or a crash (``unexpected_exit``, which breaks the run)."""
        self._count_unplanned()
        for name in list(self.procs.running):
            if self.procs.alive(name):
                continue
            self.say(f"chaos: {name} had exited ({self.procs.running[name].proc.returncode}); "
                     "restarting")
            for _ in range(5 if final else 1):
                try:
                    self.procs.start(name)
                    break
                except (RuntimeError, TimeoutError) as exc:
                    self.errors.append(f"restart {name}: {exc}"[:300])
        if final:
            self._count_unplanned()  # a restart that died at once

    def _count_unplanned(self) -> None:
        for death in self.procs.take_unplanned_exits():
            self.counts[f"unexpected_exit:{death.name}"] += 1
            self.unexpected.append(str(death)[:3000])

    def summary(self) -> dict[str, Any]:
        per_action: dict[str, dict[str, int]] = {}
        for key, n in self.counts.items():
            action, target = key.split(":", 1)
            per_action.setdefault(action, {})[target] = n
        return {"by_action": per_action, "total": sum(
            n for k, n in self.counts.items() if not k.startswith(("unexpected_", "failpoint_"))),
            "errors": self.errors, "events": self.events, "unexpected_exits": self.unexpected}


def signal_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
