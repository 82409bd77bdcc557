"""The web's publishing thread (group confirm) dies at the points that matter: a web process
SIGKILLed after an order's commit and before its command is published, or after the publish and
before the row is marked sent. The relay sends the committed row after the grace period; the
order completes once. A fail point kills the gunicorn worker that reaches it, as SIGKILL would."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import requests

from orchestrator.ops import failpoints
from orchestrator.ops.metrics_dir import alive
from orchestrator.proof.client import Api
from orchestrator.proof.harness import Processes
from tests.integration.helpers import make_product, order_body, product, wait_final
from tests.integration.test_crashes import arm, charged, effects, unsent, wait_until


def _place_surely(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    """The worker may die before its answer leaves: the client retries with the same key."""
    key = f"crash-{uuid.uuid4()}"
    for _ in range(10):
        try:
            r = api.place(body, key)
        except requests.RequestException:  # reset, or cut mid-answer
            continue
        if r.status_code in (200, 202):
            return dict(r.json())
    raise AssertionError("the order was never answered")


@pytest.mark.parametrize("point", ["web.before_publish", "web.after_publish"])
def test_web_killed_around_its_publish_loses_nothing_and_duplicates_harmlessly(
    api: Api, system: Processes, point: str
) -> None:
    sku = make_product(stock=5, price_cents=300)
    marker = arm(point)
    placed = _place_surely(api, order_body(sku, quantity=1))
    wait_until(lambda: not marker.exists(), what="the fail point to fire")
    killed = failpoints.fired_pids(marker.parent)
    wait_until(lambda: not any(alive(pid) for pid in killed), what="the worker to be gone")
    api.session.close()  # its kept-alive connection may lead to the dead worker
    view = wait_final(api, placed["order_id"])
    assert (view["status"], view["saga"]["state"]) == ("confirmed", "completed")
    wait_until(lambda: unsent(placed["saga_id"]) == 0, what="every command to be marked sent")
    assert effects(placed["saga_id"]) == {"reservations": 1, "charges": 1}
    assert charged(placed["saga_id"]) == 300
    assert product(sku) == {"available": 4, "reserved": 0, "sold": 1}
