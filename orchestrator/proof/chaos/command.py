"""``sagactl chaos``: the whole system in a sandbox of its own, under load and faults, then proof.

Load (orchestrator/proof/chaos/load.py) and disruptions (chaos_faults.py) run together for ``duration``
seconds; then the system drains, sagas parked by the chaos are retried as an operator would, and
every invariant is checked (chaos_checks.py). The report says what happened and what held.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from orchestrator.ops.cluster import Cluster
from orchestrator.ops.processes import instance_names, parse_scale, scalable
from orchestrator.proof import batch_sizes
from orchestrator.proof.chaos import checks as checks
from orchestrator.proof.chaos.broker_nodes import BrokerChaos, PublishProbe
from orchestrator.proof.chaos.faults import Disruptor
from orchestrator.proof.chaos.load import Load, create_products
from orchestrator.proof.harness import SHORT_TIMINGS
from orchestrator.proof.private_pg import PrivatePostgres

# Short retries and deadlines, so a run of minutes sees many of them.
CHAOS_TIMINGS = {**SHORT_TIMINGS, "SAGA_DEADLINE_S": "60"}
LONG_FORM_S = 300  # RabbitMQ is restarted only by a run at least this long (and when allowed)


@dataclass(frozen=True)
class Options:
    duration_s: float = 60.0
    seed: int | None = None
    rate: float = 5.0
    threads: int = 3
    allow_broker_restart: bool = False
    drain_timeout_s: float = 180.0
    log_dir: Path | str | None = None
    keep: bool = False
    broker_nodes: int = 0  # 0: a vhost on the machine's node; N: a cluster of the run's own
    scale: str | None = None  # "orchestrator=2,relay=2,..." (processes.parse_scale)
    allow_db_restart: bool = False  # a PostgreSQL of the run's own, restarted once under load


def run(opts: Options, say: Callable[[str], None]) -> dict[str, Any]:
    """Create the sandbox, run the chaos, check, tear down; returns the report."""
    from models.db import get_engine
    from orchestrator.proof.harness import Processes, Sandbox, use_sandbox

    seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(2**31)
    scale = parse_scale(opts.scale)
    os.environ.update(CHAOS_TIMINGS)  # this process retries parked sagas with the same policy
    with contextlib.ExitStack() as owned:  # servers of the run's own: stopped and removed last
        cluster = pg = None
        # A broker restart needs a broker of the run's own: one private node at least.
        restarts = opts.allow_broker_restart and opts.duration_s >= LONG_FORM_S
        nodes = opts.broker_nodes or (1 if restarts else 0)
        if nodes:
            cluster = Cluster.create(nodes, say=say)
            owned.callback(cluster.stop)
        if opts.allow_db_restart:
            pg = PrivatePostgres.create()
            owned.callback(pg.destroy)
            say(f"chaos: PostgreSQL of the run's own on port {pg.port}")
        box = Sandbox.create("sagachaos", cluster=cluster, database_url=pg.url if pg else None)
        log_dir = Path(opts.log_dir or Path("artifacts") / "chaos") / box.name
        failpoints_dir = log_dir / "failpoints"
        failpoints_dir.mkdir(parents=True, exist_ok=True)
        say(f"chaos: seed {seed}, sandbox {box.name}, logs in {log_dir}")
        use_sandbox(box)
        procs = Processes(box, log_dir / "logs", metrics=True,  # batch sizes are read there
                          extra_env={**CHAOS_TIMINGS, "SAGA_FAILPOINTS_DIR": str(failpoints_dir)})
        try:
            create_products()
            procs.start_all(instance_names(scale))
            report = _run_in(box, procs, opts, seed, failpoints_dir, say, pg)
            report["log_dir"] = str(log_dir)
            report["scale"] = {n: scale.get(n, 1) for n in scalable()}
            return report
        finally:
            procs.stop_all()
            get_engine().dispose()
            if opts.keep:
                say(f"chaos: sandbox kept: database and vhost {box.name}")
            else:
                box.destroy()
    raise AssertionError("unreachable")  # mypy: the with block returns or raises


def _schedule(box: Any, opts: Options, seed: int, pg: PrivatePostgres | None,
              started: float) -> list[Any]:
    """The disruptions of servers the run owns, at seeded points of the run."""
    rng = random.Random(f"{seed}/servers")
    planned: list[Any] = []
    d = opts.duration_s
    if box.cluster is not None and len(box.cluster.nodes) >= 3:  # a majority survives one node
        nodes = BrokerChaos(box.cluster, box.name, started)
        for frac in (0.15, 0.6):
            planned.append((d * frac, "node_kill_leader", "busiest leader",
                            partial(nodes.kill_leader, rng.uniform(5, 10))))
        for frac in (0.35, 0.8):
            planned.append((d * frac, "node_stop_start", "a node",
                            partial(nodes.stop_start, random.Random(rng.random()),
                                    rng.uniform(3, 6))))
        for frac in (0.25, 0.5, 0.9):
            planned.append((d * frac, "node_pause", "a node",
                            partial(nodes.pause, random.Random(rng.random()), rng.uniform(3, 6))))
    if pg is not None:
        planned.append((d * rng.uniform(0.3, 0.7), "db_restart", f"postgresql:{pg.port}",
                        partial(_restart_db, pg)))
    return sorted(planned, key=lambda p: p[0])


def _restart_db(pg: PrivatePostgres) -> str:
    return f"stopped (fast) and started, down {pg.restart(down_s=2.0):.1f}s"


def _run_in(box: Any, procs: Any, opts: Options, seed: int, failpoints_dir: Path,
            say: Callable[[str], None], pg: PrivatePostgres | None = None) -> dict[str, Any]:
    broker_restart = opts.allow_broker_restart and opts.duration_s >= LONG_FORM_S
    if opts.allow_broker_restart and not broker_restart:
        say(f"chaos: no broker restart: only a run of {LONG_FORM_S}s or more restarts RabbitMQ")
    load = Load(procs.url, seed, opts.rate, opts.threads, run_id=box.name)
    faults = Disruptor(procs, box, seed, failpoints_dir, say,
                       broker_restart_at=opts.duration_s * random.Random(seed).uniform(0.3, 0.6)
                       if broker_restart else None)
    started = time.monotonic()
    faults.scheduled = _schedule(box, opts, seed, pg, started)
    probe = PublishProbe(box.broker_url, box.queue_replicas, started)
    probe.start()
    batches = batch_sizes.Sampler()
    load.start()
    faults.start()
    while (elapsed := time.monotonic() - started) < opts.duration_s:
        time.sleep(min(5.0, opts.duration_s - elapsed))
        batches.sample(procs)
        s = load.ledger.summary()
        say(f"chaos t={time.monotonic() - started:.0f}/{opts.duration_s:.0f}s: "
            f"{s['accepted']} orders accepted, {checks.in_flight_text()} sagas in flight, "
            f"{faults.summary()['total']} disruptions")
    load.stop.set()  # both stop now; each then finishes what it has in hand
    faults.finish()
    load.finish()
    probe.finish()
    last_fault = max(faults.last_at, started)
    quiet_from = time.monotonic()  # no new order, every process back up
    say("chaos: load stopped; draining")
    settled = checks.wait_settled(opts.drain_timeout_s, say)
    batches.sample(procs)
    drain_s = time.monotonic() - last_fault
    drain_quiet_s = time.monotonic() - quiet_from
    parked = checks.parked_sagas()
    budget = int(CHAOS_TIMINGS["SAGA_COMPENSATION_ATTEMPTS"])
    by_chaos = checks.parked_by_chaos(parked, budget)
    # Retried as an operator would, so the other checks see a settled system; the park itself
    # still breaks the run (no_park_by_chaos).
    retried = checks.operator_retry([p.saga_id for p in by_chaos])
    if by_chaos:
        say(f"chaos: operator retry of {len(by_chaos)} saga(s) parked by the chaos")
        settled = checks.wait_settled(opts.drain_timeout_s, say) and settled
    still_parked = {p.saga_id for p in checks.parked_sagas()}
    results = [*checks.check_all(load.ledger, box.name), checks.no_park_by_chaos(by_chaos),
               checks.no_unexpected_exit(faults.unexpected)]
    ok = all(c.ok for c in results)
    broken = [o for c in results if not c.ok for o in c.order_ids]
    fired = checks.faults_fired(procs.log_dir)
    timelines = procs.log_dir / "timelines.txt"
    shown = checks.write_timelines(timelines, broken)
    return {
        "ok": ok, "seed": seed, "duration_s": opts.duration_s, "rate": opts.rate,
        "threads": opts.threads, "sandbox": box.name,
        "orders": load.ledger.summary(),
        # Planned: the faults the accepted orders carried. Injected: what the participants say
        # fired (a compensation fault fires only if the saga turns back through it).
        "faults_planned": dict(load.ledger.faults),
        "faults_injected": fired["fired"],
        "fault_strikes": fired["strikes"],
        "disruptions": faults.summary(),
        "broker_restart": {"allowed": opts.allow_broker_restart, "done": any(
            e["action"] == "broker_restart" for e in faults.events)},
        "db_restart": {"allowed": opts.allow_db_restart, "done": [
            e["result"] for e in faults.events if e["action"] == "db_restart"]},
        "broker_nodes": len(box.cluster.nodes) if box.cluster is not None else 1,
        "node_events": [{"action": e["action"], **e["result"]} for e in faults.events
                        if e["action"].startswith("node_") and isinstance(e["result"], dict)],
        "publish_refusals": probe.summary(faults.events),
        "sagas": {**checks.saga_figures(), "parked_by_injected_fault": len(parked) - len(by_chaos),
                  "parked_by_chaos": len(by_chaos), "operator_retried": retried["retried"],
                  "recovered_after_retry": len([p for p in by_chaos if p.saga_id not in still_parked])},
        "drain": {"settled": settled, "seconds_after_last_fault": round(drain_s, 1),
                  "seconds_after_load_stopped": round(drain_quiet_s, 1)},
        # {process: {queue: {batches, messages, mean, p50, p99}}}, load and drain; {}: none.
        "batch_sizes": batches.total(),
        "invariants": [c.as_json() for c in results],
        "timelines": str(timelines) if shown else None,
    }


def _node_line(e: dict[str, Any]) -> str:
    led = ", ".join(e["led"]) or "no service queue"
    extra = ""
    if e["action"] == "node_kill_leader":
        extra = (f"; survivors led them after {e['leaders_elsewhere_after_s']}s "
                 f"({e['new_leaders']})")
    held = f"paused {e['paused_s']}s" if "paused_s" in e else f"down {e.get('down_s')}s"
    return f"  {e['action']} t={e['at_s']}s {e['node']} ({held}), leading {led}{extra}"


def _refusal_line(p: dict[str, Any]) -> str:
    worst = sorted(p["windows"], key=lambda w: -w["refused_s"])[:6]
    return (f"publishes refused (probe, one every 0.1 s): {p['refused']}/{p['attempts']} "
            f"attempts, {p['refused_s_total']}s in all, longest {p['longest_s']}s; worst: "
            + ", ".join(f"{w['refused_s']}s at t={w['at_s']} after {w['after']}" for w in worst))


def render(report: dict[str, Any]) -> str:
    """The report for people."""
    o, s, d = report["orders"], report["sagas"], report["disruptions"]
    lines = [
        f"chaos run: seed {report['seed']}, {report['duration_s']:.0f}s at {report['rate']}/s, "
        f"sandbox {report['sandbox']}, logs {report.get('log_dir')}",
        f"orders: {o['planned']} placed, {o['accepted']} accepted, {o['unanswered']} never "
        f"answered; answers {o['answers']}",
        f"  by scenario {o['by_scenario']}",
        f"  outcomes {s['order_outcomes']}",
        f"faults injected (fired in the participants): {report['faults_injected']}, striking "
        f"{report['fault_strikes']} attempt(s); planned in order bodies: "
        f"{report['faults_planned']}",
        f"disruptions ({d['total']}):",
        *(f"  {action}: {targets}" for action, targets in sorted(d["by_action"].items())),
        f"  broker restart: {'done' if report['broker_restart']['done'] else 'not done'}",
        f"  database restart: {report['db_restart']['done'] or 'not done'}",
        f"processes: {report.get('scale')}; broker nodes: {report['broker_nodes']}",
        *(_node_line(e) for e in report["node_events"]),
        _refusal_line(report["publish_refusals"]),
        f"sagas: {s['retries']} retries, {s['timeouts']} timeouts, "
        f"{s['dead_lettered']} dead-lettered, {s['compensations']} compensations "
        f"({s['sagas_compensated']} sagas compensated)",
        f"  parked: {s['sagas_parked']} sagas ({s['parked_by_injected_fault']} by an injected "
        f"fault, {s['parked_by_chaos']} by the chaos: {s['operator_retried']} operator-retried, "
        f"{s['recovered_after_retry']} recovered)",
        f"  dead letters: {s['dead_letters']}",
        f"drain: {'settled' if report['drain']['settled'] else 'NOT settled'} "
        f"{report['drain']['seconds_after_last_fault']}s after the last disruption "
        f"({report['drain']['seconds_after_load_stopped']}s after the load stopped and every "
        "process was back)",
        *batch_sizes.lines(report["batch_sizes"], "unused: chaos reads every process"),
        "invariants:",
        *(f"  {'ok    ' if c['ok'] else 'BROKEN'} {c['name']}"
          + (f": {c['detail']}" if c["detail"] and not c["ok"] else "")
          for c in report["invariants"]),
    ]
    if d["errors"]:
        lines.append(f"disruptions that failed: {d['errors']}")
    if report.get("timelines"):
        lines.append(f"timelines of the orders named: {report['timelines']}")
    lines.append("OK" if report["ok"] else "BREACH")
    return "\n".join(lines)
