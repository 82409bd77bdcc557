"""The return saga's fault matrix: every injected fault at each of its steps and at its
compensation, on the real system. Before the pivot a failure aborts the return (the order is
confirmed again, still charged); after it the saga only goes forward, retried and else parked
(the order stays returning), and the refund is never undone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa

from models.db import transaction
from orchestrator.proof.client import Api
from orchestrator.proof.harness import Processes
from tests.conftest import TEST_TIMINGS
from tests.integration.helpers import describe, make_product, order_body, place, product, wait_final

STEP_BUDGET = int(TEST_TIMINGS["SAGA_RETRY_ATTEMPTS"])
COMPENSATION_BUDGET = int(TEST_TIMINGS["SAGA_COMPENSATION_ATTEMPTS"])
HANG_S = float(TEST_TIMINGS["SAGA_STEP_TIMEOUT_S"]) + 2
STOCK, QUANTITY, PRICE = 5, 2, 120

PIVOT = "payment.return_refund"
AFTER_PIVOT = ["inventory.return_stock", "orders.complete_return"]
ABORT = "orders.abort_return"  # reached by a refused refund
TARGETS = [PIVOT, *AFTER_PIVOT, ABORT]


@dataclass(frozen=True)
class Expected:
    order: str  # the order's status at the end
    saga: str  # the return saga's state
    refunded: bool
    stock_back: bool


RETURNED = Expected("returned", "completed", refunded=True, stock_back=True)
ABORTED = Expected("confirmed", "compensated", refunded=False, stock_back=False)


def expected(target: str, fault: str) -> Expected:
    gives_up = fault in ("always", "fail")
    if target == PIVOT:
        return ABORTED if gives_up else RETURNED
    if target == ABORT:  # the refund was refused first
        return Expected("returning", "failed", False, False) if gives_up else ABORTED
    if not gives_up:
        return RETURNED
    return Expected(
        "returning", "failed", refunded=True, stock_back=target == "orders.complete_return"
    )


def faults_for(target: str, fault: str) -> dict[str, str]:
    return {PIVOT: "fail", ABORT: fault} if target == ABORT else {target: fault}


def charges(order_id: str) -> list[str]:
    with transaction() as session:
        return list(
            session.scalars(
                sa.text("SELECT status FROM charges WHERE order_id = :o"), {"o": order_id}
            )
        )


def run_case(url: str, target: str, fault: str) -> tuple[str, dict[str, Any], str]:
    api = Api.connect(url)
    sku = make_product(stock=STOCK, price_cents=PRICE)
    placed = place(api, order_body(sku, quantity=QUANTITY))
    assert wait_final(api, placed["order_id"])["status"] == "confirmed"
    response = api.return_order(placed["order_id"], {"faults": faults_for(target, fault)})
    assert response.status_code == 202, response.text
    return sku, api.wait_returned(placed["order_id"], 120), placed["order_id"]


@pytest.mark.parametrize(
    "fault", [f"transient:{STEP_BUDGET - 1}", "always", "fail", "crash", f"hang:{HANG_S:g}"]
)
def test_every_fault_at_every_return_step(fault: str, system: Processes) -> None:
    targets = TARGETS if fault != "crash" else TARGETS[:1]  # one crash at a time, see below
    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        cases = dict(
            zip(targets, pool.map(lambda t: run_case(system.url, t, fault), targets), strict=True)
        )
    if fault == "crash":  # a crash kills a pool process: the other targets one after the other
        for target in TARGETS[1:]:
            cases[target] = run_case(system.url, target, fault)
    for target, (sku, view, order_id) in cases.items():
        want = expected(target, fault)
        saga = view["returns"][-1]
        where = f"{target} {fault}\n{describe({**view, 'saga': saga}, system.log_dir)}"
        assert (view["status"], saga["state"]) == (want.order, want.saga), where
        assert charges(order_id) == ["refunded" if want.refunded else "charged"], where
        sold = 0 if want.stock_back else QUANTITY
        assert product(sku) == {"available": STOCK - sold, "reserved": 0, "sold": sold}, where
        steps = {s["name"]: s for s in saga["steps"]}
        if want.refunded:  # after the pivot: nothing is ever compensated
            assert steps["orders.begin_return"]["compensation"]["status"] == "pending", where
        if fault == "always" and target != ABORT:
            budget = STEP_BUDGET
            assert steps[target]["attempts"] == budget, where
