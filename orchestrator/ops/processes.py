"""The process table of the contract, as data, and a small supervisor for ``sagactl run``.

Every process is started as ``python -m orchestrator.ops.cli <args>``, so ``run``, docker-compose and a
person at a shell all start exactly the same thing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from orchestrator import registry

ORCHESTRATOR_APP = "orchestrator.kernel.tasks"


def process_table() -> dict[str, list[str]]:
    """name -> sagactl arguments: the fixed processes, and one worker per registered service."""
    return {
        "web": ["web"],
        "orchestrator": ["worker", registry.ORCHESTRATOR],
        "relay": ["relay"],
        **{service: ["worker", service] for service in registry.current().services},
        "beat": ["beat"],
    }


def yield_cpu_to_the_web() -> None:
    """Run this background process (and the pool processes it forks) at SAGA_BACKGROUND_NICE.

    Two cores shared by the web and every worker: a POST waited behind a batch's time slice
    (POST /orders p99 at 40/s: 25-48 ms with the workers at the web's priority, 21-23 ms with
    them at 10; docs/benchmarks.md). Never raises a process's priority above what it was."""
    from orchestrator.ops.config import settings

    current = os.getpriority(os.PRIO_PROCESS, 0)
    wanted = settings().background_nice
    if wanted > current:
        os.setpriority(os.PRIO_PROCESS, 0, wanted)


def workers() -> dict[str, tuple[str, str]]:
    """worker name -> (Celery app module, queue), from the registry."""
    return {
        registry.ORCHESTRATOR: (ORCHESTRATOR_APP, registry.ORCHESTRATOR_QUEUE),
        **{s.name: (s.module, s.queue) for s in registry.current().services.values()},
    }


def is_worker(name: str) -> bool:
    return name in workers()


def scalable() -> tuple[str, ...]:
    """Kinds that may run several instances side by side (the web has one port: not scaled here)."""
    return tuple(name for name in process_table() if name != "web")


class ScaleError(ValueError):
    """A ``--scale`` value that names an unknown process or a count below 1."""


def parse_scale(text: str | None) -> dict[str, int]:
    """``orchestrator=2,relay=2`` -> ``{"orchestrator": 2, "relay": 2}``."""
    scale: dict[str, int] = {}
    kinds = scalable()
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, sep, count = part.partition("=")
        name = name.strip()
        if not sep or name not in kinds or not count.strip().isdigit() or int(count) < 1:
            raise ScaleError(
                f"--scale wants NAME=N (N >= 1) with NAME one of {', '.join(kinds)}; "
                f"got {part.strip()!r}"
            )
        scale[name] = int(count)
    return scale


def instance_names(scale: dict[str, int] | None = None) -> list[str]:
    """Every process of the table, ``name#2``, ``name#3``... for the scaled ones."""
    scale = scale or {}
    names = []
    for name in process_table():
        names.append(name)
        names += [f"{name}#{i}" for i in range(2, scale.get(name, 1) + 1)]
    return names


def base_name(instance: str) -> str:
    """``relay#2`` -> ``relay``."""
    return instance.split("#", 1)[0]


def sagactl(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.ops.cli", *args]


DEFAULT_WORKER_NODE = "{name}-{pid}@%h"


def worker_node_name(name: str, template: str = "") -> str:
    """Unique per process, so two orchestrators (or two of any worker) may run side by side and
    each has a control mailbox of its own. ``SAGA_WORKER_NODE`` is the template: ``{name}`` and
    ``{pid}`` are filled here, ``%h`` (the host name) by Celery; in a container, where the host
    name is already unique, ``{name}@%h``."""
    return (template or DEFAULT_WORKER_NODE).format(name=name, pid=os.getpid())


# The pool every Celery worker runs (``sagactl worker --pool`` overrides it); the bench's raw
# baseline starts its workers with the same one.
WORKER_POOL = "prefork"


def worker_args(queue: str, node: str, concurrency: int, pool: str) -> list[str]:
    """``celery worker`` arguments consuming ``queue``: the one command line of every worker, the
    saga's (``app.start`` in ``sagactl worker``) and the raw baseline's alike."""
    return [
        "worker",
        "-Q",
        queue,
        "-n",
        node,
        "--concurrency",
        str(concurrency),
        "--pool",
        pool,
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        "INFO",
    ]


def celery_worker_args(
    name: str, concurrency: int, pool: str | None = None, node: str = ""
) -> list[str]:
    """The arguments of worker ``name`` (the orchestrator or a service)."""
    _, queue = workers()[name]
    return worker_args(queue, worker_node_name(name, node), concurrency, pool or WORKER_POOL)


def gunicorn_argv(host: str, port: int, workers: int, threads: int) -> list[str]:
    """The web under gunicorn: gthread workers that answer gunicorn's own errors in JSON and a
    logger that masks and escapes every line (web/serving.py)."""
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "-k",
        "web.serving.JsonErrorWorker",
        "--logger-class",
        "web.serving.SafeLogger",
        "-w",
        str(workers),
        "--threads",
        str(threads),
        "-b",
        f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "--graceful-timeout",
        "20",
        "--access-logfile",
        "-",
        "web:create_app()",
    ]


def wait_for_http(url: str, timeout_s: float) -> bool:
    """Poll ``url`` until it answers 200; False if it never did within ``timeout_s``."""
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.5)
    return False


def metrics_ports(names: Sequence[str], base: str | None) -> dict[str, int]:
    """``sagactl run`` with ``SAGA_METRICS_PORT=P``: each process but the web (which serves
    /metrics on its own port) gets its own endpoint, on P, P+1, ... in the process table's order."""
    if not base:
        return {}
    served = [name for name in names if name != "web"]
    return {name: int(base) + i for i, name in enumerate(served)}


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, start_new_session=True)
        self.started_at = time.monotonic()


@dataclass
class Supervisor:
    """Starts every process, restarts one that dies unexpectedly, stops all on Ctrl-C/SIGTERM."""

    children: list[Child]
    say: Callable[[str], None] = print
    stopping: bool = field(default=False)

    @classmethod
    def for_names(
        cls,
        names: Sequence[str],
        env: dict[str, str],
        port: int,
        say: Callable[[str], None] = print,
    ) -> Supervisor:
        children = []
        ports = metrics_ports(names, env.get("SAGA_METRICS_PORT"))
        for name in names:
            args = process_table()[base_name(name)]
            if name == "web":
                args = [*args, "--port", str(port)]
            own = {"SAGA_PROCESS": name}
            if name in ports:
                own["SAGA_METRICS_PORT"] = str(ports[name])
            children.append(Child(name, sagactl(*args), {**env, **own}))
        return cls(children, say)

    def _stop(self, *_: object) -> None:
        self.stopping = True

    def run(self, on_ready: Callable[[], None] | None = None) -> int:
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGTERM, self._stop)
        for child in self.children:
            child.start()
            self.say(f"started {child.name} (pid {child.proc.pid if child.proc else '?'})")
        if on_ready:
            on_ready()
        while not self.stopping:
            time.sleep(0.5)
            for child in self.children:
                if child.proc is not None and child.proc.poll() is not None and not self.stopping:
                    code = child.proc.returncode
                    # Back off a process that keeps dying at start, so a broken one cannot spin.
                    backoff = (
                        min(30.0, 2.0 ** min(child.restarts, 5))
                        if (time.monotonic() - child.started_at < 10)
                        else 0.5
                    )
                    self.say(f"{child.name} exited with {code}; restarting in {backoff:.1f}s")
                    time.sleep(backoff)
                    child.restarts += 1
                    child.start()
        return self.shutdown()

    def shutdown(self, grace_s: float = 30.0) -> int:
        self.say("stopping every process (warm shutdown)…")
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                os.killpg(child.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait()
        self.say("all stopped")
        return 0
