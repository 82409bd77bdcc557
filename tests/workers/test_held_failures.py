"""A transient failure while the command's service is paused is answered as held, not retried: the
verdict the batch consumer and the one-message task both act on (workers/applying.py, failed)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import workers.payment  # noqa: F401  (registers the payment handlers)
from models.db import transaction
from models.services import ServiceState
from orchestrator.kernel import service_states
from orchestrator.messaging.envelopes import (
    ChargePayload,
    ReplyOutcome,
    RetrySpec,
    make_command,
    parse_command,
)
from workers.applying import Incoming, Verdict, apply_alone

RETRY = RetrySpec(attempts=3, base_s=0.05, max_s=0.2)


@pytest.fixture(autouse=True)
def payment_running_after() -> Iterator[None]:
    yield
    with transaction() as session:
        session.execute(sa.update(ServiceState).values(state="running"))


def pause(hold_compensations: bool = True) -> None:
    with transaction() as session:
        service_states.pause(session, "payment", "test", None, hold_compensations)


def failing(command: str = "payment.charge", step: str = "payment.charge") -> Verdict:
    """One attempt of ``command`` with the fault ``always`` (a transient error every time)."""
    payload = ChargePayload(
        order_id=uuid.uuid4(), amount_cents=500, card_token="tok_visa", retry=RETRY, fault="always"
    )
    envelope = make_command(
        command, saga_id=uuid.uuid4(), request_id=uuid.uuid4(), step=step, attempt=1,
        payload=payload,
    )
    return apply_alone(Incoming(parse_command(envelope)))


def test_a_transient_failure_of_a_running_service_is_retried() -> None:
    verdict = failing()
    assert verdict.reply is not None and verdict.reply.outcome is ReplyOutcome.RETRYING
    assert verdict.retry_in_s is not None and not verdict.reply.held


def test_a_transient_failure_while_paused_is_answered_held_and_not_retried() -> None:
    pause()
    verdict = failing()
    assert verdict.reply is not None and verdict.reply.outcome is ReplyOutcome.RETRYING
    assert verdict.reply.held and verdict.retry_in_s is None and verdict.error is None
    assert verdict.reply.error == "TransientError: injected fault: always"


def test_a_compensation_that_the_pause_lets_through_retries_as_usual() -> None:
    pause(hold_compensations=False)
    verdict = failing("payment.refund")
    assert verdict.reply is not None and not verdict.reply.held
    assert verdict.retry_in_s is not None
