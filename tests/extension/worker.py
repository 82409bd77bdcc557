"""The ``points`` and ``ledger`` services' handlers: ``sagactl worker points`` (or ``ledger``)
runs ``celery -A tests.extension.worker`` on its own queue.

Each handler records its effect under the saga id, in the same transaction, so a redelivery
replies the recorded outcome and changes nothing (the pattern of workers/).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from orchestrator.messaging.celery_app import app
from orchestrator.messaging.envelopes import Command
from tests.extension.loyalty import AwardPayload, MemberPayload, PostPayload
from tests.extension.loyalty_v2 import BonusPayload
from tests.extension.tables import Award, Posting
from workers.participant import Result, participant

__all__ = ["app", "award", "bonus", "post", "revoke"]

LEDGER_LIMIT_CENTS = 50_000  # a posting over this is refused (a business "no")


def _claim(session: Session, model: type[Award] | type[Posting], **values: object) -> bool:
    inserted = session.scalar(
        insert(model).values(**values).on_conflict_do_nothing().returning(model.saga_id)
    )
    return inserted is not None


@participant("points.award")
def award(session: Session, command: Command, payload: AwardPayload) -> Result:
    if _claim(
        session,
        Award,
        saga_id=command.saga_id,
        member=payload.member,
        points=payload.points,
        status="awarded",
    ):
        return Result(True, applied_now=True)
    row = session.get(Award, command.saga_id, with_for_update=True)
    assert row is not None
    return Result(row.status == "awarded", None if row.status == "awarded" else "fenced")


@participant("points.revoke")
def revoke(session: Session, command: Command, payload: MemberPayload) -> Result:
    """revoke_if_awarded: takes the points back; fences an award not seen yet."""
    if _claim(
        session, Award, saga_id=command.saga_id, member=payload.member, points=0, status="voided"
    ):
        return Result(True, applied_now=True)
    session.execute(
        sa.update(Award)
        .where(Award.saga_id == command.saga_id, Award.status == "awarded")
        .values(status="revoked")
    )
    return Result(True, applied_now=True)


@participant("ledger.post")
def post(session: Session, command: Command, payload: PostPayload) -> Result:
    accepted = payload.cost_cents <= LEDGER_LIMIT_CENTS
    _claim(
        session, Posting, saga_id=command.saga_id, cost_cents=payload.cost_cents, accepted=accepted
    )
    row = session.get(Posting, command.saga_id)
    assert row is not None
    return Result(row.accepted, None if row.accepted else "over the ledger limit", applied_now=True)


@participant("points.bonus")
def bonus(session: Session, command: Command, payload: BonusPayload) -> Result:
    session.execute(
        sa.update(Award).where(Award.saga_id == command.saga_id).values(bonus=payload.bonus)
    )
    return Result(True, applied_now=True)
