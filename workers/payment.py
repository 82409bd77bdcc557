"""The payment service: charge the order total; refund it. Test cards: only ``tok_visa`` pays.

Run: ``sagactl worker payment``. One charge row per saga (its primary key) records the outcome.
"""

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from models.enums import ChargeStatus, Reason
from models.participants import Charge
from orchestrator.celery_app import app
from orchestrator.messages import ChargePayload, Command, CommandPayload
from workers.participant import Result, participant

__all__ = ["app", "charge", "refund"]

APPROVED_TOKENS = frozenset({"tok_visa"})


def _claim(
    session: Session, command: Command, status: ChargeStatus, amount: int, last4: str
) -> bool:
    inserted = session.scalar(
        insert(Charge)
        .values(
            saga_id=command.saga_id,
            order_id=command.typed_payload().order_id,
            status=status,
            amount_cents=amount,
            card_last4=last4,
        )
        .on_conflict_do_nothing(index_elements=["saga_id"])
        .returning(Charge.saga_id)
    )
    return inserted is not None


def _existing(session: Session, command: Command) -> Charge:
    row = session.get(Charge, command.saga_id, with_for_update=True, populate_existing=True)
    assert row is not None
    return row


def _as_result(status: ChargeStatus, applied_now: bool = False) -> Result:
    if status is ChargeStatus.CHARGED:
        return Result(True, applied_now=applied_now)
    if status is ChargeStatus.DECLINED:
        return Result(False, Reason.PAYMENT_DECLINED.value, applied_now=applied_now)
    return Result(False, "fenced: refunded before this charge arrived")


@participant("payment.charge")
def charge(session: Session, command: Command, payload: ChargePayload) -> Result:
    approved = payload.card_token in APPROVED_TOKENS
    status = ChargeStatus.CHARGED if approved else ChargeStatus.DECLINED
    if _claim(session, command, status, payload.amount_cents, payload.card_token[-4:]):
        return _as_result(status, applied_now=True)
    return _as_result(_existing(session, command).status)


@participant("payment.refund")
def refund(session: Session, command: Command, payload: CommandPayload) -> Result:
    """refund_if_charged: refunds a charge; fences a charge that has not arrived yet."""
    if _claim(session, command, ChargeStatus.VOIDED, 0, ""):
        return Result(True, applied_now=True)
    row = _existing(session, command)
    if row.status is not ChargeStatus.CHARGED:
        return Result(True)
    row.status = ChargeStatus.REFUNDED
    row.refunded_at = sa.func.now()
    return Result(True, applied_now=True)
