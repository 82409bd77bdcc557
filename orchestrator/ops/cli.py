"""``sagactl``: the one command line of the system (processes, database, operations, proof)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any

import click

from orchestrator.ops.config import ConfigError, settings


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _prepare_metrics(process: str, always: bool = False) -> None:
    """A fresh multiprocess-metrics folder for this process, before anything imports
    prometheus_client (workers and the web fork; see orchestrator/ops/process_metrics.py)."""
    from orchestrator.ops import metrics_dir

    cfg = settings()
    metrics_dir.prepare(
        os.environ.get("SAGA_PROCESS") or process,
        cfg.metrics_dir,
        enabled=always or cfg.metrics_port is not None,
    )


@click.group()
def main() -> None:
    """Run and operate the saga orchestrator."""
    try:
        settings()
    except ConfigError as exc:
        _fail(str(exc))


# ---------------------------------------------------------------- database


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Create the database if missing, then apply the Alembic migrations."""
    from orchestrator.ops import database

    database.upgrade(revision=revision)
    click.echo(f"database at {revision}")


@main.command()
def seed() -> None:
    """Create the demo catalogue (idempotent: never resets stock)."""
    from orchestrator.sagas import catalog

    created = catalog.seed()
    click.echo(
        f"seeded: {created} product(s) created, {len(catalog.DEMO_PRODUCTS) - created} already there"
    )


@main.command()
@click.argument("sku")
@click.argument("quantity", type=click.IntRange(min=1))
def restock(sku: str, quantity: int) -> None:
    """Add QUANTITY units of SKU to the available stock."""
    from orchestrator.sagas import catalog

    try:
        available = catalog.restock(sku, quantity)
    except catalog.UnknownProduct:
        _fail(f"unknown sku {sku!r}")
    click.echo(f"{sku}: {available} available")


# ---------------------------------------------------------------- processes


@main.command()
@click.option("--port", type=int, default=None, help="default: $PORT or 8000")
@click.option("--dev", is_flag=True, help="the Flask development server instead of gunicorn")
def web(port: int | None, dev: bool) -> None:
    """The Flask app under gunicorn."""
    port = port or settings().port
    os.environ.setdefault("SAGA_PROCESS", "web")
    _prepare_metrics("web", always=not dev)  # its own /metrics serves them
    if dev:
        from web import create_app

        create_app().run(host="127.0.0.1", port=port, debug=False, threaded=True)
        return
    from web import create_app

    create_app()  # fail fast (e.g. production without secrets) before forking workers
    workers = os.environ.get("SAGA_WEB_WORKERS", "2")
    threads = os.environ.get("SAGA_WEB_THREADS", "8")
    os.execvp(
        sys.executable,
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-k",
            "gthread",
            "-w",
            workers,
            "--threads",
            threads,
            "-b",
            f"0.0.0.0:{port}",
            "--graceful-timeout",
            "20",
            "--access-logfile",
            "-",
            "web:create_app()",
        ],
    )


@main.command()
@click.argument("name", type=click.Choice(["orchestrator", "inventory", "payment", "orders"]))
@click.option("--concurrency", type=int, default=None, help="default: $SAGA_WORKER_CONCURRENCY")
@click.option("--pool", default="prefork", show_default=True)
def worker(name: str, concurrency: int | None, pool: str) -> None:
    """A Celery worker consuming exactly its service's queue."""
    from orchestrator.ops.processes import celery_worker_argv

    os.environ.setdefault("SAGA_PROCESS", name)
    _prepare_metrics(name)
    argv = celery_worker_argv(
        name, concurrency or settings().worker_concurrency, pool, settings().worker_node
    )
    os.execvp(argv[0], argv)


@main.command()
def relay() -> None:
    """Publish committed outbox rows, with publisher confirms."""
    os.environ.setdefault("SAGA_PROCESS", "relay")
    _prepare_metrics("relay")
    from orchestrator.messaging.outbox import run_relay
    from orchestrator.messaging.topology import SERVICE_QUEUE_NAMES
    from orchestrator.ops import process_metrics
    from orchestrator.ops.logs import setup_logging

    setup_logging("relay")
    cfg = settings()
    # The relay's endpoint also answers for the broker's queues (consumers, depth).
    queues = process_metrics.QueueCollector(cfg.broker_url, SERVICE_QUEUE_NAMES)
    process_metrics.serve(cfg.metrics_port, cfg.metrics_addr, extra=queues)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run_relay(stop)


@main.command()
def beat() -> None:
    """Celery beat: schedules the sweep (deadlines and unsent outbox rows)."""
    from orchestrator.ops.config import state_dir

    os.environ.setdefault("SAGA_PROCESS", "beat")
    _prepare_metrics("beat")
    folder = state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    schedule = os.environ.get("SAGA_BEAT_SCHEDULE") or str(folder / f"beat-schedule-{os.getpid()}")
    os.execvp(
        sys.executable,
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "orchestrator.messaging.celery_app",
            "beat",
            "--schedule",
            schedule,
            "--loglevel",
            "INFO",
        ],
    )


@main.command()
@click.option("--port", type=int, default=None, help="default: $PORT or 8000")
def run(port: int | None) -> None:
    """Every process of the system on this machine; Ctrl-C stops them all."""
    from orchestrator.ops.processes import PROCESS_TABLE, Supervisor, metrics_ports

    cfg = settings()
    port = port or cfg.port
    env = {**os.environ, "PORT": str(port)}

    def ready() -> None:
        from orchestrator.ops.processes import wait_for_http

        if not wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout_s=120):
            click.echo("warning: the web did not answer /healthz within 120 s", err=True)
        click.echo(f"\nSaga shop:      http://127.0.0.1:{port}/")
        click.echo(f"Admin console:  http://127.0.0.1:{port}/admin")
        if not cfg.production:
            click.echo(f"Admin login:    {cfg.admin_user} / {cfg.admin_password}")
        for name, metrics_port in metrics_ports(
            list(PROCESS_TABLE), env.get("SAGA_METRICS_PORT")
        ).items():
            click.echo(f"Metrics:        {name:<13} http://127.0.0.1:{metrics_port}/metrics")
        click.echo("Ctrl-C stops everything.\n")

    sup = Supervisor.for_names(list(PROCESS_TABLE), env, port, say=click.echo)
    sys.exit(sup.run(on_ready=ready))


# ---------------------------------------------------------------- operations


@main.command()
@click.option("--url", default=None, help="default: $SAGA_URL")
@click.option("--count", type=int, default=20, show_default=True)
@click.option("--timeout", "timeout_s", type=float, default=120, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def demo(url: str | None, count: int, timeout_s: float, as_json: bool) -> None:
    """Place a mix of orders against a running system and print each outcome."""
    from orchestrator.proof import demo as demo_mod

    summary = demo_mod.run(url or settings().saga_url, count, timeout_s, click.echo, as_json)
    if as_json:
        _print_json(summary)
    if summary["as_expected"] != count:
        sys.exit(1)


@main.command()
@click.option("--json", "as_json", is_flag=True)
def audit(as_json: bool) -> None:
    """Check the invariants; exit 1 on any breach."""
    from orchestrator.ops import audit as audit_mod

    report = audit_mod.run()
    if as_json:
        _print_json(report.as_json())
    else:
        click.echo(f"checked {report.checked}")
        for v in report.violations:
            click.echo(f"invariant {v['invariant']} broken: order {v['order_id']}: {v['detail']}")
        for o in report.orphans:
            click.echo(f"orphan dead letter {o['id']} from {o['queue']}: {o['reason']}")
        click.echo("ok" if report.ok else f"{len(report.violations)} violation(s)")
    sys.exit(0 if report.ok else 1)


@main.group()
def dlq() -> None:
    """Dead letters: list, replay, discard."""


@dlq.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.option("--all", "show_all", is_flag=True, help="include replayed and discarded")
def dlq_list(as_json: bool, show_all: bool) -> None:
    from models.db import transaction
    from orchestrator.messaging import deadletters

    with transaction() as session:
        rows = [
            deadletters.as_dict(d)
            for d in deadletters.list_letters(session, limit=1000)
            if show_all or d.state.value == "dead"
        ]
    if as_json:
        _print_json({"dead_letters": rows})
        return
    for r in rows:
        click.echo(
            f"{r['id']:>6} {r['state']:<9} {r['queue']:<18} {r['step'] or '?':<20} "
            f"saga {r['saga_id'] or 'orphan'}  {r['reason']}"
        )
    click.echo(f"{len(rows)} dead letter(s)")


def _dlq_act(verb: str, letter_id: int) -> None:
    from orchestrator.messaging import deadletters

    act = deadletters.replay if verb == "replay" else deadletters.discard
    try:
        act(letter_id, os.environ.get("USER") or "cli")
    except deadletters.DeadLetterNotFound:
        _fail(f"no dead letter {letter_id}")
    except deadletters.DeadLetterResolved as exc:
        _fail(str(exc), code=1)
    click.echo(
        f"dead letter {letter_id} {verb}ed"
        if verb == "replay"
        else f"dead letter {letter_id} discarded"
    )


@dlq.command("replay")
@click.argument("letter_id", type=int)
def dlq_replay(letter_id: int) -> None:
    """Publish the original message to its queue again."""
    _dlq_act("replay", letter_id)


@dlq.command("discard")
@click.argument("letter_id", type=int)
def dlq_discard(letter_id: int) -> None:
    """Mark a dead letter discarded."""
    _dlq_act("discard", letter_id)


@main.command()
@click.option("--older-than", "days", type=click.FloatRange(min=0), required=True, help="days")
@click.option("--json", "as_json", is_flag=True)
def prune(days: float, as_json: bool) -> None:
    """Delete sent outbox rows, resolved dead letters and idempotency keys older than DAYS."""
    from orchestrator.ops import maintenance

    removed = maintenance.prune(days)
    if as_json:
        _print_json(removed)
    else:
        click.echo(", ".join(f"{k}: {v} removed" for k, v in removed.items()))


@main.command()
@click.option(
    "--duration",
    "duration_s",
    type=click.FloatRange(min=5),
    default=60,
    show_default=True,
    help="seconds of load and faults",
)
@click.option("--seed", type=int, default=None, help="the schedule's seed (default: random)")
@click.option(
    "--rate",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="orders per second, all threads together",
)
@click.option("--threads", type=click.IntRange(1, 32), default=3, show_default=True)
@click.option(
    "--allow-broker-restart",
    is_flag=True,
    help="restart RabbitMQ once (runs of 300s or more; every broker user feels it)",
)
@click.option("--drain-timeout", "drain_timeout_s", type=float, default=180, show_default=True)
@click.option(
    "--log-dir", type=click.Path(file_okay=False), default=None, help="default: ./artifacts/chaos"
)
@click.option("--keep", is_flag=True, help="keep the sandbox database and vhost")
@click.option("--json", "as_json", is_flag=True)
def chaos(as_json: bool, **options: Any) -> None:
    """Run the system in a sandbox under load, kills and faults; check every invariant after."""
    from orchestrator.proof.chaos import command as chaos_mod

    report = chaos_mod.run(chaos_mod.Options(**options), say=lambda m: click.echo(m, err=True))
    if as_json:
        _print_json(report)
    else:
        click.echo(chaos_mod.render(report))
    sys.exit(0 if report["ok"] else 1)


@main.command()
@click.option("-n", "--count", "n", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--mode", type=click.Choice(["http", "direct"]), default="http", show_default=True,
              help="direct: place_order in-process from threads (no web)")
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="orders per second, paced (default: as fast as --concurrency allows)")
@click.option("--url", default=None, help="a running system (default: a fresh sandbox)")
@click.option("--warmup", type=click.IntRange(min=0), default=20, show_default=True)
@click.option("--timeout", "timeout_s", type=float, default=300, show_default=True)
@click.option("--raw/--no-raw", default=True, help="run the raw Celery baseline too")
@click.option("--floor", is_flag=True,
              help="also the floor baseline: 6 Celery tasks committing one row each")
@click.option("--idle-window", "idle_s", type=float, default=10, show_default=True,
              help="seconds idle to measure background commits")
@click.option("--profile", "profile_dir", type=click.Path(file_okay=False), default=None,
              help="py-spy each process during the saga phase into DIR")
@click.option("--profile-mode", type=click.Choice(["cpu", "wall"]), default="cpu",
              show_default=True, help="cpu: py-spy --gil; wall: py-spy --idle (waits included)")
@click.option("--keep-logs", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def bench(as_json: bool, **options: Any) -> None:
    """Saga throughput and latency against a raw Celery chain, in one run."""
    from orchestrator.proof.bench import command as bench_mod

    report = bench_mod.run(bench_mod.Options(**options), say=lambda m: click.echo(m, err=True))
    if as_json:
        _print_json(report)
    else:
        click.echo(bench_mod.render(report))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
