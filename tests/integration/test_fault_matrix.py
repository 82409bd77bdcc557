"""The fault matrix: every injected fault at every step and every compensation, on the real system.

Each case places an order carrying ``faults`` and checks what the contract promises: the order's
final status and reason, the saga's state, each step's and compensation's status and attempts, the
timeline's order, and the participants' records (each effect once; a cancelled order nets zero).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest

from orchestrator.messaging.topology import SERVICES
from orchestrator.proof.client import Api
from orchestrator.proof.harness import Processes
from tests.conftest import TEST_TIMINGS
from tests.integration.helpers import (
    LogCursor,
    assert_in_order,
    describe,
    make_product,
    order_body,
    place,
    product,
    records,
    wait_final,
)

STEP_BUDGET = int(TEST_TIMINGS["SAGA_RETRY_ATTEMPTS"])
COMPENSATION_BUDGET = int(TEST_TIMINGS["SAGA_COMPENSATION_ATTEMPTS"])
STEP_TIMEOUT_S = float(TEST_TIMINGS["SAGA_STEP_TIMEOUT_S"])
HANG_S = STEP_TIMEOUT_S + 2  # long enough that the deadline passes and the sweeper acts

# The contract's saga table: each step and its compensation, in order.
SAGA: tuple[tuple[str, str | None], ...] = (
    ("orders.create", "orders.cancel"),
    ("inventory.reserve", "inventory.release"),
    ("payment.charge", "payment.refund"),
    ("orders.confirm", None),
)
STEP_NAMES = [step for step, _ in SAGA]
ACTIONS = STEP_NAMES[1:]
COMPENSATIONS = ["payment.refund", "inventory.release", "orders.cancel"]  # the order they run in
REFUSAL_REASON = {"inventory.reserve": "out_of_stock", "payment.charge": "payment_declined",
                  "orders.confirm": "retries_exhausted"}
# The clean step refusal ("fail") that makes each compensation run first in the reverse walk.
REACHED_BY = {"payment.refund": "orders.confirm", "inventory.release": "payment.charge",
              "orders.cancel": "inventory.reserve"}

STOCK, QUANTITY, PRICE = 5, 2, 100
TOTAL = QUANTITY * PRICE


def queue_of(command: str) -> str:
    return command.split(".", 1)[0]


# ---------------------------------------------------------------- what the contract expects


@dataclass(frozen=True)
class Outcome:
    status: str
    reason: str | None
    state: str
    steps: dict[str, str]  # forward step -> status (orders.create included)
    compensations: dict[str, str]  # compensation -> status
    path: list[tuple[Any, ...]]  # the timeline's skeleton, in order

    def ran(self, name: str) -> bool:
        kind = "compensation" if name in COMPENSATIONS else "step"
        return any(e[:2] == (f"{kind}.dispatched", name) for e in self.path)

    def succeeded(self, name: str) -> bool:
        return self.steps.get(name, self.compensations.get(name)) == "succeeded"


def completes() -> Outcome:
    path: list[tuple[Any, ...]] = [("saga.started", None)]
    for step in ACTIONS:
        path += [("step.dispatched", step), ("step.succeeded", step)]
    return Outcome("confirmed", None, "completed", dict.fromkeys(STEP_NAMES, "succeeded"),
                   dict.fromkeys(COMPENSATIONS, "pending"), [*path, ("saga.completed", None)])


def turns_back(at: str, reason: str, *, partial: bool, parked: str | None = None,
               failure: list[tuple[Any, ...]] | None = None) -> Outcome:
    """The saga fails at step ``at`` and compensates in reverse order (``partial``: ``at`` too).

    ``parked``: that compensation parks, the rest wait. ``failure``: the events that must come
    between the failing element's dispatch and what follows it.
    """
    index = STEP_NAMES.index(at)
    steps = {name: "succeeded" if i < index else "failed" if i == index else "skipped"
             for i, name in enumerate(STEP_NAMES)}
    start = index if partial else index - 1
    to_run = [comp for _, comp in reversed(SAGA[: start + 1]) if comp]
    compensations = dict.fromkeys(COMPENSATIONS, "pending")
    path: list[tuple[Any, ...]] = [("saga.started", None)]
    for step in ACTIONS[: index - 1]:
        path += [("step.dispatched", step), ("step.succeeded", step)]
    path.append(("step.dispatched", at))
    if parked is None:
        path += failure or []
    for comp in to_run:
        path.append(("compensation.dispatched", comp))
        if comp == parked:
            compensations[comp] = "parked"
            path += [*(failure or []), ("compensation.parked", comp), ("saga.failed", None)]
            return Outcome("failed", reason, "failed", steps, compensations, path)
        compensations[comp] = "succeeded"
        path.append(("compensation.succeeded", comp))
    assert parked is None, f"{parked} is not on the way back from {at}"
    return Outcome("cancelled", reason, "compensated", steps, compensations,
                   [*path, ("saga.compensated", None)])


def compensating_through(target: str, parks: bool = False,
                         failure: list[tuple[Any, ...]] | None = None) -> Outcome:
    """A clean refusal sends the saga back through ``target`` first (which may park)."""
    at = REACHED_BY[target]
    return turns_back(at, REFUSAL_REASON[at], partial=False, parked=target if parks else None,
                      failure=failure)


# ---------------------------------------------------------------- placing and checking


@dataclass
class Placed:
    target: str
    faults: dict[str, str]
    sku: str
    order_id: str
    saga_id: str
    view: dict[str, Any] = field(default_factory=dict)


def faults_for(target: str, fault: str) -> dict[str, str]:
    """The fault at ``target``; a compensation also needs the step refusal that reaches it."""
    if target in COMPENSATIONS:
        return {REACHED_BY[target]: "fail", target: fault}
    return {target: fault}


def place_case(api: Api, target: str, fault: str) -> Placed:
    sku = make_product(stock=STOCK, price_cents=PRICE)
    faults = faults_for(target, fault)
    placed = place(api, order_body(sku, quantity=QUANTITY, faults=faults))
    return Placed(target, faults, sku, placed["order_id"], placed["saga_id"])


def launch_all(url: str, fault: str, targets: list[str]) -> dict[str, Placed]:
    """Place one order per target at once: independent sagas run side by side, saving time."""
    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        placed = pool.map(lambda t: place_case(Api.connect(url), t, fault), targets)
        return {p.target: p for p in placed}


@contextmanager
def diagnosed(system: Processes, case: Placed) -> Iterator[None]:
    """On a failed check, print the order, its timeline and every process's log lines for it."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nfaults {case.faults}\n"
                             f"{describe(case.view, system.log_dir)}") from None


def check_saga(view: dict[str, Any], expected: Outcome, target: str,
               attempts: int | range) -> None:
    """Status, reason, state, every step's and compensation's status and attempts, the path."""
    saga = view["saga"]
    assert (view["status"], view["reason"], saga["state"]) == (
        expected.status, expected.reason, expected.state)
    steps = {s["name"]: s for s in saga["steps"]}
    comps = {s["compensation"]["name"]: s["compensation"]
             for s in saga["steps"] if s["compensation"]}
    assert {n: s["status"] for n, s in steps.items()} == expected.steps
    assert {n: c["status"] for n, c in comps.items()} == expected.compensations
    got = {n: s["attempts"] for n, s in steps.items() if n in ACTIONS}
    got |= {n: c["attempts"] for n, c in comps.items()}
    want = {n: int(expected.ran(n)) for n in got if n != target}
    assert {n: a for n, a in got.items() if n != target} == want
    if isinstance(attempts, int):
        assert got[target] == attempts, f"{target} attempts"
    else:
        assert got[target] in attempts, f"{target} attempts {got[target]} not in {attempts}"
    assert_in_order(view, expected.path)
    for comp in COMPENSATIONS:
        if not expected.ran(comp):  # e.g. no refund after a clean refusal to charge
            assert ("compensation.dispatched", comp) not in [
                (e["event"], e["step"]) for e in saga["timeline"]], f"{comp} dispatched"


def check_effects(case: Placed, expected: Outcome) -> None:
    """Stock and money exactly as the saga's outcome says: each effect applied once or undone."""
    reserved = expected.succeeded("inventory.reserve") and not expected.succeeded(
        "inventory.release")
    sold = expected.succeeded("orders.confirm")
    charged = expected.succeeded("payment.charge") and not expected.succeeded("payment.refund")
    if sold:
        stock = {"available": STOCK - QUANTITY, "reserved": 0, "sold": QUANTITY}
    elif reserved:
        stock = {"available": STOCK - QUANTITY, "reserved": QUANTITY, "sold": 0}
    else:
        stock = {"available": STOCK, "reserved": 0, "sold": 0}
    assert product(case.sku) == stock
    charges = records("charges", case.saga_id)
    assert len(charges) <= 1
    net = sum(c["amount_cents"] for c in charges if c["status"] == "charged")
    assert net == (TOTAL if charged else 0), f"net charge {net}: {charges}"
    reservations = records("reservations", case.saga_id)
    assert len(reservations) <= 1
    holding = [r["status"] for r in reservations if r["status"] in ("reserved", "sold")]
    assert holding == (["sold"] if sold else ["reserved"] if reserved else [])


def dead_letters(case: Placed) -> list[tuple[str, str, str]]:
    return [(d["step"], d["queue"], d["state"]) for d in records("dead_letters", case.saga_id)]


# ---------------------------------------------------------------- the matrix

TARGETS = [*ACTIONS, *COMPENSATIONS]


Launcher = Callable[..., dict[str, Placed]]


@pytest.fixture(scope="module")
def launched(system: Processes) -> Launcher:
    """``launched(fault[, targets])``: one order per target with that fault, placed once, at once."""
    cache: dict[tuple[str, tuple[str, ...]], dict[str, Placed]] = {}

    def launch(fault: str, targets: tuple[str, ...] = tuple(TARGETS)) -> dict[str, Placed]:
        if (fault, targets) not in cache:
            cache[fault, targets] = launch_all(system.url, fault, list(targets))
        return cache[fault, targets]

    return launch


Logs = dict[str, LogCursor]


@pytest.fixture(scope="module")
def logs(system: Processes) -> Logs:
    """The orchestrator's and each service's whole log (a case's lines carry its own saga id, so
    they are never another case's, whenever the case was launched)."""
    return {name: LogCursor(system.running[name].log, 0) for name in ("orchestrator", *SERVICES)}


def budget_of(target: str) -> int:
    return COMPENSATION_BUDGET if target in COMPENSATIONS else STEP_BUDGET


def kind_of(target: str) -> str:
    return "compensation" if target in COMPENSATIONS else "step"


def died(pid: int) -> bool:
    """Gone, or a zombie its worker has not reaped yet (the master notices on its own timer)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("target", TARGETS)
def test_transient_faults_are_retried_until_they_pass(
    target: str, api: Api, system: Processes, launched: Launcher, logs: Logs,
) -> None:
    n = budget_of(target) - 1  # the most failures the budget absorbs
    case = launched(f"transient:{n}")[target]
    case.view = wait_final(api, case.order_id)
    kind = kind_of(target)
    retries: list[tuple[Any, ...]] = []
    for k in range(1, n + 1):
        retries += [(f"{kind}.failed", target, k), ("step.retried", target, k + 1)]
    retries.append((f"{kind}.succeeded", target, n + 1))
    expected = completes() if kind == "step" else compensating_through(target)
    with diagnosed(system, case):
        check_saga(case.view, expected, target, attempts=n + 1)
        assert_in_order(case.view, [(f"{kind}.dispatched", target, 1), *retries])
        failed = [e for e in case.view["saga"]["timeline"]
                  if (e["event"], e["step"]) == (f"{kind}.failed", target)]
        assert len(failed) == n, "one failure event per failed attempt"
        check_effects(case, expected)
        assert dead_letters(case) == []
        # The participant says the fault struck once per failed attempt (what chaos counts).
        fired = logs[queue_of(target)].lines(f"saga={case.saga_id}", "injected fault fired")
        assert len(fired) == n, fired


@pytest.mark.parametrize("target", TARGETS)
def test_always_failing_messages_are_dead_lettered(
    target: str, api: Api, system: Processes, launched: Launcher,
) -> None:
    case = launched("always")[target]
    case.view = wait_final(api, case.order_id)
    budget = budget_of(target)
    # The timeline says the message was dead-lettered after the whole budget was spent.
    gave_up: list[tuple[Any, ...]] = [("step.dead_lettered", target, budget)]
    if target in COMPENSATIONS:
        expected = compensating_through(target, parks=True, failure=gave_up)
    else:
        expected = turns_back(target, "retries_exhausted", partial=True, failure=gave_up)
    with diagnosed(system, case):
        check_saga(case.view, expected, target, attempts=budget)
        check_effects(case, expected)
        assert dead_letters(case) == [(target, queue_of(target), "dead")]


@pytest.mark.parametrize("target", TARGETS)
def test_business_failures_turn_the_saga_back_or_park_it(
    target: str, api: Api, system: Processes, launched: Launcher,
) -> None:
    case = launched("fail")[target]
    case.view = wait_final(api, case.order_id)
    if target in COMPENSATIONS:
        expected = compensating_through(
            target, parks=True, failure=[("compensation.failed", target, 1)])
    else:
        expected = turns_back(target, REFUSAL_REASON[target], partial=False,
                              failure=[("step.failed", target, 1)])
    with diagnosed(system, case):
        check_saga(case.view, expected, target, attempts=1)
        check_effects(case, expected)
        assert dead_letters(case) == []


@pytest.mark.parametrize("target", TARGETS)
def test_a_crash_after_the_work_is_redelivered_and_applied_once(
    target: str, api: Api, system: Processes, logs: Logs,
) -> None:
    # One at a time: the check that a pool process died must not see another case's crash.
    service = queue_of(target)
    pool_before = set(system.worker_children(service))
    case = place_case(api, target, "crash")
    case.view = wait_final(api, case.order_id)
    expected = completes() if target in ACTIONS else compensating_through(target)
    with diagnosed(system, case):
        killed = {pid for pid in pool_before if died(pid)}
        assert killed, f"no {service} pool process died"
        check_saga(case.view, expected, target, attempts=range(1, budget_of(target) + 1))
        check_effects(case, expected)
        assert dead_letters(case) == []
        # The saga may have finished by the sweeper's re-send before the worker noticed the death;
        # the original message comes back once it does, and must change nothing either. The
        # participant sees it redelivered (attempt 1 again) and finds its effect recorded; the
        # orchestrator then handles the reply of attempt 1, which only that redelivery sends.
        saga = f"saga_id={case.saga_id}"
        logs[service].wait_for(saga, f"step={target}", "attempt 1 ", "changed nothing",
                               "redelivered")
        logs["orchestrator"].wait_for(saga, "reply succeeded attempt 1:")
        assert len(logs[service].lines(f"saga={case.saga_id}", "injected fault fired: crash")) == 1
        after = api.order(case.order_id)
        assert after["saga"]["timeline"] == case.view["saga"]["timeline"], "redelivery not fenced"
        check_effects(case, expected)


@pytest.mark.parametrize("target", TARGETS)
def test_a_hang_past_the_deadline_is_re_sent_by_the_sweeper(
    target: str, api: Api, system: Processes, launched: Launcher, logs: Logs,
) -> None:
    # Steps first, then compensations: a wave holds at most one pool process of each service
    # asleep, so no other order waits past its own deadline for a free one.
    wave = tuple(ACTIONS) if target in ACTIONS else tuple(COMPENSATIONS)
    case = launched(f"hang:{HANG_S:g}", wave)[target]
    case.view = wait_final(api, case.order_id)
    kind = kind_of(target)
    expected = completes() if kind == "step" else compensating_through(target)
    with diagnosed(system, case):
        check_saga(case.view, expected, target, attempts=range(2, budget_of(target) + 1))
        assert_in_order(case.view, [
            (f"{kind}.dispatched", target, 1), ("step.timed_out", target, 1),
            (f"{kind}.dispatched", target, 2), (f"{kind}.succeeded", target)])
        check_effects(case, expected)
        # The first attempt wakes after the saga moved on: its late result must change nothing.
        # Evidence that it woke and was handled: the participant's attempt 1 finds the effect
        # recorded, and the orchestrator fences its reply off.
        # Evidence that it woke and was handled: the participant's attempt 1 replied, and the
        # orchestrator took that reply (fenced off, or the one that completed the step).
        saga = f"saga_id={case.saga_id}"
        logs[queue_of(target)].wait_for(saga, f"step={target}", "attempt 1 succeeded",
                                        timeout_s=HANG_S + 30)
        logs["orchestrator"].wait_for(saga, "reply succeeded attempt 1:")
        after = api.order(case.order_id)
        assert after["saga"]["timeline"] == case.view["saga"]["timeline"], "late result not fenced"
        assert (after["status"], after["saga"]["state"]) == (expected.status, expected.state)
        check_effects(case, expected)
