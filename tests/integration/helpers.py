"""Helpers of the integration tests: products of their own, orders, waiting, reading state."""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa

from models.catalog import Product
from models.db import transaction
from orchestrator.ops import audit
from orchestrator.proof.client import Api
from orchestrator.proof.harness import Processes


def settle_and_audit(timeout_s: float = 60) -> audit.Report:
    """Wait until no saga is in flight (or time is up), then audit."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with transaction() as session:
            busy = session.scalar(sa.text(
                "SELECT count(*) FROM sagas WHERE state IN ('running', 'compensating')"))
        if not busy:
            break
        time.sleep(0.25)
    return audit.run()


def add_dead_letter(saga_id: str | None, state: str = "dead", age_days: float = 0) -> int:
    """A row as the dead-letter intake writes it (``age_days`` old; resolved then, unless dead),
    naming ``saga_id`` or nothing. Returns its id."""
    with transaction() as session:
        letter_id = session.scalar(
            sa.text("""
                INSERT INTO dead_letters (saga_id, step, queue, reason, state, exchange,
                    routing_key, headers, properties, body, fingerprint, at, resolved_at)
                VALUES (CAST(:s AS uuid), 'payment.charge', 'payment', 'rejected (test)', :state,
                    'saga', 'payment', '{}', '{}', '\\x7b7d', :f,
                    now() - make_interval(secs => :age),
                    CASE WHEN :resolved THEN now() - make_interval(secs => :age) END)
                RETURNING id"""),
            {"s": saga_id, "state": state, "resolved": state != "dead", "f": uuid.uuid4().hex,
             "age": age_days * 86400},
        )
    return int(letter_id)


def make_product(stock: int, price_cents: int = 100) -> str:
    """A product of this test's own (random SKU), so tests never share stock."""
    sku = f"SKU-T-{uuid.uuid4().hex[:10].upper()}"
    with transaction() as session:
        session.add(Product(sku=sku, name=f"test {sku}", price_cents=price_cents,
                            available=stock, reserved=0, sold=0, stock_total=stock))
    return sku


def order_body(sku: str, quantity: int = 1, token: str = "tok_visa",
               faults: dict[str, str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"customer_id": f"c-{uuid.uuid4().hex[:8]}",
                            "items": [{"sku": sku, "quantity": quantity}],
                            "payment": {"card_token": token}}
    if faults:
        body["faults"] = faults
    return body


def place(api: Api, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    response = api.place(body, key)
    assert response.status_code in (200, 202), response.text
    data: dict[str, Any] = response.json()
    return data


def wait_final(api: Api, order_id: str, timeout_s: float = 60) -> dict[str, Any]:
    return api.wait_final([order_id], timeout_s)[order_id]


def product(sku: str) -> dict[str, int]:
    with transaction() as session:
        p = session.get(Product, sku, populate_existing=True)
        assert p is not None
        return {"available": p.available, "reserved": p.reserved, "sold": p.sold}


def events(view: dict[str, Any]) -> list[tuple[str, str | None]]:
    return [(e["event"], e["step"]) for e in view["saga"]["timeline"]]


def records(table: str, saga_id: str) -> list[dict[str, Any]]:
    """A participant's (or the dead-letter intake's) rows of one saga, oldest first."""
    assert table in ("charges", "reservations", "dead_letters")  # never interpolate anything else
    order = "id" if table == "dead_letters" else "created_at"
    with transaction() as session:
        query = sa.text(f"SELECT * FROM {table} WHERE saga_id = :s ORDER BY {order}")
        rows = session.execute(query, {"s": saga_id}).mappings()
        return [dict(row) for row in rows]


def assert_in_order(view: dict[str, Any], expected: list[tuple[Any, ...]]) -> None:
    """Each expected ``(event, step[, attempt])`` is in the timeline, after the one before it."""
    timeline = [(e["event"], e["step"], e["attempt"]) for e in view["saga"]["timeline"]]
    position = 0
    for wanted in expected:
        for i in range(position, len(timeline)):
            if timeline[i][: len(wanted)] == tuple(wanted):
                position = i + 1
                break
        else:
            raise AssertionError(f"{wanted} missing from the timeline after position {position}")


def log_lines(log_dir: Path, needle: str, per_file: int = 60) -> str:
    """The lines of every process log that mention ``needle`` (a saga or order id), for a report."""
    out = []
    for path in sorted(log_dir.glob("*.log")):
        with open(path, encoding="utf-8", errors="replace") as f:
            hits = [line.rstrip() for line in f if needle in line]
        if hits:
            out.append(f"--- {path.name} ({len(hits)} lines, last {per_file})")
            out.extend(hits[-per_file:])
    return "\n".join(out)


def describe(view: dict[str, Any], log_dir: Path | None = None) -> str:
    """An order's state, its saga's timeline and its log lines: what a failing test prints."""
    saga = view["saga"]
    lines = [f"order {view['order_id']}: {view['status']} ({view['reason']}), "
             f"saga {saga['saga_id']}: {saga['state']}"]
    for s in saga["steps"]:
        comp = s["compensation"]
        lines.append(f"  {s['name']}: {s['status']} x{s['attempts']} {s['error'] or ''}"
                     + (f" | {comp['name']}: {comp['status']} x{comp['attempts']} "
                        f"{comp['error'] or ''}" if comp else ""))
    lines += [f"  {e['at']} {e['event']} {e['step'] or ''} #{e['attempt']} {e['detail'] or ''}"
              for e in saga["timeline"]]
    if log_dir is not None:
        lines.append(log_lines(log_dir, saga["saga_id"]))
    return "\n".join(lines)


@dataclass(frozen=True)
class LogCursor:
    """What one process writes to its log from now on (a restart appends to the same file)."""

    path: Path
    start: int

    @classmethod
    def at_end(cls, system: Processes, name: str) -> LogCursor:
        path = system.running[name].log
        return cls(path, path.stat().st_size if path.exists() else 0)

    def lines(self, *needles: str) -> list[str]:
        """The lines written since the cursor was taken that contain every one of ``needles``."""
        with open(self.path, "rb") as f:
            f.seek(self.start)
            text = f.read().decode("utf-8", errors="replace")
        return [line for line in text.splitlines() if all(n in line for n in needles)]

    def wait_for(self, *needles: str, count: int = 1, timeout_s: float = 30) -> list[str]:
        """Until ``count`` such lines are there: the evidence that a message was handled."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.lines(*needles)
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self.path.name}: {len(found)} of {count} line(s) with "
                                     f"{needles} after {timeout_s}s")
            time.sleep(0.1)


def gaps_s(stamps: list[str]) -> list[float]:
    """Seconds between consecutive ISO timestamps, in time order (a rate bound's evidence)."""
    times = sorted(datetime.fromisoformat(s) for s in stamps)
    return [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
def admin_session() -> requests.Session:
    """HTTP Basic as the admin, asking for JSON: what an operator's script uses."""
    from orchestrator.ops.config import settings

    session = requests.Session()
    session.auth = (settings().admin_user, settings().admin_password.get_secret_value())
    session.headers["Accept"] = "application/json"
    return session
