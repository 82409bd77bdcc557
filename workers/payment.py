"""The payment service: charge the order total; refund it (when the order saga turns back, or when
the order is returned). Test cards: only ``tok_visa`` pays.

Run: ``sagactl worker payment``. One charge row per saga (its primary key) records the outcome.
"""

import sqlalchemy as sa
from sqlalchemy.orm import Session

from models.enums import ChargeStatus, Reason
from models.participants import Charge
from orchestrator.messaging.celery_app import app
from orchestrator.messaging.envelopes import ChargePayload, Command, OrderPayload
from workers import records
from workers.participant import Result, participant

__all__ = ["app", "charge", "refund", "return_refund"]

APPROVED_TOKENS = frozenset({"tok_visa"})


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
    if records.claim(
        session,
        Charge,
        command,
        status=status,
        amount_cents=payload.amount_cents,
        card_last4=payload.card_token[-4:],
    ):
        return _as_result(status, applied_now=True)
    return _as_result(records.locked(session, Charge, command).status)


@participant("payment.refund")
def refund(session: Session, command: Command, payload: OrderPayload) -> Result:
    """refund_if_charged: refunds a charge; fences a charge that has not arrived yet."""
    if records.claim(
        session, Charge, command, status=ChargeStatus.VOIDED, amount_cents=0, card_last4=""
    ):
        return Result(True, applied_now=True)
    row = records.locked(session, Charge, command)
    if row.status is not ChargeStatus.CHARGED:
        return Result(True)
    row.status = ChargeStatus.REFUNDED
    row.refunded_at = sa.func.now()
    return Result(True, applied_now=True)


@participant("payment.return_refund")
def return_refund(session: Session, command: Command, payload: OrderPayload) -> Result:
    """Refund the charge the order saga made for this order (found by the order), once."""
    row = session.scalars(
        sa.select(Charge)
        .where(
            Charge.order_id == payload.order_id,
            Charge.status.in_([ChargeStatus.CHARGED, ChargeStatus.REFUNDED]),
        )
        .with_for_update()
    ).first()
    if row is None:
        return Result(False, "no charge of this order to refund")
    if row.status is ChargeStatus.REFUNDED:
        return Result(True)  # a redelivery: refunded already
    row.status = ChargeStatus.REFUNDED
    row.refunded_at = sa.func.now()
    return Result(True, applied_now=True)
