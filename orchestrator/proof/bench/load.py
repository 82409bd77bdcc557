"""``sagactl bench``, the load: bench products, placing N orders (or raw chains) closed-loop or
paced, waiting until each is final, and the timing figures of a phase.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests

from orchestrator.proof.bench.measure import Db, hops, latency_ms
from orchestrator.proof.bench.options import Options, Say
from orchestrator.registry import TimelineEvent as E

# A phase whose counts stood still this long asks the database and the broker whether they are
# there (reach.py): a run that cannot reach one fails in seconds, naming it, instead of waiting
# out its timeout. A system that is merely slow answers and the phase goes on.
STALL_S = 10.0
Probe = Callable[[], None]  # raises reach.Unreachable


class Stall:
    """Calls ``probe`` each time the phase's counts have not moved for STALL_S."""

    def __init__(self, probe: Probe | None) -> None:
        self._probe = probe
        self._seen: object = None
        self._since = time.monotonic()

    def check(self, counts: object) -> None:
        now = time.monotonic()
        if counts != self._seen:
            self._seen, self._since = counts, now
        elif self._probe is not None and now - self._since >= STALL_S:
            self._probe()
            self._since = time.monotonic()


FINAL_EVENTS = [E.SAGA_COMPLETED.value, E.SAGA_COMPENSATED.value, E.SAGA_FAILED.value]
PRODUCTS = 8  # orders spread over several rows, so stock row locks are not the bottleneck


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


# ---------------------------------------------------------------- bench products


def make_products(stock: int) -> list[str]:
    """Bench products of this run's own (random SKUs), each with enough stock for every order."""
    from models.catalog import Product
    from models.db import transaction

    skus = [f"SKU-BENCH-{uuid.uuid4().hex[:8].upper()}" for _ in range(PRODUCTS)]
    with transaction() as session:
        session.add_all(Product(sku=sku, name=f"bench {sku}", price_cents=100, available=stock,
                                reserved=0, sold=0, stock_total=stock) for sku in skus)
    return skus


# ---------------------------------------------------------------- one phase each


def _order_body(i: int, skus: list[str]) -> dict[str, Any]:
    return {"customer_id": f"bench-{i}", "items": [{"sku": skus[i % len(skus)], "quantity": 1}],
            "payment": {"card_token": "tok_visa"}}


def saga_placer(mode: str, url: str, skus: list[str], threads: int) -> Callable[[int], str]:
    if mode == "direct":
        from models import db
        from orchestrator.messaging import fastpath
        from orchestrator.ops.config import settings
        from orchestrator.sagas import placing as ordering

        # As the web does: the same lean start path, and a connection kept for each thread (a
        # smaller pool opens and closes one per order over it: the placer's cost, not the saga's).
        os.environ["SAGA_DB_POOL_SIZE"] = str(db.pool_size("web", 1, threads))
        settings.cache_clear()
        db.get_engine().dispose()
        db.forget_engine()
        fastpath.publish_in_background()

        def place_direct(i: int) -> str:
            new = ordering.NewOrder(customer_id=f"bench-{i}", items=[(skus[i % len(skus)], 1)],
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
              label: str = "saga", probe: Probe | None = None) -> dict[str, Any]:
    """Place n orders, wait until every saga is final; latencies from the database's clock."""
    drive = Drive(n, opts.concurrency, opts.rate)
    final: set[str] = set()
    stall = Stall(probe)
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
                stall.check((len(drive.placed), len(final)))
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


def _timing(drive: Drive, ends: dict[str, float]) -> dict[str, Any]:
    done = [p for p in drive.placed if p.key in ends]
    first = min((p.started for p in drive.placed), default=0.0)
    last = max(ends.values(), default=first)
    elapsed = max(last - first, 1e-9)
    return {"n": drive.n, "completed": len(done), "errors": len(drive.errors),
            "error_sample": drive.errors[:3], "elapsed_s": round(elapsed, 2),
            "sagas_per_s": round(len(done) / elapsed, 1),
            **latency_ms([ends[p.key] - p.accepted for p in done])}


def run_raw(opts: Options, n: int, baseline: Any, say: Say, label: str = "raw",
            probe: Probe | None = None) -> dict[str, Any]:
    drive = Drive(n, opts.concurrency, opts.rate)
    stall = Stall(probe)

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
                stall.check((len(drive.placed), len(baseline.done)))
                time.sleep(0.1)
        finally:
            drive.stop.set()
            placer.join()
    ends = {p.key: baseline.done[p.key] for p in drive.placed if p.key in baseline.done}
    baseline.done.clear()
    figures = _timing(drive, ends)
    figures["all_final"] = len(ends) == n
    return figures


# ---------------------------------------------------------------- POST /orders at fixed rates


def post_phase(url: str, skus: list[str], rate: float, count: int, db: Db | None, say: Say,
               label: str, probe: Probe | None = None, max_attempts: int = 6,
               drain_s: float = 300.0) -> dict[str, Any]:
    """``count`` POST /orders paced at ``rate``; each answer's latency from its due time (a retry
    from its own start). A 503 with Retry-After is a right answer above the backlog limit: it is
    counted, and the client retries after the time it says. With ``db`` every accepted saga is
    waited for (the next phase starts from a drained system)."""
    answers: list[float] = []
    accepted: list[str] = []
    refused: Counter[str] = Counter()
    lock = threading.Lock()
    local = threading.local()
    stop = threading.Event()

    def one(i: int, due: float) -> None:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        start = due
        for _ in range(max_attempts):
            try:
                r = local.session.post(f"{url}/orders", json=_order_body(i, skus), timeout=30)
            except requests.RequestException as exc:
                with lock:
                    refused[type(exc).__name__] += 1
                return
            with lock:
                answers.append(time.time() - start)
            if r.status_code == 202:
                with lock:
                    accepted.append(str(r.json()["saga_id"]))
                return
            if r.status_code != 503 or "Retry-After" not in r.headers:
                with lock:
                    refused[str(r.status_code)] += 1
                return
            with lock:
                refused["503 (retried)"] += 1
            if stop.wait(float(r.headers["Retry-After"])):
                return
            start = time.time()
        with lock:
            refused["gave up"] += 1

    stall = Stall(probe)
    final: set[str] = set()
    with Progress(label, lambda: f"answered {len(answers)}, accepted {len(accepted)}/{count}"
                  + (f", final {len(final)}" if db is not None else ""), say), \
            ThreadPoolExecutor(max(8, int(rate) * 2), thread_name_prefix="post") as pool:
        t0 = time.time() + 0.05
        for i in range(count):
            delay = t0 + i / rate - time.time()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, i, t0 + i / rate)
        pool.shutdown(wait=True)
        deadline = time.monotonic() + drain_s
        while db is not None and len(final) < len(accepted) and time.monotonic() < deadline:
            final |= db.final([k for k in accepted if k not in final])
            stall.check(len(final))
            time.sleep(0.25)
    return {"rate": round(rate, 1), "n": count, "accepted": len(accepted),
            "drained": None if db is None else len(final) == len(accepted),
            "answered": len(answers), "not_accepted": dict(refused),
            **latency_ms(answers, prefix="post_")}
