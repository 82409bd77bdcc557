"""Returns end to end on the real system: the refund once, the stock back, the order returned; the
orders that cannot be returned; a fault after the pivot parks and an operator finishes it; two
returns at once make one saga."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
import sqlalchemy as sa

from models.db import transaction
from orchestrator.ops import config
from orchestrator.proof.client import Api
from orchestrator.proof.harness import Processes
from tests.conftest import TEST_TIMINGS
from tests.integration.helpers import (
    assert_in_order,
    describe,
    make_product,
    order_body,
    place,
    product,
    wait_final,
)

STEP_BUDGET = int(TEST_TIMINGS["SAGA_RETRY_ATTEMPTS"])
STOCK, QUANTITY, PRICE = 5, 2, 150


def charges_of(order_id: str) -> list[dict[str, Any]]:

    with transaction() as session:
        rows = session.execute(
            sa.text("SELECT * FROM charges WHERE order_id = :o"), {"o": order_id}
        ).mappings()
        return [dict(r) for r in rows]


def confirmed_order(api: Api, sku: str) -> dict[str, Any]:
    placed = place(api, order_body(sku, quantity=QUANTITY))
    view = wait_final(api, placed["order_id"])
    assert view["status"] == "confirmed", describe(view)
    return view


def timeline(saga: dict[str, Any]) -> list[tuple[str, str | None]]:
    return [(e["event"], e["step"]) for e in saga["timeline"]]


def test_a_confirmed_order_is_returned_refunded_once_with_its_stock_back(api: Api) -> None:
    sku = make_product(stock=STOCK, price_cents=PRICE)
    order = confirmed_order(api, sku)
    assert product(sku) == {"available": STOCK - QUANTITY, "reserved": 0, "sold": QUANTITY}
    response = api.return_order(order["order_id"], {"reason": "does not fit"})
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "returning"
    view = api.wait_returned(order["order_id"], 60)
    [saga] = view["returns"]
    assert (view["status"], saga["state"]) == ("returned", "completed"), describe(view)
    assert [(s["name"], s["status"]) for s in saga["steps"]] == [
        ("orders.begin_return", "succeeded"),
        ("payment.return_refund", "succeeded"),
        ("inventory.return_stock", "succeeded"),
        ("orders.complete_return", "succeeded"),
    ]
    charges = charges_of(order["order_id"])
    assert [(c["status"], c["amount_cents"]) for c in charges] == [("refunded", QUANTITY * PRICE)]
    assert product(sku) == {"available": STOCK, "reserved": 0, "sold": 0}
    assert view["saga"]["state"] == "completed"  # the order saga is untouched
    again = api.return_order(order["order_id"])
    assert (again.status_code, again.json()["error"]["code"]) == (409, "not_returnable")


def test_orders_that_are_not_confirmed_are_not_returnable(api: Api) -> None:
    sku = make_product(stock=1, price_cents=PRICE)
    held = place(api, order_body(sku, faults={"inventory.reserve": "hang:6"}))
    out_of_stock = place(api, order_body(sku, quantity=2))
    cancelled = wait_final(api, out_of_stock["order_id"])
    assert cancelled["status"] == "cancelled"
    for order_id in (held["order_id"], cancelled["order_id"]):
        response = api.return_order(order_id)
        assert (response.status_code, response.json()["error"]["code"]) == (409, "not_returnable")
    assert api.order(held["order_id"])["status"] == "pending"
    wait_final(api, held["order_id"])


def test_a_fault_after_the_pivot_parks_never_unrefunds_and_an_operator_finishes_it(
    api: Api, system: Processes
) -> None:
    sku = make_product(stock=STOCK, price_cents=PRICE)
    order = confirmed_order(api, sku)
    # Fails every attempt of the first budget; the operator's retry (attempt budget + 1) passes.
    fault = f"transient:{STEP_BUDGET}"
    response = api.return_order(order["order_id"], {"faults": {"inventory.return_stock": fault}})
    assert response.status_code == 202, response.text
    view = api.wait_returned(order["order_id"], 90)
    [saga] = view["returns"]
    assert (view["status"], saga["state"]) == ("returning", "failed"), describe(view)
    steps = {s["name"]: s for s in saga["steps"]}
    assert steps["payment.return_refund"]["status"] == "succeeded"
    assert steps["inventory.return_stock"]["status"] == "failed"
    assert steps["inventory.return_stock"]["attempts"] == STEP_BUDGET  # retried, then parked
    assert steps["orders.begin_return"]["compensation"]["status"] == "pending"  # never undone
    events = timeline(saga)
    assert ("step.retried", "inventory.return_stock") in events
    assert ("step.dead_lettered", "inventory.return_stock") in events
    assert not any(e.startswith("compensation.") for e, _ in events)
    assert [c["status"] for c in charges_of(order["order_id"])] == ["refunded"]
    assert product(sku)["sold"] == QUANTITY  # the stock is not back yet

    cfg = config.settings()
    admin = requests.Session()
    admin.auth = (cfg.admin_user, cfg.admin_password.get_secret_value())
    answer = admin.post(
        f"{system.url}/admin/sagas/{saga['saga_id']}/retry",
        json={"note": "stock service fixed"},
        timeout=10,
    )
    assert answer.status_code == 202, answer.text
    assert answer.json()["state"] == "running"
    view = api.wait_returned(order["order_id"], 60)
    [saga] = view["returns"]
    assert (view["status"], saga["state"]) == ("returned", "completed"), describe(view)
    assert_in_order(
        {"saga": saga},
        [
            ("step.dead_lettered", "inventory.return_stock"),
            ("operator.retry", None),
            ("step.dispatched", "inventory.return_stock"),
            ("step.succeeded", "inventory.return_stock"),
            ("step.succeeded", "orders.complete_return"),
            ("saga.completed", None),
        ],
    )
    assert [c["status"] for c in charges_of(order["order_id"])] == ["refunded"]
    assert product(sku) == {"available": STOCK, "reserved": 0, "sold": 0}
    compensate = admin.post(
        f"{system.url}/admin/sagas/{saga['saga_id']}/compensate", json={}, timeout=10
    )
    assert compensate.status_code == 409


def test_two_concurrent_returns_of_one_order_make_one_saga(api: Api, system: Processes) -> None:
    sku = make_product(stock=STOCK, price_cents=PRICE)
    order = confirmed_order(api, sku)
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(
            pool.map(lambda _: Api.connect(system.url).return_order(order["order_id"]), range(2))
        )
    assert sorted(a.status_code for a in answers) == [202, 409], [a.text for a in answers]
    view = api.wait_returned(order["order_id"], 60)
    assert len(view["returns"]) == 1 and view["status"] == "returned"
    assert [c["status"] for c in charges_of(order["order_id"])] == ["refunded"]
