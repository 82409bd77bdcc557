"""``sagactl bench``, the systems under test: a sandbox of its own or a running system, the raw
baseline's vhost and workers (orchestrator/proof/bench/raw.py), and py-spy on each process.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.ops.config import settings
from orchestrator.proof.bench.options import Options, Say


def profiled() -> tuple[str, ...]:
    """The processes a profile covers: the web, the relay and every worker of the registry."""
    from orchestrator import registry

    return ("web", "relay", *registry.current().worker_names)


# ---------------------------------------------------------------- the system under test


@dataclass
class Target:
    url: str
    database_url: str
    broker_url: str
    pids: dict[str, int]
    log_dir: Path
    sandbox: str | None = None  # the database and vhost name, when the bench made them
    # Each process's metrics endpoint (the batch sizes are read there); {}: not known.
    metrics: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def sandboxed(log_dir: Path, say: Say) -> Iterator[Target]:
    """A fresh sandbox with every process of the contract, torn down on the way out."""
    from orchestrator.proof.harness import Processes, Sandbox, use_sandbox

    say("creating a sandbox (database, vhost, migrations)…")
    box = Sandbox.create("sagabench")
    # Every process but the web serves its metrics (as `sagactl run` does with
    # SAGA_METRICS_PORT set): the batch sizes are read there.
    procs = Processes(box, log_dir, metrics=True)
    stop_s = 5.0
    try:
        use_sandbox(box)
        say(f"starting the processes (logs in {log_dir})…")
        procs.start_all()
        yield Target(procs.url, box.database_url, box.broker_url,
                     {name: r.proc.pid for name, r in procs.running.items()}, log_dir, box.name,
                     metrics_endpoints(procs))
        stop_s = 30.0
    except BaseException:
        stop_s = 5.0  # a failed run (a broker that went silent, Ctrl-C) does not wait on it
        raise
    finally:
        say("stopping the processes and removing the sandbox…")
        procs.stop_all(timeout_s=stop_s)
        from models.db import get_engine

        get_engine().dispose()
        box.destroy()


def metrics_endpoints(procs: Any) -> dict[str, str]:
    """``{process: url}`` of every harness process that serves its metrics."""
    return {name: f"http://127.0.0.1:{r.metrics_port}/metrics"
            for name, r in procs.running.items() if r.metrics_port}


@contextlib.contextmanager
def running_system(url: str, log_dir: Path) -> Iterator[Target]:
    cfg = settings()
    yield Target(url.rstrip("/"), cfg.database_url, cfg.broker_url, {}, log_dir)


def _vhost_url(broker_url: str, vhost: str) -> str:
    scheme, rest = broker_url.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}/{vhost}"


@contextlib.contextmanager
def raw_baseline(target: Target, say: Say, kind: str = "chain") -> Iterator[Any]:
    """A vhost of its own on the same broker, and the baseline's workers (see bench_raw)."""
    import sqlalchemy as sa

    from orchestrator.proof.bench.raw import RawBaseline
    from orchestrator.proof.harness import _rabbitmqctl

    vhost = f"{target.sandbox or 'sagabench_' + uuid.uuid4().hex[:8]}_{kind}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    dsn = sa.make_url(target.database_url).set(drivername="postgresql")
    baseline = RawBaseline(_vhost_url(target.broker_url, vhost), target.log_dir,
                           settings().worker_concurrency, vhost, kind,
                           dsn.render_as_string(hide_password=False))
    stop_s = 5.0
    try:
        say(f"starting the {kind} baseline's workers…")
        baseline.start()
        yield baseline
        stop_s = 30.0
    except BaseException:
        stop_s = 5.0  # a failed run does not wait on workers that may hang on a silent broker
        raise
    finally:
        baseline.stop(timeout_s=stop_s)
        _rabbitmqctl("delete_vhost", vhost)


# ---------------------------------------------------------------- profiling


@contextlib.contextmanager
def profiling(opts: Options, pids: dict[str, int], say: Say) -> Iterator[None]:
    """py-spy on each process tree while the saga phase runs (raw collapsed stacks)."""
    if opts.profile_dir is None or not pids:
        yield
        return
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = Path(opts.profile_dir)
    out.mkdir(parents=True, exist_ok=True)
    spies = []
    for name in profiled():
        if name in pids:
            argv = [exe, "record", "--pid", str(pids[name]), "--subprocesses", "--nonblocking",
                    "--format", "raw", "--output", str(out / f"{name}.txt")]
            argv.append("--gil" if opts.profile_mode == "cpu" else "--idle")
            spies.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
    say(f"profiling {len(spies)} processes into {out}")
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            try:
                spy.wait(timeout=60)
            except subprocess.TimeoutExpired:
                spy.kill()
