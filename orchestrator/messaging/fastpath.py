"""Publishing outbox rows right after their transaction commits, without waiting for the relay.

The contract lets the web and the orchestrator publish their own rows as a fast path; the relay
stays what guarantees delivery. Here:

- ``outbox.enqueue`` leaves the rows it wrote in ``session.info``; the ``after_commit`` hook below
  publishes them with publisher confirms on this process's connection. A rolled-back transaction
  publishes nothing. A writer without a Session (the web's one-statement order) calls
  ``publish_committed`` itself and carries the marks in its statement (``take_marks``).
- ``publish_in_background`` (the web, the bench's direct mode): the rows go to one publishing
  thread per process that confirms every row waiting at that moment in one batch (group
  confirm); the committing thread does not wait for the broker.
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
                session.execute(_MARK_SENT, mark_params(marks))
        except Exception as exc:
            # Kept for the next round; if this process dies first the relay sends them again.
            log.warning("marking %d outbox rows sent failed: %s", len(marks), exc)
            self.give_back(marks)


MARK_SENT_SQL = (
    "UPDATE outbox SET sent_at = v.at"
    " FROM unnest(CAST(:mark_ids AS uuid[]), CAST(:mark_ats AS timestamptz[]))"
    " AS v(message_id, at)"
    " WHERE outbox.message_id = v.message_id AND outbox.sent_at IS NULL"
)
_MARK_SENT = sa.text(MARK_SENT_SQL)


def mark_params(marks: list[Mark]) -> dict[str, list[Any]]:
    """sent_at is when the row was published, unless the relay got there first."""
    return {"mark_ids": [m for m, _ in marks], "mark_ats": [at for _, at in marks]}


class _Background:
    """Group confirm: one thread per process publishes what the request threads committed, every
    row waiting at that moment in one batch with pipelined confirms, so a request answers right
    after its commit instead of waiting for its own confirm. Rows it never gets to (the process
    died, the broker is down, more than MAX_WAITING wait) are the relay's after the grace period."""

    MAX_WAITING = 5000
    BATCH = 500

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._waiting: list[Any] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="outbox-publisher", daemon=True)
        self._thread.start()

    def submit(self, pending: list[Any]) -> None:
        with self._cond:
            if len(self._waiting) + len(pending) > self.MAX_WAITING:
                log.warning("fast path: %d rows waiting; the relay will send these %d",
                            len(self._waiting), len(pending))
                return
            self._waiting.extend(pending)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting:
                    self._cond.wait()
                batch = self._waiting[: self.BATCH]
                del self._waiting[: self.BATCH]
            _publisher().publish(batch)  # never raises: a failure leaves the rows to the relay


_current: _Publisher | None = None
_current_lock = threading.Lock()
_background: _Background | None = None
_in_background = {"on": False}


def publish_in_background() -> None:
    """This process's writers hand their committed rows to one publishing thread (the web and
    the bench's direct mode: many request threads, one connection; see _Background)."""
    _in_background["on"] = True


def publish_committed(pending: list[Any]) -> None:
    """Rows whose transaction just committed: publish them now, or hand them to the thread."""
    global _background
    if not pending:
        return
    if not _in_background["on"]:
        _publisher().publish(pending)
        return
    with _current_lock:
        if _background is None or _background.pid != os.getpid():
            _background = _Background()
        background = _background
    background.submit(pending)


def take_marks() -> list[Mark]:
    """The sent marks waiting in this process, for a statement that carries them."""
    here = _here()
    return here.take() if here else []


def give_back_marks(marks: list[Mark]) -> None:
    """Marks a failed statement did not carry: kept for the next one."""
    here = _here()
    if marks and here:
        here.give_back(marks)


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


def hook_sessions() -> None:
    """Publish each transaction's outbox rows after it commits, carry sent marks in the next one,
    and write the last marks at a clean exit (bootstrap calls this once per process)."""
    hooks = (
        ("before_commit", _carry_marks),
        ("after_commit", _publish_after_commit),
        ("after_rollback", _forget_after_rollback),
    )
    for name, fn in hooks:
        if not event.contains(Session, name, fn):
            event.listen(Session, name, fn)
    atexit.unregister(flush)
    atexit.register(flush)


def _here() -> _Publisher | None:
    return _current if _current is not None and _current.pid == os.getpid() else None


def _carry_marks(session: Session) -> None:
    """A transaction that commits anyway also writes this process's waiting sent marks: under
    load they cost no commit of their own."""
    marks = take_marks()
    if marks:
        session.execute(_MARK_SENT, mark_params(marks))
        session.info[CARRIED_KEY] = marks


def _publish_after_commit(session: Session) -> None:
    session.info.pop(CARRIED_KEY, None)
    publish_committed(session.info.pop(PENDING_KEY, []))


def _forget_after_rollback(session: Session) -> None:
    session.info.pop(PENDING_KEY, None)
    give_back_marks(session.info.pop(CARRIED_KEY, None) or [])
