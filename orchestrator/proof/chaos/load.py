"""``sagactl chaos``, the load: a few threads placing a seeded mix of orders at a bounded rate.

Every order carries an Idempotency-Key, and a POST that ends in a connection error or a 5xx is sent
again with the same key, as a real client would; the ledger keeps what the client was told.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import requests

from models.catalog import Product
from models.db import transaction
from orchestrator import registry
from orchestrator.kernel.machine import Step
from orchestrator.proof.client import Api
from orchestrator.sagas.order import ORDER_SAGA

BIG = (("SKU-CHAOS-APPLE", 250), ("SKU-CHAOS-BREAD", 120))
SCARCE = ("SKU-CHAOS-SCARCE", 900)
SCARCE_STOCK = 6


def _order_steps() -> tuple[Step, ...]:
    return registry.current().latest(ORDER_SAGA.name).definition.steps


def fault_steps() -> tuple[str, ...]:
    """The order saga's actions (from the registry): where a step fault goes."""
    return tuple(s.action for s in _order_steps() if s.action)


def compensation_triggers() -> dict[str, tuple[str, str]]:
    """A compensation runs only when the saga turns back past it: the refusal of the next step
    that gets it there, for each compensation of the order saga."""
    steps = _order_steps()
    triggers = {}
    for i, step in enumerate(steps):
        following = next((s.action for s in steps[i + 1:] if s.action), None)
        if step.compensation and following:
            triggers[step.compensation] = (following, "fail")
    return triggers

# (fault, weight). transient:4 outlives a 3-attempt budget: it ends like "always".
FAULTS = (("transient:1", 3), ("transient:2", 3), ("transient:4", 1), ("always", 2), ("fail", 2),
          ("crash", 3), ("hang:2", 1), ("hang:6", 1))
SCENARIOS = (("normal", 45), ("scarce", 12), ("declined", 10), ("step_fault", 20),
             ("compensation_fault", 13))
POST_TRIES = 8
# Every how many orders a confirmed one is returned, and the faults a return may carry (a refused
# refund aborts it; the others are retried through).
RETURN_EVERY = 6
RETURN_FAULTS = (("transient:1", 3), ("crash", 2), ("hang:2", 1), ("fail", 1))
RETURN_STEPS = ("payment.return_refund", "inventory.return_stock", "orders.complete_return")


def fault_kind(fault: str) -> str:
    """``transient:2`` -> ``transient``: what the report counts by."""
    return fault.split(":", 1)[0]


def create_products() -> None:
    """Products of the run's own: two that never run out, one scarce (restocked by the chaos)."""
    with transaction() as session:
        for sku, price in BIG:
            session.add(Product(sku=sku, name=f"chaos {sku}", price_cents=price,
                                available=1_000_000, reserved=0, sold=0, stock_total=1_000_000))
        session.add(Product(sku=SCARCE[0], name="chaos scarce", price_cents=SCARCE[1],
                            available=SCARCE_STOCK, reserved=0, sold=0, stock_total=SCARCE_STOCK))


def _pick(rng: random.Random, table: tuple[tuple[str, int], ...]) -> str:
    return rng.choices([name for name, _ in table], weights=[w for _, w in table])[0]


def plan(rng: random.Random, customer_id: str) -> tuple[str, dict[str, Any]]:
    """One order of a random scenario: (scenario, body)."""
    scenario = _pick(rng, SCENARIOS)
    lines = [{"sku": sku, "quantity": rng.randint(1, 3)}
             for sku, _ in rng.sample(BIG, rng.randint(1, len(BIG)))]
    token = "tok_visa"
    faults: dict[str, str] = {}
    if scenario == "scarce":
        lines = [{"sku": SCARCE[0], "quantity": rng.choice((1, 1, 2, 1000))}, *lines[:1]]
    elif scenario == "declined":
        token = "tok_chargeDeclined"
    elif scenario == "step_fault":
        faults[rng.choice(fault_steps())] = _pick(rng, FAULTS)
    elif scenario == "compensation_fault":
        triggers = compensation_triggers()
        compensation = rng.choice(sorted(triggers))
        faults[compensation] = _pick(rng, FAULTS)
        step, fault = triggers[compensation]
        faults[step] = fault
    body: dict[str, Any] = {"customer_id": customer_id, "items": lines,
                            "payment": {"card_token": token}}
    if faults:
        body["faults"] = faults
    return scenario, body


@dataclass
class Ledger:
    """What the client knows: accepted orders, and every answer it got. Thread-safe."""

    accepted: dict[str, str] = field(default_factory=dict)  # order_id -> scenario
    customers: dict[str, str] = field(default_factory=dict)  # customer_id -> order_id
    unanswered: list[str] = field(default_factory=list)  # customer ids never answered
    refused: list[dict[str, Any]] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    scenarios: Counter[str] = field(default_factory=Counter)
    planned: int = 0
    returns: dict[str, str] = field(default_factory=dict)  # saga id of an accepted return -> order
    return_answers: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, what: str) -> None:
        with self.lock:
            self.answers[what] += 1

    def accept(self, customer_id: str, order_id: str, scenario: str, body: dict[str, Any]) -> None:
        with self.lock:
            self.accepted[order_id] = scenario
            self.customers[customer_id] = order_id
            self.scenarios[scenario] += 1
            for fault in (body.get("faults") or {}).values():
                self.faults[fault_kind(fault)] += 1

    def summary(self) -> dict[str, Any]:
        with self.lock:
            return {
                "planned": self.planned, "accepted": len(self.accepted),
                "answers": dict(self.answers), "unanswered": len(self.unanswered),
                "refused": self.refused[:20], "by_scenario": dict(self.scenarios),
                "returns_accepted": len(self.returns), "return_answers": dict(self.return_answers),
            }


@dataclass
class Load:
    """Threads that place orders until ``stop`` is set."""

    url: str
    seed: int
    rate: float
    threads: int
    run_id: str
    ledger: Ledger = field(default_factory=Ledger)
    stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for i in range(self.threads):
            t = threading.Thread(target=self._loop, args=(i,), name=f"chaos-load-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        returner = threading.Thread(target=self._returns, name="chaos-returns", daemon=True)
        returner.start()
        self._threads.append(returner)

    def _returns(self) -> None:
        """Return one confirmed order of every RETURN_EVERY accepted, some with a fault."""
        rng = random.Random(f"{self.seed}/returns")
        api = Api.connect(self.url)
        tried: set[str] = set()
        while not self.stop.wait(RETURN_EVERY / self.rate):
            with self.ledger.lock:
                normal = [o for o, sc in self.ledger.accepted.items()
                          if sc == "normal" and o not in tried]
            if not normal:
                continue
            order_id = rng.choice(normal)
            tried.add(order_id)
            body: dict[str, Any] = {"reason": "chaos: a return"}
            if rng.random() < 0.3:
                body["faults"] = {rng.choice(RETURN_STEPS): _pick(rng, RETURN_FAULTS)}
            self._return(api, order_id, body, f"{self.run_id}-return-{order_id}")

    def _return(self, api: Api, order_id: str, body: dict[str, Any], key: str) -> None:
        for attempt in range(POST_TRIES):
            if attempt:
                time.sleep(min(4.0, 0.25 * 2**attempt))
            try:
                response = api.return_order(order_id, body, key)
            except requests.RequestException as exc:
                self.ledger.return_answers[f"connection error ({type(exc).__name__})"] += 1
                continue
            code = _error_code(response) or str(response.status_code)
            with self.ledger.lock:
                self.ledger.return_answers[code if response.status_code >= 400 else "accepted"] += 1
                if response.status_code in (200, 202):
                    self.ledger.returns[response.json()["saga_id"]] = order_id
                    for fault in (body.get("faults") or {}).values():
                        self.ledger.faults[fault_kind(fault)] += 1
                    return
            if response.status_code >= 500 or code == "idempotency_in_flight":
                continue
            return  # e.g. not_returnable: the order is not confirmed (yet, or any more)

    def finish(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def _loop(self, i: int) -> None:
        rng = random.Random(f"{self.seed}/load/{i}")
        api = Api.connect(self.url)
        period = self.threads / self.rate
        next_at = time.monotonic() + period * i / self.threads
        seq = 0
        while not self.stop.wait(max(0.0, next_at - time.monotonic())):
            seq += 1
            customer_id = f"chaos-{i}-{seq}"
            scenario, body = plan(rng, customer_id)
            with self.ledger.lock:
                self.ledger.planned += 1
            self._place(api, scenario, body, f"{self.run_id}-{customer_id}")
            # Bounded rate: a slow answer delays the next order, never causes a burst after it.
            next_at = max(next_at + period, time.monotonic())

    def _place(self, api: Api, scenario: str, body: dict[str, Any], key: str) -> None:
        customer_id = body["customer_id"]
        for attempt in range(POST_TRIES):
            if attempt:
                time.sleep(min(4.0, 0.25 * 2**attempt))
            try:
                response = api.place(body, key)
            except requests.RequestException as exc:
                self.ledger.answer(f"connection error ({type(exc).__name__})")
                continue
            status = response.status_code
            self.ledger.answer(str(status))
            if status in (200, 202):
                self.ledger.accept(customer_id, response.json()["order_id"], scenario, body)
                return
            code = _error_code(response)
            if status == 503 or status >= 500 or code == "idempotency_in_flight":
                continue  # nothing was written, or the key tells us on the next try
            with self.ledger.lock:
                self.ledger.refused.append({"customer_id": customer_id, "status": status,
                                            "body": response.text[:300]})
            return
        with self.ledger.lock:
            self.ledger.unanswered.append(customer_id)


def _error_code(response: requests.Response) -> str | None:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None
