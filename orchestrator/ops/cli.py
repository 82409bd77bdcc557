"""``sagactl``: the one command line of the system (processes, database, operations, proof).

Settings are read when a command runs, never to show ``--help`` or ``--version``. Exit codes (the
contract's): 0 ok, 1 a breach or a failed run, 2 bad usage or bad input (configuration included),
3 a database or broker that cannot be reached.
"""

from __future__ import annotations

import functools
import getpass
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import click

from orchestrator.ops.config import ConfigError, settings

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
PACKAGE = "saga-orchestrator"
F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int = EXIT_USAGE) -> None:
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
        cfg.process or process,
        cfg.metrics_dir,
        enabled=always or cfg.metrics_port is not None,
    )


def _lost_connection(exc: BaseException) -> str | None:
    """Which service a connection error midway through a command is about, if it is one."""
    import kombu.exceptions
    import psycopg
    import sqlalchemy.exc

    if isinstance(exc, sqlalchemy.exc.OperationalError | psycopg.OperationalError):
        return "database"
    if isinstance(exc, kombu.exceptions.OperationalError | ConnectionError):
        return "broker"
    return None


class SagaGroup(click.Group):
    """Maps the errors every command can meet to the contract's exit codes, in one place."""

    def invoke(self, ctx: click.Context) -> Any:
        from orchestrator.ops.reach import Unreachable, broker_url_shown, database_url_shown

        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            _fail(str(exc), EXIT_USAGE)
        except Unreachable as exc:
            _fail(str(exc), EXIT_UNREACHABLE)
        except Exception as exc:
            service = _lost_connection(exc)
            if service is None:
                raise
            cfg = settings()
            url = (
                database_url_shown(cfg.database_url)
                if service == "database"
                else broker_url_shown(cfg.broker_url)
            )
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            _fail(f"lost the {service} at {url}: {first}", EXIT_UNREACHABLE)


def require(*services: str, sandbox: bool = False) -> None:
    """Exit 3 unless each of ``services`` answers: ``database``, ``database-server`` (the server
    alone, for a database about to be created) and ``broker``. ``sandbox``: the servers that
    sandboxes are made on (bench, chaos), not the configured database and vhost."""
    from orchestrator.ops import reach

    cfg = settings()
    db_url = cfg.sandbox_database_url if sandbox else cfg.database_url
    if "database" in services or "database-server" in services:
        reach.require_database(db_url, server_only=sandbox or "database-server" in services)
    if "broker" in services:
        reach.require_broker(cfg.sandbox_broker_url if sandbox else cfg.broker_url)


def needs(*services: str, sandbox: bool = False) -> Callable[[F], F]:
    """``require(*services)`` before the command runs; a command that works on this system's
    database or broker (not a sandbox's, not a server about to get a database) is wired first."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> Any:
            require(*services, sandbox=sandbox)
            if not sandbox and {"database", "broker"} & set(services):
                _bootstrap()
            return fn(*args, **kwargs)

        return checked  # type: ignore[return-value]

    return wrap


@click.group(cls=SagaGroup)
@click.version_option(package_name=PACKAGE, prog_name="sagactl")
def main() -> None:
    """Run and operate the saga orchestrator."""


# ---------------------------------------------------------------- database


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@needs("database-server")
def db_upgrade(revision: str) -> None:
    """Create the database if missing, then apply the Alembic migrations."""
    from orchestrator.ops import database

    database.upgrade(revision=revision)
    click.echo(f"database at {revision}")


@main.command()
@needs("database")
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
@needs("database")
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
@click.option("--host", default=None, help="address to bind (default: $SAGA_WEB_HOST or 127.0.0.1)")
@click.option("--dev", is_flag=True, help="the Flask development server instead of gunicorn")
def web(port: int | None, host: str | None, dev: bool) -> None:
    """The Flask app under gunicorn."""
    from orchestrator.ops.processes import gunicorn_argv

    os.environ.setdefault("SAGA_PROCESS", "web")
    _prepare_metrics("web", always=not dev)  # its own /metrics serves them
    _bootstrap()
    cfg = settings()
    port, host = port or cfg.port, host or cfg.web_host
    from web import create_app

    if dev:
        from orchestrator.messaging import fastpath

        fastpath.publish_in_background()  # as gunicorn's workers do (web/serving.py)
        create_app().run(host=host, port=port, debug=False, threaded=True)
        return
    create_app()  # fail fast (e.g. production without secrets) before forking workers
    argv = gunicorn_argv(host, port, cfg.web_workers, cfg.web_threads)
    os.execvp(argv[0], argv)


class WorkerName(click.ParamType):
    """``orchestrator`` or a service of the registry (read when the argument is parsed)."""

    name = "worker"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from orchestrator import registry

        try:  # no lock check here: the worker itself does that
            known = registry.build().worker_names
        except (ImportError, registry.RegistryError) as exc:
            self.fail(f"the saga registry cannot be built: {exc}", param, ctx)
        if value not in known:
            self.fail(f"unknown worker {value!r}; the registry knows {', '.join(known)}", param, ctx)
        return str(value)


def _build_registry() -> Any:
    """The registry without the lock check (for listing and locking), or exit 1 saying why."""
    from orchestrator import registry

    try:
        return registry.build()
    except (ImportError, registry.RegistryError) as exc:
        _fail(f"the saga registry cannot be built: {exc}", code=1)


def _bootstrap(worker: str | None = None) -> Any:
    """Wire this process (orchestrator/bootstrap.py); a released definition that changed, or a
    registry that cannot be built, stops it here. Returns the Celery app."""
    from orchestrator import bootstrap, registry
    from orchestrator.kernel.versions import DefinitionChanged

    try:
        return bootstrap.worker_app(worker) if worker else bootstrap.bootstrap()
    except (DefinitionChanged, registry.RegistryError, ImportError) as exc:
        _fail(f"the saga registry is not valid: {exc}", code=1)


@main.command()
@click.argument("name", type=WorkerName())
@click.option("--concurrency", type=int, default=None, help="default: $SAGA_WORKER_CONCURRENCY")
@click.option("--pool", default=None, help="default: prefork (processes.WORKER_POOL)")
def worker(name: str, concurrency: int | None, pool: str | None) -> None:
    """A Celery worker consuming exactly its service's queue (orchestrator, or a service)."""
    from orchestrator.ops.processes import celery_worker_args, yield_cpu_to_the_web

    os.environ.setdefault("SAGA_PROCESS", name)
    yield_cpu_to_the_web()
    _prepare_metrics(name)
    app = _bootstrap(worker=name)
    args = celery_worker_args(
        name, concurrency or settings().worker_concurrency, pool, settings().worker_node
    )
    sys.exit(app.start(args))


@main.command()
def relay() -> None:
    """Publish committed outbox rows, with publisher confirms."""
    os.environ.setdefault("SAGA_PROCESS", "relay")
    _prepare_metrics("relay")
    from orchestrator.messaging.outbox import run_relay
    from orchestrator.messaging.topology import service_queue_names
    from orchestrator.ops import process_metrics
    from orchestrator.ops.logs import setup_logging
    from orchestrator.ops.processes import yield_cpu_to_the_web

    yield_cpu_to_the_web()

    _bootstrap()
    setup_logging("relay")
    cfg = settings()
    # The relay's endpoint also answers for the broker's queues (consumers, depth).
    queues = process_metrics.QueueCollector(cfg.broker_url, service_queue_names())
    process_metrics.serve(cfg.metrics_port, cfg.metrics_addr, extra=queues)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run_relay(stop)


@main.command()
def beat() -> None:
    """Celery beat: schedules the sweep (deadlines and unsent outbox rows)."""
    from orchestrator.ops.processes import yield_cpu_to_the_web

    os.environ.setdefault("SAGA_PROCESS", "beat")
    yield_cpu_to_the_web()
    _prepare_metrics("beat")
    app = _bootstrap()
    cfg = settings()
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    schedule = str(cfg.beat_schedule or cfg.state_dir / f"beat-schedule-{os.getpid()}")
    sys.exit(app.start(["beat", "--schedule", schedule, "--loglevel", "INFO"]))


def _scale_option(value: str | None) -> dict[str, int]:
    from orchestrator.ops.processes import ScaleError, parse_scale

    try:
        return parse_scale(value)
    except ScaleError as exc:
        raise click.BadParameter(str(exc), param_hint="--scale") from exc


SCALE_HELP = "several instances, e.g. orchestrator=2,inventory=2,payment=2,orders=2,relay=2,beat=2"


@main.command()
@click.option("--nodes", type=click.IntRange(1, 9), default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the cluster as one JSON object")
def cluster(nodes: int, as_json: bool) -> None:
    """A local RabbitMQ cluster on loopback (never the machine's own node); Ctrl-C removes it."""
    from orchestrator.ops.cluster import Cluster, ClusterError

    say = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        local = Cluster.create(nodes, say=say)
    except ClusterError as exc:
        _fail(str(exc), code=3)
    try:
        if as_json:
            _print_json({"broker_url": local.broker_url, "queue_replicas": nodes,
                         "nodes": [{"name": n.name, "port": n.port} for n in local.nodes],
                         "folder": str(local.root)})  # fmt: skip
        else:
            click.echo(f"BROKER_URL='{local.broker_url}'")
            click.echo(f"SAGA_QUEUE_REPLICAS={nodes}")
            click.echo("Ctrl-C stops the nodes and removes their folder.")
        sys.stdout.flush()
        stop.wait()
    finally:
        local.stop()


@main.command()
@click.option("--port", type=int, default=None, help="default: $PORT or 8000")
@click.option(
    "--broker-nodes",
    type=click.IntRange(0, 9),
    default=0,
    help="start a RabbitMQ cluster of N nodes of its own (sagactl cluster) and use it",
)
@click.option("--scale", "scale_text", default=None, help=SCALE_HELP)
def run(port: int | None, broker_nodes: int, scale_text: str | None) -> None:
    """Every process of the system on this machine; Ctrl-C stops them all."""
    from orchestrator.ops.processes import Supervisor, instance_names, metrics_ports

    scale = _scale_option(scale_text)
    cfg = settings()
    _bootstrap()
    names = instance_names(scale)
    port = port or cfg.port
    env = {**os.environ, "PORT": str(port)}
    local = None
    if broker_nodes:
        from orchestrator.ops.cluster import Cluster

        local = Cluster.create(broker_nodes, say=click.echo)
        env.update(BROKER_URL=local.broker_url, SAGA_QUEUE_REPLICAS=str(broker_nodes))
        click.echo(f"BROKER_URL='{local.broker_url}'")

    def ready() -> None:
        from orchestrator.ops.processes import wait_for_http

        if not wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout_s=120):
            click.echo("warning: the web did not answer /healthz within 120 s", err=True)
        click.echo(f"\nSaga shop:      http://127.0.0.1:{port}/")
        click.echo(f"Admin console:  http://127.0.0.1:{port}/admin")
        if not cfg.production:
            password = cfg.admin_password.get_secret_value()
            click.echo(f"Admin login:    {cfg.admin_user} / {password}")
        for name, metrics_port in metrics_ports(names, env.get("SAGA_METRICS_PORT")).items():
            click.echo(f"Metrics:        {name:<13} http://127.0.0.1:{metrics_port}/metrics")
        click.echo("Ctrl-C stops everything.\n")

    sup = Supervisor.for_names(names, env, port, say=click.echo)
    try:
        code = sup.run(on_ready=ready)
    finally:
        if local is not None:
            local.stop()
    sys.exit(code)


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
        sys.exit(EXIT_FAILED)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@needs("database")
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
    sys.exit(0 if report.ok else EXIT_FAILED)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--lock", is_flag=True, help="record the fingerprints of new versions")
def definitions(as_json: bool, lock: bool) -> None:
    """Each saga definition and version: its fingerprint, its lock state, sagas in flight."""
    from orchestrator.ops import definitions as defs

    if lock:
        from orchestrator.kernel import versions

        added = versions.lock_new(_build_registry().definitions.values())
        click.echo(f"locked: {', '.join(added)}" if added else "nothing new to lock")
        return
    from sqlalchemy.exc import OperationalError

    try:
        rows = defs.listing(_build_registry())
    except OperationalError as exc:
        _fail(f"the database cannot be reached: {exc.orig}", code=3)
    if as_json:
        _print_json({"definitions": rows})
        return
    for r in rows:
        click.echo(
            f"{r['name']:<16} v{r['version']:<3} {(r['fingerprint'] or '-')[:16]:<16}  "
            f"{r['lock']:<9} "
            f"{r['steps']} steps, {r['in_flight']} in flight"
        )
    if any(r["lock"] != "locked" for r in rows):
        sys.exit(1)


@main.group()
def service() -> None:
    """Participant services: list, pause, resume (as /admin/services)."""


@service.command("list")
@click.option("--json", "as_json", is_flag=True)
@needs("database")
def service_list(as_json: bool) -> None:
    from models.db import transaction
    from orchestrator.kernel import service_states

    with transaction() as session:
        views = service_states.overview(session)
    rows: list[dict[str, Any]] = [
        {
            "service": v.service,
            "state": v.state,
            "since": v.since.isoformat() if v.since else None,
            "by": v.by,
            "note": v.note,
            "hold_compensations": v.hold_compensations,
            "held": v.held,
            "calls": v.calls,
            "failure_rate": v.failure_rate,
        }
        for v in views
    ]
    if as_json:
        _print_json({"services": rows})
        return
    for r in rows:
        since = f" since {r['since'][:19]} by {r['by']}" if r["since"] else ""
        click.echo(
            f"{r['service']:<12} {r['state']:<13} held {r['held']:>5}  "
            f"failures {r['failure_rate'] * 100:5.1f}% of {r['calls']}{since}"
        )


def _service_act(verb: str, name: str, note: str | None, hold_compensations: bool,
                 as_json: bool) -> None:
    from models.db import transaction
    from orchestrator.kernel import service_states

    actor = getpass.getuser() or "cli"
    try:
        with transaction() as session:
            if verb == "pause":
                service_states.pause(session, name, actor, note, hold_compensations)
            else:
                service_states.resume(session, name, actor, note)
            state = service_states.state_of(session, name).state
    except service_states.UnknownService:
        _fail(f"no service {name!r}")
    except service_states.AlreadyInState as exc:
        _fail(str(exc), code=EXIT_FAILED)
    if verb == "resume":
        service_states.kick(name)
    if as_json:
        _print_json({"service": name, "state": state})
    else:
        click.echo(f"{name} {state}")


@service.command("pause")
@click.argument("name")
@click.option("--note", default=None)
@click.option("--let-compensations-through", "let_through", is_flag=True,
              help="hold actions only (compensations still go through)")
@click.option("--json", "as_json", is_flag=True)
@needs("database")
def service_pause(name: str, note: str | None, let_through: bool, as_json: bool) -> None:
    """Hold every command to NAME until it resumes."""
    _service_act("pause", name, note, not let_through, as_json)


@service.command("resume")
@click.argument("name")
@click.option("--note", default=None)
@click.option("--json", "as_json", is_flag=True)
@needs("database", "broker")
def service_resume(name: str, note: str | None, as_json: bool) -> None:
    """Release NAME's held commands at SAGA_RESUME_RATE."""
    _service_act("resume", name, note, True, as_json)


@main.group()
def dlq() -> None:
    """Dead letters: list, replay, discard."""


@dlq.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.option("--all", "show_all", is_flag=True, help="include replayed and discarded")
@needs("database")
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
        act(letter_id, getpass.getuser() or "cli")
    except deadletters.DeadLetterNotFound:
        _fail(f"no dead letter {letter_id}")
    except deadletters.DeadLetterResolved as exc:
        _fail(str(exc), code=EXIT_FAILED)
    click.echo(
        f"dead letter {letter_id} {verb}ed"
        if verb == "replay"
        else f"dead letter {letter_id} discarded"
    )


@dlq.command("replay")
@click.argument("letter_id", type=int)
@needs("database", "broker")
def dlq_replay(letter_id: int) -> None:
    """Publish the original message to its queue again."""
    _dlq_act("replay", letter_id)


@dlq.command("discard")
@click.argument("letter_id", type=int)
@needs("database")
def dlq_discard(letter_id: int) -> None:
    """Mark a dead letter discarded."""
    _dlq_act("discard", letter_id)


@main.command()
@click.option("--older-than", "days", type=click.FloatRange(min=0), required=True, help="days")
@click.option("--json", "as_json", is_flag=True)
@needs("database")
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
    help="restart a RabbitMQ node of the run's own once (runs of 300s or more; without "
    "--broker-nodes the run starts one node of its own)",
)
@click.option("--drain-timeout", "drain_timeout_s", type=float, default=180, show_default=True)
@click.option(
    "--log-dir", type=click.Path(file_okay=False), default=None, help="default: ./artifacts/chaos"
)
@click.option("--keep", is_flag=True, help="keep the sandbox database and vhost")
@click.option(
    "--broker-nodes",
    type=click.IntRange(0, 9),
    default=0,
    help="run on a RabbitMQ cluster of N nodes of its own; 3 or more adds node kills and pauses",
)
@click.option("--scale", default=None, help=SCALE_HELP)
@click.option(
    "--allow-db-restart",
    is_flag=True,
    help="run on a PostgreSQL of its own (initdb on another port) and restart it once",
)
@click.option("--json", "as_json", is_flag=True)
@needs("database", "broker", sandbox=True)
def chaos(as_json: bool, **options: Any) -> None:
    """Run the system in a sandbox under load, kills and faults; check every invariant after."""
    from orchestrator.proof.chaos import command as chaos_mod

    _scale_option(options["scale"])

    report = chaos_mod.run(chaos_mod.Options(**options), say=lambda m: click.echo(m, err=True))
    if as_json:
        _print_json(report)
    else:
        click.echo(chaos_mod.render(report))
    sys.exit(0 if report["ok"] else EXIT_FAILED)


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
@click.option("--post-seconds", "post_s", type=click.FloatRange(min=0), default=10,
              show_default=True,
              help="http: seconds of POST /orders at half the saturation rate, then at 100/s "
                   "(0: skip)")
@click.option("--keep-logs", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def bench(as_json: bool, **options: Any) -> None:
    """Saga throughput and latency against a raw Celery chain, in one run."""
    from orchestrator.proof.bench import command as bench_mod

    require("database", "broker", sandbox=options["url"] is None)
    report = bench_mod.run(bench_mod.Options(**options), say=lambda m: click.echo(m, err=True))
    if as_json:
        _print_json(report)
    else:
        click.echo(bench_mod.render(report))
    sys.exit(0 if report["ok"] else EXIT_FAILED)


if __name__ == "__main__":
    main()
