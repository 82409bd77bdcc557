"""``sagactl chaos``, the proof: wait for the system to settle, then check every invariant against
the client's ledger, the database and the sandbox's RabbitMQ vhost.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import sqlalchemy as sa

from models.db import transaction
from orchestrator.kernel import engine
from orchestrator.kernel.machine import NotApplicable
from orchestrator.messaging.envelopes import FAULT_FIRED
from orchestrator.messaging.topology import SERVICES
from orchestrator.ops import audit
from orchestrator.proof.chaos.faults import rabbitmqctl
from orchestrator.proof.chaos.load import Ledger, fault_kind

NOT_FINAL = "state IN ('running', 'compensating')"


@dataclass
class Check:
    name: str
    ok: bool
    detail: Any = None
    order_ids: tuple[str, ...] = ()  # the orders to show timelines of, when broken

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


def _rows(sql: str, **params: Any) -> list[tuple[Any, ...]]:
    with transaction() as session:
        return [tuple(row) for row in session.execute(sa.text(sql), params)]


def _scalar(sql: str, **params: Any) -> int:
    with transaction() as session:
        return int(session.scalar(sa.text(sql), params) or 0)


def in_flight() -> int:
    return _scalar(f"SELECT count(*) FROM sagas WHERE {NOT_FINAL}")


def in_flight_text() -> str:
    """For the progress line, which must survive the chaos terminating its connection."""
    try:
        return str(in_flight())
    except Exception:
        return "?"


def wait_settled(timeout_s: float, say: Callable[[str], None]) -> bool:
    """Until every saga is final and every outbox row sent, or the time is up."""
    deadline = time.monotonic() + timeout_s
    last_said = 0.0
    while True:
        busy = in_flight()
        unsent = _scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        if not busy and not unsent:
            return True
        if time.monotonic() >= deadline:
            return False
        if time.monotonic() - last_said >= 5:
            say(f"draining: {busy} saga(s) in flight, {unsent} outbox row(s) unsent")
            last_said = time.monotonic()
        time.sleep(0.5)


class Parked(NamedTuple):
    saga_id: uuid.UUID
    order_id: str
    compensation: str | None
    fault: str | None  # the fault injected into that compensation, if any


def parked_sagas() -> list[Parked]:
    """Failed sagas: the parked compensation and the fault injected into it, if any."""
    rows = _rows("""
        SELECT s.id, s.order_id::text, st.compensation,
               s.context -> 'faults' ->> st.compensation
        FROM sagas s JOIN saga_steps st ON st.saga_id = s.id AND st.idx = s.current_step
        WHERE s.state = 'failed'""")
    return [Parked(*r) for r in rows]


def injected_to_park(fault: str | None, budget: int) -> bool:
    """Would this injected fault park its compensation whatever the chaos did?"""
    if fault in ("always", "fail"):
        return True
    return bool(fault and fault.startswith("transient:") and int(fault.split(":")[1]) >= budget)


def parked_by_chaos(parked: list[Parked], budget: int) -> list[Parked]:
    """The parked sagas no injected fault explains: a disruption parked them."""
    return [p for p in parked if not injected_to_park(p.fault, budget)]


def no_park_by_chaos(by_chaos: list[Parked]) -> Check:
    """A saga may park only when its order carried a permanent fault on that compensation."""
    return Check("no saga parked by a disruption", not by_chaos,
                 [f"order {p.order_id}: {p.compensation} parked, injected fault {p.fault}"
                  for p in by_chaos[:20]] or None, tuple(p.order_id for p in by_chaos))


def no_unexpected_exit(unexpected: list[str]) -> Check:
    """Every process death was a kill of the schedule or a fail point that fired in it."""
    return Check("no unexpected process exit", not unexpected, unexpected[:10] or None)


def operator_retry(saga_ids: list[uuid.UUID]) -> dict[str, int]:
    """Resume parked sagas as an operator would (``POST /admin/sagas/<id>/retry``)."""
    outcome = {"retried": 0, "not_applicable": 0}
    for saga_id in saga_ids:
        try:
            with transaction() as session:
                engine.operator_action(session, saga_id, "retry", "chaos",
                                       "chaos run: resume a compensation parked by the chaos")
            outcome["retried"] += 1
        except NotApplicable:
            outcome["not_applicable"] += 1
    return outcome


def queue_depths(vhost: str) -> dict[str, tuple[int, int]]:
    """name -> (ready, unacked) for every queue of the vhost."""
    depths = {}
    out = rabbitmqctl("-q", "list_queues", "-p", vhost, "name", "messages_ready",
                      "messages_unacknowledged")
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            depths[parts[0]] = (int(parts[1]), int(parts[2]))
    return depths


def wait_queues_drained(vhost: str, timeout_s: float) -> dict[str, tuple[int, int]]:
    """Queues still holding messages after ``timeout_s`` (empty: all drained)."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy = {q: d for q, d in queue_depths(vhost).items() if d != (0, 0)}
        if not busy or time.monotonic() >= deadline:
            return busy
        time.sleep(1.0)


def saga_figures() -> dict[str, Any]:
    """What the timelines say happened: retries, timeouts, compensations, parks, outcomes."""
    events: dict[str, int] = {
        e: n for e, n in _rows("SELECT event, count(*) FROM saga_events GROUP BY event")}
    outcomes = {f"{status}/{reason}" if reason else status: n for status, reason, n in _rows(
        "SELECT status, reason, count(*) FROM orders GROUP BY status, reason ORDER BY 1, 2")}
    return {
        "retries": events.get("step.retried", 0),
        "timeouts": events.get("step.timed_out", 0),
        "dead_lettered": events.get("step.dead_lettered", 0),
        "compensations": events.get("compensation.succeeded", 0),
        "sagas_compensated": _scalar("SELECT count(*) FROM sagas WHERE state = 'compensated'"),
        "parked": events.get("compensation.parked", 0),
        "sagas_parked": _scalar("SELECT count(DISTINCT saga_id) FROM saga_events "
                                "WHERE event = 'compensation.parked'"),
        "operator_retries": events.get("operator.retry", 0),
        "order_outcomes": outcomes,
        "dead_letters": {why: n for why, n in _rows(
            "SELECT split_part(reason, ':', 1), count(*) FROM dead_letters GROUP BY 1")},
    }


def faults_fired(log_dir: Path, services: tuple[str, ...] = SERVICES) -> dict[str, dict[str, int]]:
    """What the participants say struck (their ``injected fault fired`` lines), by kind: the
    faults that fired (one per saga and step) and the attempts they struck (``transient:2``
    strikes twice, ``always`` every attempt)."""
    fired: set[tuple[str, str, str]] = set()
    strikes: Counter[str] = Counter()
    for service in services:
        for path in sorted(log_dir.glob(f"{service}*.log")):
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    found = FAULT_FIRED.search(line)
                    if found:
                        kind = fault_kind(found["fault"])
                        strikes[kind] += 1
                        fired.add((found["saga"], found["step"], kind))
    return {"fired": dict(Counter(kind for _, _, kind in fired)), "strikes": dict(strikes)}


def check_all(ledger: Ledger, vhost: str, queues_wait_s: float = 30) -> list[Check]:
    return [_all_final(), _audit(), *_orders_present(ledger), *_effects_once(),
            _dead_letters(), _outbox_sent(), queues_drained(vhost, queues_wait_s)]


def queues_drained(vhost: str, wait_s: float) -> Check:
    busy = wait_queues_drained(vhost, wait_s)
    return Check("queues drained", not busy,
                 {q: {"ready": r, "unacked": u} for q, (r, u) in busy.items()} or None)


def _all_final() -> Check:
    rows = _rows(f"SELECT order_id::text, state FROM sagas WHERE {NOT_FINAL}")
    return Check("every saga final", not rows, {"not_final": len(rows)} if rows else None,
                 tuple(r[0] for r in rows))


def _audit() -> Check:
    report = audit.run()
    return Check("audit clean", report.ok, report.violations[:50] or None,
                 tuple(v["order_id"] for v in report.violations if v["order_id"]))


def _orders_present(ledger: Ledger) -> list[Check]:
    in_db = {str(i): c for i, c in _rows("SELECT id, customer_id FROM orders")}
    accepted = set(ledger.accepted)
    lost = sorted(accepted - set(in_db))
    unanswered = set(ledger.unanswered)
    extra = {o: c for o, c in in_db.items() if o not in accepted}
    ambiguous = sorted(o for o, c in extra.items() if c in unanswered)
    unexpected = sorted(o for o, c in extra.items() if c not in unanswered)
    dup = [r[0] for r in _rows("SELECT customer_id FROM orders GROUP BY 1 HAVING count(*) > 1")]
    return [
        Check("every accepted order present", not lost,
              {"accepted": len(accepted), "lost": len(lost), "lost_ids": lost[:20]}),
        Check("no unexpected order", not unexpected,
              {"unexpected": len(unexpected), "ids": unexpected[:20],
               "after_connection_error": len(ambiguous)}, tuple(unexpected)),
        Check("one order per idempotency key", not dup, dup[:20] or None),
    ]


EFFECT_QUERIES = {
    # Twice the same transition in one saga would mean an effect observed twice.
    "a step or compensation succeeded twice": """
        SELECT s.order_id::text, e.event || ' ' || e.step || ' x' || count(*)
        FROM saga_events e JOIN sagas s ON s.id = e.saga_id
        WHERE e.event IN ('step.succeeded', 'compensation.succeeded')
        GROUP BY s.order_id, e.event, e.step HAVING count(*) > 1""",
    "a charge or refund of another amount than the order total": """
        SELECT o.id::text,
               'charge ' || c.status || ' of ' || c.amount_cents || ' for ' || o.total_cents
        FROM charges c JOIN orders o ON o.id = c.order_id
        WHERE c.status IN ('charged', 'refunded', 'declined')
          AND c.amount_cents <> o.total_cents""",
    "a charge held by an order that is not confirmed or failed": """
        SELECT o.id::text, 'order ' || o.status || ' holds a charge'
        FROM charges c JOIN orders o ON o.id = c.order_id
        WHERE c.status = 'charged' AND o.status NOT IN ('confirmed', 'failed')""",
    "stock held for an order that is not confirmed or failed": """
        SELECT o.id::text, 'order ' || o.status || ' with reservation ' || r.status
        FROM reservations r JOIN orders o ON o.id = r.order_id
        WHERE (r.status = 'sold' AND o.status <> 'confirmed')
           OR (r.status = 'reserved' AND o.status <> 'failed')""",
    "product buckets differ from the reservations": """
        SELECT NULL, p.sku || ': reserved ' || p.reserved || ' vs ' || coalesce(x.reserved, 0)
               || ', sold ' || p.sold || ' vs ' || coalesce(x.sold, 0)
        FROM products p LEFT JOIN (
            SELECT l->>'sku' AS sku,
                   sum((l->>'quantity')::int) FILTER (WHERE r.status = 'reserved') AS reserved,
                   sum((l->>'quantity')::int) FILTER (WHERE r.status = 'sold') AS sold
            FROM reservations r, jsonb_array_elements(r.lines) l GROUP BY 1) x ON x.sku = p.sku
        WHERE p.reserved <> coalesce(x.reserved, 0) OR p.sold <> coalesce(x.sold, 0)""",
    "stock sold differs from the confirmed orders": """
        SELECT NULL, p.sku || ': sold ' || p.sold || ' vs confirmed ' || coalesce(c.qty, 0)
        FROM products p LEFT JOIN (
            SELECT l.sku, sum(l.quantity) AS qty FROM order_lines l
            JOIN orders o ON o.id = l.order_id WHERE o.status = 'confirmed' GROUP BY 1
        ) c ON c.sku = p.sku
        WHERE p.sold <> coalesce(c.qty, 0)""",
}


def _effects_once() -> list[Check]:
    checks = []
    for name, sql in EFFECT_QUERIES.items():
        rows = _rows(sql)
        checks.append(Check(f"no double effect: {name}", not rows,
                            [r[1] for r in rows[:20]] or None, tuple(r[0] for r in rows if r[0])))
    return checks


def _dead_letters() -> Check:
    rows = _rows("""
        SELECT d.id, d.state, s.state, s.order_id::text, d.step
        FROM dead_letters d LEFT JOIN sagas s ON s.id = d.saga_id""")
    orphans = [r[0] for r in rows if r[2] is None and r[1] == "dead"]
    bad = [r for r in rows if r[1] == "dead" and r[2] is not None
           and r[2] not in ("compensated", "failed")]
    return Check("every dead letter accounted for", not bad, {
        "total": len(rows), "orphans": orphans,
        "unaccounted": [f"dead letter {r[0]} ({r[4]}) names a saga {r[2]}" for r in bad[:20]],
    }, tuple(r[3] for r in bad))


def _outbox_sent() -> Check:
    unsent = _scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
    return Check("outbox fully sent", not unsent, {"unsent": unsent} if unsent else None)


def write_timelines(path: Path, order_ids: list[str], limit: int = 30) -> int:
    """The saga timelines of the orders a check named, for whoever investigates."""
    ids = sorted(set(order_ids))[:limit]
    if not ids:
        return 0
    with path.open("w") as f:
        for order_id in ids:
            f.write(f"== order {order_id}\n")
            for row in _rows("""
                SELECT e.at, e.event, e.step, e.attempt, e.detail, s.id, s.state
                FROM saga_events e JOIN sagas s ON s.id = e.saga_id
                WHERE s.order_id = CAST(:o AS uuid) ORDER BY e.id""", o=order_id):
                f.write(f"{row[0].isoformat()} {row[1]:<24} {row[2] or '-':<18} "
                        f"#{row[3] or '-'} {row[4] or ''}  [saga {row[5]} {row[6]}]\n")
    return len(ids)
