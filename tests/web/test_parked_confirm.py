"""A confirm that gave up at its deadline parks its saga (the order fails); its late success then
completes the saga, and the order is confirmed again (seen in a chaos run under overload: order
failed, saga completed, the order's stock sold)."""

from __future__ import annotations

import uuid

from flask.testing import FlaskClient

from models.db import transaction
from models.enums import Reason
from orchestrator.kernel import engine
from orchestrator.messaging.envelopes import ReplyOutcome
from orchestrator.registry import TimelineEvent as E
from tests.web.drive import answer, body, place

CONFIRM = "orders.confirm"
JSON = {"Accept": "application/json"}


def _give_up_on_confirm(saga_id: str) -> None:
    """What the sweeper does when the confirm's last attempt passes its deadline."""
    with transaction() as session:
        saga = engine.lock_saga(session, uuid.UUID(saga_id))
        assert saga is not None
        index = engine.registered_of(saga).definition.index(CONFIRM)
        request_id = saga.steps[index].phase("action").request_id
        assert engine.on_exhausted(
            session, saga, CONFIRM, request_id, "no reply", cause=E.STEP_TIMED_OUT,
            reason=Reason.TIMEOUT,
        )


def test_a_parked_confirm_that_succeeds_late_confirms_its_order(client: FlaskClient) -> None:
    placed = place(client)
    saga_id, order_id = placed["saga_id"], placed["order_id"]
    answer(saga_id, ReplyOutcome.SUCCEEDED)  # reserved
    answer(saga_id, ReplyOutcome.SUCCEEDED)  # charged
    _give_up_on_confirm(saga_id)
    parked = body(client.get(f"/orders/{order_id}", headers=JSON))
    assert (parked["status"], parked["saga"]["state"]) == ("failed", "failed")
    assert answer(saga_id, ReplyOutcome.SUCCEEDED) == "completed"  # the late success
    final = body(client.get(f"/orders/{order_id}", headers=JSON))
    assert (final["status"], final["reason"], final["saga"]["state"]) == (
        "confirmed", None, "completed",
    )
