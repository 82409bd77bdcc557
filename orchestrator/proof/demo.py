"""``sagactl demo``: a mix of orders against a running system, and how each one ended."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from orchestrator.proof.client import Api

# (label, order body, what should happen)
SCENARIOS: tuple[tuple[str, dict[str, Any], str], ...] = (
    (
        "happy path",
        {"items": [{"sku": "SKU-APPLE", "quantity": 2}], "payment": {"card_token": "tok_visa"}},
        "confirmed",
    ),
    (
        "two lines",
        {
            "items": [{"sku": "SKU-BANANA", "quantity": 3}, {"sku": "SKU-PEAR", "quantity": 1}],
            "payment": {"card_token": "tok_visa"},
        },
        "confirmed",
    ),
    (
        "out of stock",
        {"items": [{"sku": "SKU-CHERRY", "quantity": 1000}], "payment": {"card_token": "tok_visa"}},
        "cancelled/out_of_stock",
    ),
    (
        "card declined",
        {
            "items": [{"sku": "SKU-APPLE", "quantity": 1}],
            "payment": {"card_token": "tok_chargeDeclined"},
        },
        "cancelled/payment_declined",
    ),
    (
        "returned",  # confirmed, then returned: refunded, stock back on the shelf
        {"items": [{"sku": "SKU-PEAR", "quantity": 1}], "payment": {"card_token": "tok_visa"}},
        "returned",
    ),
)
RETURNED = {label for label, _, expected in SCENARIOS if expected == "returned"}


def run(url: str, count: int, timeout_s: float, say: Any, as_json: bool) -> dict[str, Any]:
    api = Api.connect(url)
    placed: list[tuple[str, str, str]] = []
    started = time.monotonic()
    for i in range(count):
        label, body, expected = SCENARIOS[i % len(SCENARIOS)]
        response = api.place({"customer_id": f"demo-{i}", **body})
        if response.status_code != 202:
            raise RuntimeError(f"order {i} refused: {response.status_code} {response.text[:200]}")
        placed.append((response.json()["order_id"], label, expected))
        if not as_json:
            say(f"\rplaced {i + 1}/{count}", nl=False)
    if not as_json:
        say("")

    def progress(done: int, total: int) -> None:
        if not as_json:
            say(f"\rwaiting: {done}/{total} final", nl=False)

    views = api.wait_final([p[0] for p in placed], timeout_s, progress)
    if not as_json:
        say("")
    for order_id, label, _ in placed:
        if label in RETURNED and views[order_id]["status"] == "confirmed":
            api.return_order(order_id, {"reason": "demo: changed my mind"})
            views[order_id] = api.wait_returned(order_id, timeout_s)
    elapsed = time.monotonic() - started
    results = []
    for order_id, label, expected in placed:
        view = views[order_id]
        got = view["status"] + (f"/{view['reason']}" if view["reason"] else "")
        results.append(
            {
                "order_id": order_id,
                "scenario": label,
                "expected": expected,
                "outcome": got,
                "as_expected": got == expected,
            }
        )
        if not as_json:
            mark = "ok " if got == expected else "!! "
            say(f"{mark}{order_id}  {label:<14} -> {got}")
    tally = Counter(r["outcome"].split("/")[0] for r in results)
    summary = {
        "orders": count,
        "seconds": round(elapsed, 2),
        "outcomes": dict(tally),
        "as_expected": sum(r["as_expected"] for r in results),
        "results": results,
    }
    if not as_json:
        say(
            f"{count} orders in {elapsed:.1f}s: "
            + ", ".join(f"{k} {v}" for k, v in tally.items())
            + f"; {summary['as_expected']}/{count} as expected"
        )
    return summary
