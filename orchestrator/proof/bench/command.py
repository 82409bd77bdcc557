"""``sagactl bench``: saga throughput and latency against a raw Celery chain, in one run.

Places N orders (HTTP, or ``place_order`` in-process) at a fixed concurrency or a paced rate, waits
until every saga is final, then runs the same N through the raw baseline (orchestrator.proof.bench.raw).
Besides time it counts what each saga costs: broker messages, database commits, CPU seconds.
See docs/benchmarks.md for the method and the figures. This module runs the phases and writes the
report; the parts: the options (bench_options.py), the systems under test (bench_target.py), the
load (bench_load.py) and the measuring (bench_measure.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.ops import reach
from orchestrator.ops.config import settings
from orchestrator.proof import batch_sizes
from orchestrator.proof.bench.load import (
    Probe,
    make_products,
    post_phase,
    run_raw,
    run_sagas,
    saga_figures,
    saga_placer,
)
from orchestrator.proof.bench.measure import (
    CpuMeter,
    Db,
    counted_messages,
    machine,
    management_publishes,
)
from orchestrator.proof.bench.options import Options, Say
from orchestrator.proof.bench.target import (
    Target,
    profiling,
    raw_baseline,
    running_system,
    sandboxed,
)

# PostgreSQL 15 flushes an idle backend's counters to pg_stat_database within 10 s.
STATS_FLUSH_S = 11.0
# The bench measures the system as shipped: no injected faults, default retry timings.
DEFAULTED_ENV = ("SAGA_FAULT_INJECTION", "SAGA_RETRY_ATTEMPTS", "SAGA_RETRY_BASE_S",
                 "SAGA_RETRY_MAX_S", "SAGA_COMPENSATION_ATTEMPTS", "SAGA_STEP_TIMEOUT_S",
                 "SAGA_DEADLINE_S", "SAGA_SWEEP_S")


NOT_MEASURED = "a running system's metrics endpoints are not known to the bench"


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


# ---------------------------------------------------------------- the whole run


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
    db.forget_engine()


def reachable(database_url: str | None, broker_url: str) -> Probe:
    """The check a stalled phase makes (and every run before its warm-up): the database answers
    and the broker confirms a publish, each within seconds, or reach.Unreachable names it."""
    def probe() -> None:
        if database_url is not None:
            reach.require_database(database_url)
        reach.require_publish(broker_url)

    return probe


def _measure(opts: Options, target: Target, db: Db, baseline: Any, say: Say) -> dict[str, Any]:
    saga_probe = reachable(target.database_url, target.broker_url)
    raw_probe = reachable(None, baseline.broker_url) if baseline is not None else None
    saga_probe()
    if raw_probe is not None:
        raw_probe()
    skus = make_products(stock=opts.n + opts.warmup + _post_orders(opts))
    place = saga_placer(opts.mode, target.url, skus, opts.concurrency)
    if opts.warmup:
        warm = run_sagas(opts, opts.warmup, db, place, say, label="saga warm-up",
                         probe=saga_probe)
        if not warm["all_final"]:
            raise RuntimeError("warm-up sagas did not finish; see the logs in "
                               f"{target.log_dir} (--keep-logs keeps them)")
        if baseline is not None:
            run_raw(opts, opts.warmup, baseline, say, label="raw warm-up", probe=raw_probe)
    say(f"letting the database's counters settle ({STATS_FLUSH_S:.0f}s)…")
    time.sleep(STATS_FLUSH_S)
    own0 = db.own
    c0, t0 = db.counters()
    pub0 = management_publishes(target.broker_url)
    load_saga = _load()
    cpu = CpuMeter(target.pids, db)
    batches0 = batch_sizes.scrape(target.metrics)
    cpu.start()
    with profiling(opts, target.pids, say):
        phase = run_sagas(opts, opts.n, db, place, say, probe=saga_probe)
    saga_end = time.time()
    saga_cpu = cpu.stop()
    batches = (batch_sizes.summary(batch_sizes.delta(batch_sizes.scrape(target.metrics), batches0))
               if target.metrics else None)
    own_run = db.own - own0
    raw_fig: dict[str, Any] | None = None
    if baseline is not None:
        load_raw = _load()
        raw_cpu = CpuMeter(baseline.pids(), None)
        raw_cpu.start()
        raw_fig = run_raw(opts, opts.n, baseline, say, probe=raw_probe)
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
    # Last: its commits land in the sandbox database, after the saga's counters were read.
    floor_fig = _run_floor(opts, target, db, say) if opts.floor else None
    # After the floor too (the 100/s phase leaves sagas running): POST /orders at half the
    # saturation measured above, then at 100 requests/s.
    post = _post_phases(opts, target, skus, saga, db, saga_probe, say)
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
        "floor": floor_fig,
        "post_latency": post,
        "floor_ratio": _ratio((floor_fig or {}).get("sagas_per_s"),
                              (raw_fig or {}).get("sagas_per_s")),
        "messages_per_saga": round(messages_per_saga, 2),
        "messages": {**messages, "method": method},
        "commits_per_saga": round(net / n_done, 2),
        "commits": {"gross": gross, "background": round(background, 1),
                    "background_per_s": round(background_per_s, 2), "bench_own": own_run,
                    "net": round(net, 1), "window_s": round(t1 - t0, 1)},
        "rows_per_saga": rows,
        # {process: {queue: {batches, messages, mean, p50, p99}}} over the saga phase;
        # {}: nothing was batched; None: not measured (a running system's endpoints unknown).
        "batch_sizes": batches,
        "batch_sizes_note": (NOT_MEASURED if batches is None
                             else None if batches else batch_sizes.NOTHING_BATCHED),
        "cpu_ms_per_saga": round(sum(saga_cpu.values()) * 1000 / n_done, 2),
        "cpu_scope": ("the bench, PostgreSQL and RabbitMQ only (a running system's processes are "
                      "not known to the bench)") if opts.url else "every process of the sandbox",
        "load_after": _load(),
        "machine": machine(db),
    }
    ok = (phase["all_final"] and not saga["errors"]
          and all(fig is None or fig["all_final"] for fig in (raw_fig, floor_fig)))
    report["ok"] = bool(ok and saga["outcomes"].get("completed") == opts.n)
    return report


POST_FIXED_RATE = 100.0  # requests/s (issue 11's second POST /orders figure)


def _post_orders(opts: Options) -> int:
    """Orders the POST phases may place at most (stock for them)."""
    return int(opts.post_s * POST_FIXED_RATE * 2) if opts.mode == "http" and opts.post_s else 0


def _post_phases(opts: Options, target: Target, skus: list[str], saga: dict[str, Any], db: Db,
                 probe: Probe, say: Say) -> dict[str, Any] | None:
    """POST /orders latency at half the saga's saturation (closed loop: the throughput just
    measured; paced: half the rate given) and at POST_FIXED_RATE, ``post_s`` seconds each."""
    if opts.mode != "http" or not opts.post_s or not saga.get("sagas_per_s"):
        return None
    half = (opts.rate or saga["sagas_per_s"]) / 2
    out = {"half_saturation": post_phase(
        target.url, skus, half, max(1, int(half * opts.post_s)), db, say,
        f"POST at {half:.1f}/s", probe, drain_s=opts.timeout_s)}
    # Not drained: the system cannot keep 100 orders/s up here, the web answers (or refuses) them.
    out["at_100_per_s"] = post_phase(
        target.url, skus, POST_FIXED_RATE, int(POST_FIXED_RATE * opts.post_s), None, say,
        f"POST at {POST_FIXED_RATE:.0f}/s", probe)
    return out


# ---------------------------------------------------------------- for people


def _run_floor(opts: Options, target: Target, db: Db, say: Say) -> dict[str, Any]:
    """The same N through the floor baseline: six tasks, one commit each (bench_raw)."""
    from orchestrator.proof.bench.raw import (
        FLOOR_TABLE,  # late, as bench_target imports the baseline
    )

    with raw_baseline(target, say, kind="floor") as floor:
        if opts.warmup:
            run_raw(opts, opts.warmup, floor, say, label="floor warm-up")
        load_floor = _load()
        rows_before = db.rows(f"SELECT count(*) FROM {FLOOR_TABLE}")[0][0]
        cpu = CpuMeter(floor.pids(), db)
        cpu.start()
        figures = run_raw(opts, opts.n, floor, say, label="floor")
        figures.update(cpu_s=cpu.stop(), load_before=load_floor,
                       messages_per_chain="7 (6 task messages + 1 completion probe)")
        rows = db.rows(f"SELECT count(*) FROM {FLOOR_TABLE}")[0][0] - rows_before
        figures["commits_per_chain"] = round(rows / max(1, figures["completed"]), 2)
    return figures


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
    if report["floor"]:
        floor = report["floor"]
        lines.append(f"floor (6 tasks, 6 commits): {floor['sagas_per_s']}/s, p50 "
                     f"{floor['p50_ms']} ms, p99 {floor['p99_ms']} ms; floor/raw "
                     f"{report['floor_ratio']}")
    if "post_p50_ms" in saga:
        lines.append(f"POST /orders: p50 {saga['post_p50_ms']} ms, p99 {saga['post_p99_ms']} ms")
    for name, post in (report.get("post_latency") or {}).items():
        lines.append(f"POST /orders at {post['rate']}/s ({name.replace('_', ' ')}): p50 "
                     f"{post.get('post_p50_ms')} ms, p99 {post.get('post_p99_ms')} ms; "
                     f"{post['accepted']}/{post['n']} accepted, not accepted: "
                     f"{post['not_accepted'] or 'none'}")
    lines.append(f"messages per saga: {report['messages_per_saga']} "
                 f"({report['messages']['method']})")
    c = report["commits"]
    lines.append(f"commits per saga: {report['commits_per_saga']} (gross {c['gross']}, background "
                 f"{c['background']}, bench's own {c['bench_own']}, over {c['window_s']}s)")
    for hop, figures in saga["hops_ms"].items():
        lines.append(f"per command, {hop.replace('_', ' ')}: p50 {figures.get('p50_ms')} ms, "
                     f"p99 {figures.get('p99_ms')} ms")
    lines.extend(batch_sizes.lines(report["batch_sizes"], NOT_MEASURED))
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
