"""Publishing outbox rows right after their transaction commits, without waiting for the relay.

The contract lets the web and the orchestrator publish their own rows as a fast path; the relay
stays what guarantees delivery. Here:

- ``outbox.enqueue`` leaves the rows it wrote in ``session.info``; the ``after_commit`` hook below
  publishes them with publisher confirms on this process's connection. A rolled-back transaction
  publishes nothing.
- Marking a row sent is a write of its own. The process's next transaction carries the marks (one
  UPDATE for all waiting rows, just before its commit), so under load they cost no commit; marks
  that no transaction carried within ``MARK_EVERY_S`` get a transaction of their own.
- The relay leaves unsent rows younger than ``SAGA_OUTBOX_GRACE_S`` to their writer. A process that
  dies between commit and publish, or between publish and mark, leaves rows the relay publishes once
  they are older than that; a row published twice is harmless (participants are idempotent per
  saga and step, and a reply that is not awaited changes nothing).
- A broker that refuses or times out turns the fast path off for ``BACKOFF_S``, so a broker outage
  costs an order request one short connect attempt at most, not one per request.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

from models.db import transaction

log = logging.getLogger(__name__)

PENDING_KEY = "outbox.pending"
CARRIED_KEY = "outbox.carried_marks"
MARK_EVERY_S = 0.5
BACKOFF_S = 5.0
CONFIRM_TIMEOUT_S = 2.0


def enabled() -> bool:
    from orchestrator.ops.config import settings

    return settings().outbox_fast_path


Mark = tuple[Any, datetime]  # a published row's message id, and when it was published


class _Publisher:
    """One per process (re-created after a fork): a confirming channel and the marks to write."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._lock = threading.Lock()  # gunicorn's threads share the channel
        self._publisher: Any = None
        self._down_until = 0.0
        self._marks: list[Mark] = []
        self._oldest = 0.0  # when the oldest waiting mark was added (monotonic)
        self._marks_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def publish(self, pending: list[Any]) -> None:
        """Publish rows this process just committed (outbox rows: what ``outbox.to_wire`` reads)."""
        from orchestrator.messaging import outbox
        from orchestrator.ops import failpoints
        from orchestrator.ops.config import settings

        if time.monotonic() < self._down_until:
            return  # the relay will send them
        failpoints.hit(f"{_process()}.before_publish")
        with self._lock:
            if time.monotonic() < self._down_until:
                return  # another thread just found the broker down
            try:
                if self._publisher is None:
                    self._publisher = outbox.ConfirmingPublisher(
                        settings().broker_url, connect_timeout_s=1.0, source="fast_path"
                    )
                self._publisher.publish(
                    [outbox.to_wire(row) for row in pending], timeout_s=CONFIRM_TIMEOUT_S
                )
            except Exception as exc:  # never fail the committed work: the relay has the rows
                log.warning("fast path publish failed (%s); the relay will send them", exc)
                self._down_until = time.monotonic() + BACKOFF_S
                if self._publisher is not None:
                    self._publisher.close()
                self._publisher = None
                return
        failpoints.hit(f"{_process()}.after_publish")
        self.sent(pending)

    def sent(self, rows: list[Any]) -> None:
        """These rows were published (and confirmed) now: mark them sent, soon."""
        self.give_back([(row.message_id, datetime.now(UTC)) for row in rows])
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._flush_idle, name="outbox-marks", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        """Drop the connection (and the backoff): the next publish connects anew."""
        with self._lock:
            if self._publisher is not None:
                self._publisher.close()
            self._publisher = None
            self._down_until = 0.0

    def take(self) -> list[Mark]:
        with self._marks_lock:
            marks, self._marks = self._marks, []
        return marks

    def give_back(self, marks: list[Mark]) -> None:
        with self._marks_lock:
            if not self._marks:
                self._oldest = time.monotonic()
            self._marks.extend(marks)

    def _flush_idle(self) -> None:
        """Marks no transaction of this process carried within MARK_EVERY_S get one of their own."""
        while True:
            time.sleep(MARK_EVERY_S / 2)
            if self._marks and time.monotonic() - self._oldest >= MARK_EVERY_S:
                self.flush()

    def flush(self) -> None:
        marks = self.take()
        if not marks:
            return
        try:
            with transaction() as session:
                session.execute(_MARK_SENT, _mark_params(marks))
        except Exception as exc:
            # Kept for the next round; if this process dies first the relay sends them again.
            log.warning("marking %d outbox rows sent failed: %s", len(marks), exc)
            self.give_back(marks)


_MARK_SENT = sa.text(
    "UPDATE outbox SET sent_at = v.at"
    " FROM unnest(CAST(:ids AS uuid[]), CAST(:ats AS timestamptz[])) AS v(message_id, at)"
    " WHERE outbox.message_id = v.message_id AND outbox.sent_at IS NULL"
)


def _mark_params(marks: list[Mark]) -> dict[str, list[Any]]:
    """sent_at is when the row was published, unless the relay got there first."""
    return {"ids": [m for m, _ in marks], "ats": [at for _, at in marks]}


_current: _Publisher | None = None
_current_lock = threading.Lock()


def _publisher() -> _Publisher:
    global _current
    with _current_lock:
        if _current is None or _current.pid != os.getpid():
            _current = _Publisher()
        return _current


def reset() -> None:
    """This process now talks to another broker and database (a test switching sandboxes): write
    the sent marks it owes the old one, then forget its publisher, connection and backoff."""
    global _current
    with _current_lock:
        old, _current = _current, None
    if old is not None and old.pid == os.getpid():
        old.flush()
        old.close()


def _process() -> str:
    from orchestrator.ops.config import settings

    return settings().process or "process"


def take_pending(session: Session) -> list[Any]:
    """The rows this transaction enqueued, taken from the after-commit publish: the caller
    publishes them itself once the transaction committed (a batch, with its own publisher), and
    then tells ``published``."""
    rows: list[Any] = session.info.pop(PENDING_KEY, [])
    return rows


def published(rows: list[Any]) -> None:
    """Rows their writer published itself (``take_pending``): their sent marks ride along in this
    process's next transaction, as the fast path's own do."""
    if rows:
        _publisher().sent(rows)


def flush() -> None:
    """Write waiting sent marks now (at a clean exit, so the relay need not send them again)."""
    here = _here()
    if here:
        here.flush()


atexit.register(flush)


def _here() -> _Publisher | None:
    return _current if _current is not None and _current.pid == os.getpid() else None


@event.listens_for(Session, "before_commit")
def _carry_marks(session: Session) -> None:
    """A transaction that commits anyway also writes this process's waiting sent marks: under
    load they cost no commit of their own."""
    here = _here()
    marks = here.take() if here else []
    if marks:
        session.execute(_MARK_SENT, _mark_params(marks))
        session.info[CARRIED_KEY] = marks


@event.listens_for(Session, "after_commit")
def _publish_after_commit(session: Session) -> None:
    session.info.pop(CARRIED_KEY, None)
    pending: list[Any] = session.info.pop(PENDING_KEY, [])
    if pending:
        _publisher().publish(pending)


@event.listens_for(Session, "after_rollback")
def _forget_after_rollback(session: Session) -> None:
    session.info.pop(PENDING_KEY, None)
    carried = session.info.pop(CARRIED_KEY, None)
    here = _here()
    if carried and here:
        here.give_back(carried)
