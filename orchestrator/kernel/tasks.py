"""The orchestrator's Celery tasks: participant replies and the periodic sweep.

Like a web view: unpack, call the engine, return. Start with
``celery -A orchestrator.kernel.tasks worker -Q saga.orchestrator`` (``sagactl worker orchestrator``).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.exceptions import Reject
from sqlalchemy.exc import DBAPIError

from models.db import run_in_transaction
from orchestrator.kernel import engine, sweeper
from orchestrator.messaging.celery_app import app
from orchestrator.messaging.deadletters import DeadLetterIntake
from orchestrator.messaging.envelopes import PoisonMessage, parse_reply
from orchestrator.ops import failpoints, tracing
from orchestrator.ops.logs import log_context

log = logging.getLogger(__name__)

app.steps["consumer"].add(DeadLetterIntake)

# A database outage is retried for a while (about a minute); past that the reply is
# dead-lettered, recorded, and the step's deadline makes the sweeper ask again. Celery counts this
# backoff in whole seconds (int(max(1.0, backoff)) in celery/app/autoretry.py): 1, 2, 4, 8, 10...
# each an upper bound under jitter.
_DB_RETRY = {
    "autoretry_for": (DBAPIError,),
    "max_retries": 12,
    "retry_backoff": 1,
    "retry_backoff_max": 10,
    "retry_jitter": True,
}


@app.task(name="saga.reply", bind=True, **_DB_RETRY)
def reply(self: Task, envelope: Any) -> str:
    try:
        msg = parse_reply(envelope)
    except PoisonMessage as exc:
        raise Reject(str(exc), requeue=False) from exc
    body = msg.body
    tracing.tag(tracing.envelope_attributes(envelope, vars(self.request)))  # the run's span
    with log_context(saga_id=msg.saga_id, step=msg.type, request_id=msg.request_id):

        def work(session: Any) -> str:
            saga = engine.lock_saga(session, msg.saga_id)
            if saga is None:
                return "ignored (unknown saga)"
            return engine.on_reply(
                session,
                saga,
                msg.command,
                msg.request_id,
                msg.attempt,
                body.outcome,
                error=body.error or body.reason,
                retry_in_s=body.retry_in_s,
                sent_at=msg.sent_at,
            )

        result = run_in_transaction(work)
        failpoints.hit("orchestrator.after_commit")
        log.info("reply %s attempt %d: %s", body.outcome.value, msg.attempt, result)
        return result


@app.task(name="saga.sweep")
def sweep() -> dict[str, int]:
    report = sweeper.sweep()
    if report.sagas_acted_on or report.outbox_relayed:
        log.info("sweep: %s", report)
    return {"sagas": report.sagas_acted_on, "outbox": report.outbox_relayed}
