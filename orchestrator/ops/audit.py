"""``sagactl audit``: the contract's invariants, checked against the database, one query each."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from models.db import transaction
from models.enums import SagaState
from orchestrator import registry
from orchestrator.ops.config import settings

# Each query returns (order_id or NULL, detail) rows, one per breach.
CHECKS: dict[int, str] = {
    1: """
        SELECT NULL::uuid, 'product ' || sku || ': available ' || available || ' + reserved '
               || reserved || ' + sold ' || sold || ' != stock ' || stock_total
        FROM products
        WHERE available + reserved + sold <> stock_total OR available < 0 OR reserved < 0 OR sold < 0
    """,
    2: """
        SELECT o.id, 'confirmed order: charge ' || coalesce(c.status, 'missing') || ' of '
               || coalesce(c.amount_cents, 0) || ' for total ' || o.total_cents
               || ', reservation ' || coalesce(r.status, 'missing')
        FROM orders o
        JOIN sagas s ON s.business_key = o.id::text AND s.definition = 'order'
        LEFT JOIN charges c ON c.saga_id = s.id
        LEFT JOIN reservations r ON r.saga_id = s.id
        WHERE o.status = 'confirmed'
          AND (c.status IS DISTINCT FROM 'charged' OR c.amount_cents <> o.total_cents
               OR r.status IS DISTINCT FROM 'sold')
    """,
    3: """
        SELECT o.id, 'cancelled order: charge ' || coalesce(c.status, 'none')
               || ', reservation ' || coalesce(r.status, 'none')
        FROM orders o
        JOIN sagas s ON s.business_key = o.id::text AND s.definition = 'order'
        LEFT JOIN charges c ON c.saga_id = s.id
        LEFT JOIN reservations r ON r.saga_id = s.id
        WHERE o.status = 'cancelled'
          AND (c.status = 'charged' OR r.status IN ('reserved', 'sold'))
    """,
    # 4: one query per definition, from the statuses the registry states (see outcome_check).
    5: """
        SELECT s.business_key, 'dead letter ' || d.id || ' (' || coalesce(d.step, '?')
               || ') names a saga that is ' || coalesce(s.state, 'missing')
        FROM dead_letters d JOIN sagas s ON s.id = d.saga_id
        WHERE d.state = 'dead' AND s.state NOT IN ('compensated', 'failed')
          AND NOT EXISTS (  -- superseded: an operator's retry after it, then its step succeeded
              SELECT 1 FROM saga_events r JOIN saga_events ok
                ON ok.saga_id = r.saga_id AND ok.id > r.id
              WHERE r.saga_id = d.saga_id AND r.event = 'operator.retry' AND r.at > d.at
                AND ok.event IN ('step.succeeded', 'compensation.succeeded') AND ok.step = d.step)
    """,
    6: """
        SELECT s.business_key, 'saga ' || s.state || ' at ' || st.name || ' past its deadline by '
               || round(extract(epoch FROM now() - st.deadline_at)::numeric, 1) || 's'
        FROM sagas s JOIN saga_steps st ON st.saga_id = s.id AND st.idx = s.current_step
        WHERE s.state IN ('running', 'compensating')
          AND st.deadline_at < now() - make_interval(secs => :grace)
    """,
    7: """
        SELECT o.id, 'returned order: ' || coalesce(c.charged, 0) || ' charge(s) not refunded, '
               || coalesce(r.held, 0) || ' reservation(s) not returned, '
               || coalesce(x.done, 0) || ' completed return saga(s)'
        FROM orders o
        LEFT JOIN (SELECT order_id, count(*) AS charged FROM charges
                   WHERE status = 'charged' GROUP BY 1) c ON c.order_id = o.id
        LEFT JOIN (SELECT order_id, count(*) AS held FROM reservations
                   WHERE status IN ('reserved', 'sold') GROUP BY 1) r ON r.order_id = o.id
        LEFT JOIN (SELECT business_key, count(*) AS done FROM sagas
                   WHERE definition = 'return' AND state = 'completed' GROUP BY 1) x
               ON x.business_key = o.id::text
        WHERE o.status = 'returned'
          AND (coalesce(c.charged, 0) <> 0 OR coalesce(r.held, 0) <> 0 OR coalesce(x.done, 0) <> 1)
    """,
}

# An order without any order saga (the per-definition checks see only orders that have one).
ORDER_WITHOUT_SAGA = """
    SELECT o.id, 'order ' || o.status || ' but it has no order saga'
    FROM orders o
    WHERE NOT EXISTS (SELECT 1 FROM sagas s WHERE s.business_key = o.id::text
                      AND s.definition = 'order')
"""


def outcome_check(name: str, outcomes: dict[SagaState, tuple[str, ...]]) -> str:
    """Invariant 4 for one definition: the latest saga of it per order, against the order
    statuses its definition states for that saga state."""
    allowed = " OR ".join(
        f"(s.state = '{state.value}' AND o.status IN ({', '.join(repr(v) for v in statuses)}))"
        for state, statuses in outcomes.items()
    )
    return f"""
        SELECT o.id, 'order ' || o.status || ' but its {name} saga is ' || s.state
        FROM orders o JOIN (
            SELECT DISTINCT ON (business_key) business_key, state FROM sagas
            WHERE definition = '{name}' ORDER BY business_key, created_at DESC
        ) s ON s.business_key = o.id::text
        WHERE NOT ({allowed})
    """


def _outcome_checks() -> list[str]:
    reg = registry.current()
    checks = [ORDER_WITHOUT_SAGA]
    for name in reg.names:
        outcomes = reg.latest(name).outcomes
        if outcomes:
            checks.append(outcome_check(name, outcomes))
    return checks


# A letter that names no saga, or one that does not exist (a forged or foreign message).
ORPHANS = """
    SELECT d.id, d.queue, d.reason FROM dead_letters d LEFT JOIN sagas s ON s.id = d.saga_id
    WHERE d.state = 'dead' AND s.id IS NULL
"""


@dataclass
class Report:
    checked: dict[str, int]
    violations: list[dict[str, Any]] = field(default_factory=list)
    orphans: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "violations": self.violations,
            "orphan_dead_letters": self.orphans,
        }


def run(grace_s: float | None = None) -> Report:
    """Invariant 6 allows one sweep interval (plus ``grace_s``) for the sweeper to act."""
    grace = settings().sweep_s * 2 + (grace_s if grace_s is not None else 5.0)
    with transaction() as session:
        counts = {
            table: int(session.scalar(sa.text(f"SELECT count(*) FROM {table}")) or 0)
            for table in ("orders", "sagas", "products")
        }
        report = Report(checked=counts)
        queries = [*((n, sql) for n, sql in CHECKS.items()), *((4, q) for q in _outcome_checks())]
        for number, sql in sorted(queries, key=lambda q: q[0]):
            params = {"grace": grace} if number == 6 else {}
            for order_id, detail in session.execute(sa.text(sql), params):
                report.violations.append(
                    {
                        "invariant": number,
                        "order_id": str(order_id) if order_id else None,
                        "detail": detail,
                    }
                )
        report.orphans = [
            {"id": i, "queue": q, "reason": r} for i, q, r in session.execute(sa.text(ORPHANS))
        ]
    return report
