"""Applying participant replies: one, or a batch of them in one transaction (group commit).

A batch locks all of its sagas at once, in id order (``engine.lock_sagas``), applies each reply
through ``engine.on_reply`` in the order the replies came (several for one saga see each other's
changes), and commits once: the changed rows go out in the ORM's grouped UPDATEs, the timeline in
one INSERT, the commands' outbox rows in one INSERT (``outbox.defer_inserts``). The commands are
then the caller's to publish (``Applied.publish``): see ``tasks.on_batch``. Once committed, the
replies are the circuit breaker's evidence (``observe``): counted once, however often their
transaction was run. With tracing on, each reply is applied with its own run span current
(``spans``), so the commands it dispatches are children of it, in its saga's trace.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from models.db import run_in_transaction
from models.sagas import Saga
from orchestrator.kernel import breaker, engine
from orchestrator.messaging import fastpath, outbox
from orchestrator.messaging.envelopes import Reply
from orchestrator.ops import failpoints, tracing
from orchestrator.ops.logs import log_context

log = logging.getLogger(__name__)

UNKNOWN_SAGA = "ignored (unknown saga)"


def apply_reply(session: Session, saga: Saga, msg: Reply) -> str:
    """One reply to its locked saga; what happened, for the log."""
    body = msg.body
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
        held=body.held,  # a transient failure while its service is paused: it waits again
    )


def observe(msg: Reply) -> None:
    """A committed reply of a known saga, as its service's circuit breaker counts it."""
    breaker.observe(msg.command, msg.body.outcome, held=msg.body.held)


def log_applied(msg: Reply, result: str) -> None:
    with log_context(saga_id=msg.saga_id, step=msg.type, request_id=msg.request_id):
        log.info("reply %s attempt %d: %s", msg.body.outcome.value, msg.attempt, result)


@dataclass
class Applied:
    """What a committed batch did: each reply's result (None: not applied, see ``refused``),
    the commands to publish now, and the replies that could not be applied at all."""

    results: list[str | None]
    publish: list[Any] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)  # index in the batch -> why


def apply_batch(replies: list[Reply], spans: list[Any] | None = None) -> Applied:
    """Apply the replies in one transaction (rerun as a whole on a deadlock or a lost
    connection); a reply for an unknown saga, or naming a command its saga does not know, is
    refused on its own and the others still apply. ``spans``: each reply's run span (tracing)."""

    def work(session: Session) -> Applied:
        outbox.defer_inserts(session)
        sagas = engine.lock_sagas(session, [msg.saga_id for msg in replies])
        applied = Applied(results=[])
        for i, msg in enumerate(replies):
            saga = sagas.get(msg.saga_id)
            if saga is None:
                applied.results.append(None)
                applied.refused[i] = UNKNOWN_SAGA
                continue
            try:
                with tracing.current(spans[i] if spans else None):
                    applied.results.append(apply_reply(session, saga, msg))
            except LookupError as exc:  # raised before the saga was touched (by_command)
                applied.results.append(None)
                applied.refused[i] = f"not a command of saga {saga.id}: {exc}"
        failpoints.hit("orchestrator.before_commit", batch=len(replies))
        applied.publish = fastpath.take_pending(session)  # published after the commit
        return applied

    return run_in_transaction(work)
