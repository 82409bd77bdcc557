"""``sagactl bench``: saga throughput and latency against a raw Celery chain, in one run.

Places N orders (HTTP, or ``place_order`` in-process) at a fixed concurrency or a paced rate, waits
until every saga is final, then runs the same N through the raw baseline (orchestrator.bench_raw).
Besides time it counts what each saga costs: broker messages, database commits, CPU seconds.
See docs/benchmarks.md for the method and the figures.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
import requests
import sqlalchemy as sa

from orchestrator.config import settings

FINAL_STATES = ["completed", "compensated", "failed"]
FINAL_EVENTS = ["saga.completed", "saga.compensated", "saga.failed"]
# One participant reply each (runs without dead letters or timeouts; the bench checks for those).
REPLY_EVENTS = ["step.succeeded", "step.failed", "compensation.succeeded", "compensation.failed"]
# PostgreSQL 15 flushes an idle backend's counters to pg_stat_database within 10 s.
STATS_FLUSH_S = 11.0
# The bench measures the system as shipped: no injected faults, default retry timings.
DEFAULTED_ENV = ("SAGA_FAULT_INJECTION", "SAGA_RETRY_ATTEMPTS", "SAGA_RETRY_BASE_S",
                 "SAGA_RETRY_MAX_S", "SAGA_COMPENSATION_ATTEMPTS", "SAGA_STEP_TIMEOUT_S",
                 "SAGA_DEADLINE_S", "SAGA_SWEEP_S")
PRODUCTS = 8  # orders spread over several rows, so stock row locks are not the bottleneck
PROFILED = ("web", "orchestrator", "relay", "inventory", "payment", "orders")


@dataclass(frozen=True)
class Options:
    n: int = 500
    mode: str = "http"  # or "direct"
    concurrency: int = 8
    rate: float | None = None  # orders per second (paced); None = as fast as `concurrency` allows
    url: str | None = None  # a running system; None = a fresh sandbox of our own
    warmup: int = 20
    timeout_s: float = 300.0
    raw: bool = True
    idle_s: float = 10.0  # the window that measures background commits
    profile_dir: str | None = None  # py-spy output, one file per process
    # cpu: py-spy --gil (only threads holding the GIL: Python code running);
    # wall: py-spy --idle (every sample, waits on the database and the broker included).
    profile_mode: str = "cpu"
    keep_logs: bool = False


Say = Callable[[str], None]


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


# ---------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: a p99 is a latency that really happened)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def latency_ms(values_s: list[float], prefix: str = "") -> dict[str, float]:
    if not values_s:
        return {}
    ms = [v * 1000 for v in values_s]
    return {f"{prefix}p50_ms": round(percentile(ms, 50), 1),
            f"{prefix}p95_ms": round(percentile(ms, 95), 1),
            f"{prefix}p99_ms": round(percentile(ms, 99), 1),
            f"{prefix}max_ms": round(max(ms), 1)}


# ---------------------------------------------------------------- driving the load


@dataclass
class Placed:
    key: str
    due: float  # wall clock: when it was meant to start (paced) or started (closed loop)
    started: float
    accepted: float


@dataclass
class Drive:
    """Places N items, closed-loop at `concurrency` or paced at `rate`; records each one."""

    n: int
    concurrency: int
    rate: float | None
    placed: list[Placed] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _one(self, place: Callable[[int], str], i: int, due: float | None) -> None:
        if self.stop.is_set():
            return
        started = time.time()
        try:
            key = place(i)
        except Exception as exc:  # counted and shown: a refused order fails the bench
            with self._lock:
                self.errors.append(f"{type(exc).__name__}: {exc}"[:300])
            return
        with self._lock:
            self.placed.append(Placed(key, due or started, started, time.time()))

    def run(self, place: Callable[[int], str]) -> None:
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="bench") as pool:
            if self.rate is None:
                counter = itertools.count()
                lock = threading.Lock()

                def loop() -> None:
                    while not self.stop.is_set():
                        with lock:
                            i = next(counter)
                        if i >= self.n:
                            return
                        self._one(place, i, None)

                for _ in range(self.concurrency):
                    pool.submit(loop)
                return
            t0 = time.time() + 0.05
            for i in range(self.n):
                due = t0 + i / self.rate
                delay = due - time.time()
                if delay > 0:
                    self.stop.wait(delay)
                if self.stop.is_set():
                    return
                pool.submit(self._one, place, i, due)


class Progress:
    """A line on stderr every second while a phase runs."""

    def __init__(self, label: str, status: Callable[[], str], say: Say) -> None:
        self._label, self._status, self._say = label, status, say
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._say(f"[{self._label}] {self._status()}")

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._say(f"[{self._label}] {self._status()}")


# ---------------------------------------------------------------- the database side


class Db:
    """One autocommit connection for polling and counters; counts its own transactions."""

    def __init__(self, database_url: str) -> None:
        url = sa.make_url(database_url).set(drivername="postgresql")
        self.conn = psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)
        self.own = 0

    def rows(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        self.own += 1
        return list(self.conn.execute(query, params).fetchall())

    def counters(self) -> tuple[dict[str, int], float]:
        """This database's commit and row counters (as flushed by the backends so far)."""
        cols = ("xact_commit", "tup_inserted", "tup_updated", "tup_deleted")
        row = self.rows(f"SELECT {', '.join(cols)} FROM pg_stat_database "
                        "WHERE datname = current_database()")[0]
        return dict(zip(cols, map(int, row), strict=True)), time.time()

    def final(self, ids: list[str]) -> set[str]:
        found = self.rows("SELECT id::text FROM sagas WHERE id = ANY(%s::uuid[]) "
                          "AND state::text = ANY(%s)", (ids, FINAL_STATES))
        return {r[0] for r in found}

    def backend_pids(self) -> list[int]:
        return [r[0] for r in self.rows(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()")]

    def close(self) -> None:
        self.conn.close()


def make_products(stock: int) -> list[str]:
    """Bench products of this run's own (random SKUs), each with enough stock for every order."""
    from models.catalog import Product
    from models.db import transaction

    skus = [f"SKU-BENCH-{uuid.uuid4().hex[:8].upper()}" for _ in range(PRODUCTS)]
    with transaction() as session:
        session.add_all(Product(sku=sku, name=f"bench {sku}", price_cents=100, available=stock,
                                reserved=0, sold=0, stock_total=stock) for sku in skus)
    return skus


# ---------------------------------------------------------------- CPU


def _tree_cpu(pid: int) -> float:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _pids_cpu(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
    return out


def _rabbit_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "beam.smp"]


@dataclass
class CpuMeter:
    """CPU seconds (user + system) of each named process tree, plus PostgreSQL and RabbitMQ."""

    trees: dict[str, int]
    db: Db | None
    _start: dict[str, Any] = field(default_factory=dict)

    def _sample(self) -> dict[str, Any]:
        own = psutil.Process().cpu_times()
        return {"trees": {name: _tree_cpu(pid) for name, pid in self.trees.items()},
                "bench": own.user + own.system,
                "postgres": _pids_cpu(self.db.backend_pids()) if self.db else {},
                "rabbitmq": _pids_cpu(_rabbit_pids())}

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        end, start = self._sample(), self._start
        out = {name: end["trees"][name] - start["trees"].get(name, 0.0) for name in self.trees}
        out["bench (this process)"] = end["bench"] - start["bench"]
        for key, label in (("postgres", "postgres (sandbox backends)"),
                           ("rabbitmq", "rabbitmq (whole server, shared)")):
            out[label] = sum(v - start[key].get(pid, 0.0) for pid, v in end[key].items())
        return {k: round(v, 2) for k, v in out.items()}


# ---------------------------------------------------------------- the system under test


@dataclass
class Target:
    url: str
    database_url: str
    broker_url: str
    pids: dict[str, int]
    log_dir: Path
    sandbox: str | None = None  # the database and vhost name, when the bench made them


@contextlib.contextmanager
def sandboxed(log_dir: Path, say: Say) -> Iterator[Target]:
    """A fresh sandbox with every process of the contract, torn down on the way out."""
    from orchestrator.harness import Processes, Sandbox, use_sandbox

    say("creating a sandbox (database, vhost, migrations)…")
    box = Sandbox.create("sagabench")
    procs = Processes(box, log_dir)
    try:
        use_sandbox(box)
        say(f"starting the processes (logs in {log_dir})…")
        procs.start_all()
        yield Target(procs.url, box.database_url, box.broker_url,
                     {name: r.proc.pid for name, r in procs.running.items()}, log_dir, box.name)
    finally:
        say("stopping the processes and removing the sandbox…")
        procs.stop_all()
        from models.db import get_engine

        get_engine().dispose()
        box.destroy()


@contextlib.contextmanager
def running_system(url: str, log_dir: Path) -> Iterator[Target]:
    cfg = settings()
    yield Target(url.rstrip("/"), cfg.database_url, cfg.broker_url, {}, log_dir)


def _vhost_url(broker_url: str, vhost: str) -> str:
    scheme, rest = broker_url.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}/{vhost}"


@contextlib.contextmanager
def raw_baseline(target: Target, say: Say) -> Iterator[Any]:
    """A vhost of its own on the same broker, and the baseline's three workers."""
    from orchestrator.bench_raw import RawBaseline
    from orchestrator.harness import _rabbitmqctl

    vhost = f"{target.sandbox or 'sagabench_' + uuid.uuid4().hex[:8]}_raw"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    baseline = RawBaseline(_vhost_url(target.broker_url, vhost), target.log_dir,
                           settings().worker_concurrency, vhost)
    try:
        say("starting the raw baseline's workers…")
        baseline.start()
        yield baseline
    finally:
        baseline.stop()
        _rabbitmqctl("delete_vhost", vhost)


# ---------------------------------------------------------------- one phase each


def _order_body(i: int, skus: list[str]) -> dict[str, Any]:
    return {"customer_id": f"bench-{i}", "items": [{"sku": skus[i % len(skus)], "quantity": 1}],
            "payment": {"card_token": "tok_visa"}}


def saga_placer(mode: str, url: str, skus: list[str]) -> Callable[[int], str]:
    if mode == "direct":
        from orchestrator import engine, ordering

        def place_direct(i: int) -> str:
            new = engine.NewOrder(customer_id=f"bench-{i}", items=[(skus[i % len(skus)], 1)],
                                  card_token="tok_visa")
            return str(ordering.place_order(new).saga_id)

        return place_direct
    local = threading.local()

    def place_http(i: int) -> str:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        r = local.session.post(f"{url}/orders", json=_order_body(i, skus), timeout=30)
        if r.status_code != 202:
            raise RuntimeError(f"POST /orders {r.status_code}: {r.text[:200]}")
        return str(r.json()["saga_id"])

    return place_http


def run_sagas(opts: Options, n: int, db: Db, place: Callable[[int], str], say: Say,
              label: str = "saga") -> dict[str, Any]:
    """Place n orders, wait until every saga is final; latencies from the database's clock."""
    drive = Drive(n, opts.concurrency, opts.rate)
    final: set[str] = set()
    with Progress(label, lambda: f"placed {len(drive.placed)}/{n}, final {len(final)}/{n}"
                  + (f", errors {len(drive.errors)}" if drive.errors else ""), say):
        placer = threading.Thread(target=drive.run, args=(place,), name="placer")
        placer.start()
        deadline = time.monotonic() + opts.timeout_s
        try:
            while time.monotonic() < deadline:
                placed = [p.key for p in list(drive.placed)]
                pending = [k for k in placed if k not in final]
                if pending:
                    final |= db.final(pending)
                if not placer.is_alive() and len(final) >= len(drive.placed):
                    break
                time.sleep(0.25)
        finally:
            drive.stop.set()
            placer.join()
    ids = [p.key for p in drive.placed]
    return {"drive": drive, "ids": ids, "all_final": len(final) == len(ids) == n}


def saga_figures(db: Db, phase: dict[str, Any], mode: str) -> dict[str, Any]:
    drive: Drive = phase["drive"]
    ids = phase["ids"]
    ends = dict(db.rows("SELECT saga_id::text, extract(epoch FROM at)::float8 FROM saga_events "
                        "WHERE saga_id = ANY(%s::uuid[]) AND event = ANY(%s)", (ids, FINAL_EVENTS)))
    states = Counter(r[0] for r in db.rows(
        "SELECT state::text FROM sagas WHERE id = ANY(%s::uuid[])", (ids,)))
    figures = _timing(drive, ends)
    figures["outcomes"] = dict(states)
    figures["hops_ms"] = hops(db, ids)
    if mode == "http":
        figures.update(latency_ms([p.accepted - p.due for p in drive.placed], prefix="post_"))
    return figures


def hops(db: Db, ids: list[str]) -> dict[str, dict[str, float]]:
    """Where a command's time goes: waiting for the relay, then the round trip to its reply.

    ``created_at`` and ``sent_at`` are now() of the writing and the relaying transactions (their
    start), the event time is the orchestrator's clock_timestamp() when it applied the reply.
    """
    found = db.rows(
        "SELECT extract(epoch FROM o.sent_at - o.created_at)::float8, "
        "extract(epoch FROM e.at - o.sent_at)::float8 FROM outbox o JOIN saga_events e "
        "ON e.saga_id = o.saga_id AND e.step = o.task AND e.event = 'step.succeeded' "
        "WHERE o.saga_id = ANY(%s::uuid[]) AND o.sent_at IS NOT NULL", (ids,))
    return {"relay_pickup": latency_ms([r[0] for r in found]),
            "sent_to_reply_applied": latency_ms([r[1] for r in found])}


def _timing(drive: Drive, ends: dict[str, float]) -> dict[str, Any]:
    done = [p for p in drive.placed if p.key in ends]
    first = min((p.started for p in drive.placed), default=0.0)
    last = max(ends.values(), default=first)
    elapsed = max(last - first, 1e-9)
    return {"n": drive.n, "completed": len(done), "errors": len(drive.errors),
            "error_sample": drive.errors[:3], "elapsed_s": round(elapsed, 2),
            "sagas_per_s": round(len(done) / elapsed, 1),
            **latency_ms([ends[p.key] - p.accepted for p in done])}


def run_raw(opts: Options, n: int, baseline: Any, say: Say, label: str = "raw") -> dict[str, Any]:
    drive = Drive(n, opts.concurrency, opts.rate)

    def place(i: int) -> str:
        key = uuid.uuid4().hex
        baseline.place(key)
        return key

    with Progress(label, lambda: f"placed {len(drive.placed)}/{n}, "
                  f"done {len(baseline.done)}/{n}", say):
        placer = threading.Thread(target=drive.run, args=(place,), name="placer")
        placer.start()
        deadline = time.monotonic() + opts.timeout_s
        try:
            while time.monotonic() < deadline:
                if not placer.is_alive() and all(p.key in baseline.done for p in drive.placed):
                    break
                time.sleep(0.1)
        finally:
            drive.stop.set()
            placer.join()
    ends = {p.key: baseline.done[p.key] for p in drive.placed if p.key in baseline.done}
    baseline.done.clear()
    figures = _timing(drive, ends)
    figures["all_final"] = len(ends) == n
    return figures


# ---------------------------------------------------------------- messages


def management_publishes(broker_url: str) -> int | None:
    """Messages published into the vhost, from the management API when it is enabled."""
    from urllib.parse import quote, urlsplit

    parts = urlsplit(broker_url)
    vhost = parts.path.lstrip("/") or "/"
    api = os.environ.get("SAGA_RABBITMQ_API", f"http://{parts.hostname or '127.0.0.1'}:15672")
    try:
        r = requests.get(f"{api}/api/vhosts/{quote(vhost, safe='')}", timeout=2,
                         auth=(parts.username or "guest", parts.password or "guest"))
    except requests.RequestException:
        return None
    if r.status_code != 200:
        return None
    return int(r.json().get("message_stats", {}).get("publish", 0))


def counted_messages(db: Db, ids: list[str]) -> dict[str, int]:
    """Commands published by the relay (outbox rows) and the participants' replies."""
    commands = db.rows("SELECT count(*) FROM outbox WHERE saga_id = ANY(%s::uuid[])", (ids,))
    replies = db.rows("SELECT count(*) FROM saga_events WHERE saga_id = ANY(%s::uuid[]) "
                      "AND event = ANY(%s)", (ids, REPLY_EVENTS))
    return {"commands": int(commands[0][0]), "replies": int(replies[0][0])}


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
    for name in PROFILED:
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


# ---------------------------------------------------------------- the whole run


def machine(db: Db) -> dict[str, Any]:
    import celery
    import kombu

    server = db.rows("SHOW server_version")[0][0]
    try:  # which code was measured (a checkout; an installed package has no git)
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"code": commit or None, "nproc": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "celery": celery.__version__,
            "kombu": kombu.__version__, "sqlalchemy": sa.__version__,
            "psycopg": psycopg.__version__, "postgresql": server}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def run(opts: Options, say: Say = _stderr) -> dict[str, Any]:
    """The whole benchmark; returns the report (see docs/benchmarks.md for every field)."""
    for name in DEFAULTED_ENV:
        os.environ.pop(name, None)
    settings.cache_clear()
    log_dir = Path(tempfile.mkdtemp(prefix="sagabench-"))
    # SIGTERM cleans up as Ctrl-C does: the sandbox and the vhosts are removed on the way out.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with contextlib.ExitStack() as stack:
            target = stack.enter_context(
                running_system(opts.url, log_dir) if opts.url else sandboxed(log_dir, say))
            if opts.url:
                _point_at(target.database_url)
            db = Db(target.database_url)
            stack.callback(db.close)
            baseline = stack.enter_context(raw_baseline(target, say)) if opts.raw else None
            return _measure(opts, target, db, baseline, say)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not opts.keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _point_at(database_url: str) -> None:
    from models import db

    os.environ["DATABASE_URL"] = database_url
    settings.cache_clear()
    db.get_engine.cache_clear()
    db._factory.cache_clear()


def _measure(opts: Options, target: Target, db: Db, baseline: Any, say: Say) -> dict[str, Any]:
    skus = make_products(stock=opts.n + opts.warmup)
    place = saga_placer(opts.mode, target.url, skus)
    if opts.warmup:
        warm = run_sagas(opts, opts.warmup, db, place, say, label="saga warm-up")
        if not warm["all_final"]:
            raise RuntimeError("warm-up sagas did not finish; see the logs in "
                               f"{target.log_dir} (--keep-logs keeps them)")
        if baseline is not None:
            run_raw(opts, opts.warmup, baseline, say, label="raw warm-up")
    say(f"letting the database's counters settle ({STATS_FLUSH_S:.0f}s)…")
    time.sleep(STATS_FLUSH_S)
    own0 = db.own
    c0, t0 = db.counters()
    pub0 = management_publishes(target.broker_url)
    load_saga = _load()
    cpu = CpuMeter(target.pids, db)
    cpu.start()
    with profiling(opts, target.pids, say):
        phase = run_sagas(opts, opts.n, db, place, say)
    saga_end = time.time()
    saga_cpu = cpu.stop()
    own_run = db.own - own0
    raw_fig: dict[str, Any] | None = None
    if baseline is not None:
        load_raw = _load()
        raw_cpu = CpuMeter(baseline.pids(), None)
        raw_cpu.start()
        raw_fig = run_raw(opts, opts.n, baseline, say)
        raw_fig.update(cpu_s=raw_cpu.stop(), load_before=load_raw,
                       messages_per_chain="4 (3 task messages + 1 completion probe)")
    say(f"letting the database's counters settle ({STATS_FLUSH_S:.0f}s), then "
        f"{opts.idle_s:.0f}s idle to measure background commits…")
    time.sleep(max(0.0, saga_end + STATS_FLUSH_S - time.time()))
    c1, t1 = db.counters()
    pub1 = management_publishes(target.broker_url)
    time.sleep(opts.idle_s)
    c2, t2 = db.counters()
    pub2 = management_publishes(target.broker_url)
    # The reading itself is one of the idle window's transactions.
    background_per_s = max(0.0, (c2["xact_commit"] - c1["xact_commit"] - 1) / (t2 - t1))
    saga = saga_figures(db, phase, opts.mode)
    saga.update(cpu_s=saga_cpu, load_before=load_saga)
    n_done = max(1, saga["completed"])
    gross = c1["xact_commit"] - c0["xact_commit"]
    rows = {k.removeprefix("tup_"): round((c1[k] - c0[k]) / n_done, 1)
            for k in ("tup_inserted", "tup_updated", "tup_deleted")}
    background = background_per_s * (t1 - t0)
    net = gross - background - own_run
    messages = counted_messages(db, phase["ids"])
    if pub0 is not None and pub1 is not None and pub2 is not None:
        pub_bg = (pub2 - pub1) / (t2 - t1) * (t1 - t0)
        messages_per_saga = (pub1 - pub0 - pub_bg) / n_done
        method = "management API: messages published into the saga vhost, less the background"
    else:
        messages_per_saga = (messages["commands"] + messages["replies"]) / n_done
        method = ("counted: outbox rows (commands the relay published) + participant replies "
                  "(reply events recorded); the sweep's message every SAGA_SWEEP_S not included")
    report: dict[str, Any] = {
        "n": opts.n, "mode": opts.mode, "concurrency": opts.concurrency, "rate": opts.rate,
        "target": opts.url or "sandbox",
        "sandbox": target.sandbox,
        "raw_vhost": getattr(baseline, "vhost", None),
        "log_dir": str(target.log_dir) if opts.keep_logs else None,
        "saga": saga,
        "raw": raw_fig,
        "ratio": _ratio(saga.get("sagas_per_s"), (raw_fig or {}).get("sagas_per_s")),
        "p99_ratio": _ratio(saga.get("p99_ms"), (raw_fig or {}).get("p99_ms")),
        "messages_per_saga": round(messages_per_saga, 2),
        "messages": {**messages, "method": method},
        "commits_per_saga": round(net / n_done, 2),
        "commits": {"gross": gross, "background": round(background, 1),
                    "background_per_s": round(background_per_s, 2), "bench_own": own_run,
                    "net": round(net, 1), "window_s": round(t1 - t0, 1)},
        "rows_per_saga": rows,
        "cpu_ms_per_saga": round(sum(saga_cpu.values()) * 1000 / n_done, 2),
        "cpu_scope": ("the bench, PostgreSQL and RabbitMQ only (a running system's processes are "
                      "not known to the bench)") if opts.url else "every process of the sandbox",
        "load_after": _load(),
        "machine": machine(db),
    }
    ok = phase["all_final"] and not saga["errors"] and (raw_fig is None or raw_fig["all_final"])
    report["ok"] = bool(ok and saga["outcomes"].get("completed") == opts.n)
    return report


# ---------------------------------------------------------------- for people


def render(report: dict[str, Any]) -> str:
    """The report as a short table."""
    saga, raw = report["saga"], report["raw"] or {}
    rows = [("", "saga", "raw chain")]
    for key, label in (("sagas_per_s", "per second"), ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"),
                       ("p99_ms", "p99 ms"), ("max_ms", "max ms"), ("completed", "completed"),
                       ("elapsed_s", "seconds")):
        rows.append((label, str(saga.get(key, "-")), str(raw.get(key, "-"))))
    lines = [f"{a:<12} {b:>10} {c:>10}" for a, b, c in rows]
    lines.append(f"ratio saga/raw: throughput {report['ratio']}, p99 {report['p99_ratio']}")
    if "post_p50_ms" in saga:
        lines.append(f"POST /orders: p50 {saga['post_p50_ms']} ms, p99 {saga['post_p99_ms']} ms")
    lines.append(f"messages per saga: {report['messages_per_saga']} "
                 f"({report['messages']['method']})")
    c = report["commits"]
    lines.append(f"commits per saga: {report['commits_per_saga']} (gross {c['gross']}, background "
                 f"{c['background']}, bench's own {c['bench_own']}, over {c['window_s']}s)")
    for hop, figures in saga["hops_ms"].items():
        lines.append(f"per command, {hop.replace('_', ' ')}: p50 {figures.get('p50_ms')} ms, "
                     f"p99 {figures.get('p99_ms')} ms")
    lines.append("rows written per saga: " + ", ".join(
        f"{k} {v}" for k, v in report["rows_per_saga"].items()))
    lines.append(f"CPU per saga: {report['cpu_ms_per_saga']} ms ({report['cpu_scope']}); "
                 "seconds by process: "
                 + ", ".join(f"{k} {v}" for k, v in saga["cpu_s"].items()))
    if raw.get("cpu_s"):
        lines.append("raw CPU seconds: " + ", ".join(f"{k} {v}" for k, v in raw["cpu_s"].items()))
    lines.append(f"outcomes: {saga['outcomes']}; load before {saga['load_before']}, "
                 f"after {report['load_after']}")
    if not report["ok"]:
        lines.append("NOT OK: some orders were refused or did not finish (see errors above)")
    return "\n".join(lines)
