"""The orchestrator killed at the boundaries of a batch of replies (orchestrator/messaging/batches.py):
before the batch's commit, between its commit and its publish, between its publish and its acks.

Each is a real SIGKILL of the orchestrator's pool process that holds the batch (a fail point), in
a batch of at least two replies: the replies of many sagas wait while the orchestrator is away,
and the fail point is armed with ``batch>=2``, so it can only fire in a batch of two or more.
Every saga still ends confirmed, with one reservation and one charge. Beat is paused throughout:
no sweep re-sends anything, so what carries the sagas on is the broker's redelivery of the
unacked batch (and the relay, for committed commands), never a step's deadline.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sqlalchemy as sa

from models.db import transaction
from orchestrator.ops import failpoints
from orchestrator.proof.client import Api
from orchestrator.proof.harness import Processes
from tests.integration.helpers import make_product, order_body, place, product
from tests.integration.test_admin_flow import beat_paused
from tests.integration.test_crashes import arm, charged, effects, unsent, wait_until

SAGAS = 10


def fired(point: str) -> list[str]:
    record = Path(os.environ["SAGA_FAILPOINTS_DIR"]) / failpoints.FIRED
    lines = record.read_text(encoding="utf-8").splitlines() if record.exists() else []
    return [line for line in lines if line.split(" ")[0] == point]


def reserved(saga_ids: list[str]) -> int:
    with transaction() as session:
        count = session.scalar(
            sa.text("SELECT count(*) FROM reservations WHERE saga_id = ANY(CAST(:s AS uuid[]))"),
            {"s": saga_ids},
        )
    return int(count or 0)


@pytest.mark.parametrize(
    "point",
    [
        "orchestrator.before_commit",  # applied in the session, not committed: all redelivered
        "orchestrator.before_publish",  # committed, not published: the relay sends the commands
        "orchestrator.after_commit",  # published, not acked: redelivered, and ignored
    ],
)
def test_the_orchestrator_killed_in_a_batch_of_replies_loses_and_repeats_nothing(
    point: str, api: Api, system: Processes
) -> None:
    sku = make_product(stock=100, price_cents=200)
    with beat_paused(system):
        system.kill("orchestrator")  # the replies wait for it: its first batch holds many
        placed = [place(api, order_body(sku)) for _ in range(SAGAS)]
        saga_ids = [p["saga_id"] for p in placed]
        wait_until(lambda: reserved(saga_ids) == SAGAS, what="every reservation made and replied")
        before = len(fired(point))
        marker = arm(point, in_batch_of=2)
        system.start("orchestrator")
        wait_until(lambda: not marker.exists(), what=f"{point} to fire in a batch of two or more")
        assert len(fired(point)) == before + 1
        views = api.wait_final([p["order_id"] for p in placed], timeout_s=90)
        assert {v["status"] for v in views.values()} == {"confirmed"}
        for saga_id in saga_ids:
            assert effects(saga_id) == {"reservations": 1, "charges": 1}
            assert charged(saga_id) == 200
        assert product(sku) == {"available": 100 - SAGAS, "reserved": 0, "sold": SAGAS}
        assert system.alive("orchestrator")  # only the pool process died; Celery replaced it
        wait_until(
            lambda: sum(unsent(s) for s in saga_ids) == 0, what="every command to be marked sent"
        )
