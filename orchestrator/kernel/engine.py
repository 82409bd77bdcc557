"""The imperative shell around the state machine: lock, advance, persist, write the outbox.

Every transition of a saga runs in one transaction that first locks the saga row, so transitions
of one saga are serialized across any number of orchestrator processes. The commands a transition
produces are outbox rows in that same transaction: they are sent if and only if the state change
committed. A reply is applied only if its request id is the one the saga waits for.

Generic: a saga is a definition version from the registry, a business key and a context. What a
state change means for the business happens in the definition's ``on_state`` hook.

Traces (when on): a saga keeps its trace context in its context (``tracing.TRACE_KEY``) from its
start, and every command is dispatched as a span of that trace whoever dispatches it (a reply, a
sweep, an operator), its outbox row keeping that span's ``traceparent``: one saga, one trace
(orchestrator/ops/tracing.py).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.attributes import flag_modified

from models.enums import CompensationStatus, Reason, SagaState, StepStatus
from models.sagas import Phase, PhaseKind, Saga, SagaEvent, SagaStep
from orchestrator import registry
from orchestrator.kernel import holds
from orchestrator.kernel.machine import (
    CompensationParked,
    CompensationSucceeded,
    Dispatch,
    Event,
    NotApplicable,
    OperatorCompensate,
    OperatorRetry,
    RetryPolicy,
    SagaDefinition,
    Snapshot,
    StepFailed,
    StepSucceeded,
    StepView,
    advance,
    initial,
    is_parked_step,
)
from orchestrator.messaging import outbox
from orchestrator.messaging.envelopes import (
    CommandPayload,
    ReplyOutcome,
    RetrySpec,
    make_command,
)
from orchestrator.ops import tracing
from orchestrator.ops.config import settings
from orchestrator.registry import Registered, TimelineEvent

log = logging.getLogger(__name__)

_EVENTS = cast(sa.Table, SagaEvent.__table__)
E = TimelineEvent


class SagaNotFound(LookupError):
    pass


def utcnow() -> datetime:
    return datetime.now(UTC)


def registered_of(saga: Saga) -> Registered:
    """The definition version the saga started on: it advances on that one only."""
    return registry.current().get(saga.definition, saga.definition_version)


# ---------------------------------------------------------------- policies


def retry_policy(definition: SagaDefinition, index: int, kind: PhaseKind) -> RetryPolicy:
    cfg = settings()
    step = definition.steps[index]
    if kind == "action":
        return step.retry or RetryPolicy(cfg.retry_attempts, cfg.retry_base_s, cfg.retry_max_s)
    return step.compensation_retry or RetryPolicy(
        cfg.compensation_attempts, cfg.retry_base_s, cfg.retry_max_s
    )


def step_timeout_s(definition: SagaDefinition, index: int) -> float:
    return definition.steps[index].timeout_s or settings().step_timeout_s


def command_of(definition: SagaDefinition, index: int, kind: PhaseKind) -> str:
    step = definition.steps[index]
    command = step.action if kind == "action" else step.compensation
    assert command is not None, f"{step.name} has no {kind}"
    return command


# ---------------------------------------------------------------- starting a saga


class Enqueue(Protocol):
    def __call__(
        self, task: str, envelope: dict[str, Any], trace: dict[str, str], *, held: bool = False
    ) -> None: ...


class SagaStart:
    """The rows that start one saga: the saga, its steps, its timeline and its first command(s),
    as column values, for a caller that writes them together with its own rows (one statement:
    orchestrator/sagas/placing.py). ``info`` holds the timeline as ``record`` leaves it."""

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}
        self.saga_id = uuid.uuid4()
        self.saga: dict[str, Any] = {}
        self.steps: list[dict[str, Any]] = []
        self.rows: list[tuple[Any, bool]] = []  # the first command(s): (outbox.row, held)

    @property
    def events(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self.info.get(EVENTS_KEY, []))

    def enqueue(
        self, task: str, envelope: dict[str, Any], trace: dict[str, str], *, held: bool = False
    ) -> None:
        self.rows.append((outbox.row(task, envelope, trace=trace), held))


def saga_start(
    definition: str,
    business_key: str,
    context: dict[str, Any],
    *,
    holding: holds.Holding,
    detail: str | None = None,
    now: datetime | None = None,
) -> SagaStart:
    """A saga of the latest version of ``definition`` and its first command, as rows to write;
    ``holding``: the services not running, as the caller read them (its command may be held)."""
    reg = registry.current().latest(definition)
    now = now or utcnow()
    start = SagaStart()
    saga_id = start.saga_id
    snap, dispatches = initial(reg.definition)
    if tracing.enabled():  # its trace: the request's that starts it; its commands join it
        context = {**context, **tracing.saga_trace(saga_id, business_key)}
    saga = _SagaDraft(
        id=saga_id,
        business_key=business_key,
        definition=reg.name,
        definition_version=reg.version,
        state=snap.state,
        reason=None,
        current_step=snap.current,
        context=context,
        deadline_at=now + timedelta(seconds=settings().saga_deadline_s),
        created_at=now,
        updated_at=now,
        steps=[
            _StepDraft(
                saga_id=saga_id,
                idx=i,
                name=step.name,
                status=view.status,
                attempts=0,
                attempts_base=0,
                finished_at=now if view.status is StepStatus.SUCCEEDED else None,
                compensation=step.compensation,
                comp_status=view.comp_status,
                comp_attempts=0,
                comp_attempts_base=0,
            )
            for i, (step, view) in enumerate(zip(reg.definition.steps, snap.steps, strict=True))
        ],
    )
    record(start, saga, E.SAGA_STARTED, detail=detail)
    # Fills in the first step's request; its command is kept, not written.
    _dispatch(start, saga, reg, dispatches, now, enqueue=start.enqueue, holding=holding)
    start.saga = _values(saga)
    start.steps = [_values(step) for step in saga.steps]
    log.info(
        "saga started",
        extra={"saga_id": str(saga_id), "definition": reg.name, "business_key": business_key},
    )
    return start


def start_saga(
    session: Session,
    definition: str,
    business_key: str,
    context: dict[str, Any],
    *,
    detail: str | None = None,
    now: datetime | None = None,
) -> uuid.UUID:
    """Write a saga of the latest version of ``definition`` and its first command, in the
    caller's transaction (with whatever business rows the caller wrote before)."""
    holding = holds.not_running(session)
    start = saga_start(
        definition, business_key, context, holding=holding, detail=detail, now=now
    )
    for row, held in start.rows:
        outbox.add(session, row, held=held)
    # Core INSERTs, never ORM objects added to the session: the ORM unit of work for these
    # objects was about 30 % of the web's CPU per order.
    session.execute(sa.insert(cast(sa.Table, Saga.__table__)), [start.saga])
    session.execute(sa.insert(cast(sa.Table, SagaStep.__table__)), start.steps)
    session.info.setdefault(EVENTS_KEY, []).extend(start.events)
    return start.saga_id


def _draft(model: Any, *extra: str) -> Any:
    """A plain class with the columns of ``model`` (None unless given): a row being built for a
    caller's INSERT. The engine's code reads and sets it as it would the mapped object, without
    the ORM's instrumentation, which cost a fifth of a POST /orders' CPU."""
    fields: list[Any] = [
        (c.key, Any, dataclasses.field(default=None)) for c in model.__table__.columns
    ]
    fields += [(name, Any, dataclasses.field(default=None)) for name in extra]
    namespace: dict[str, Any] = {"__table__": model.__table__}
    if hasattr(model, "phase"):
        namespace["phase"] = model.phase
    return dataclasses.make_dataclass(f"{model.__name__}Draft", fields, namespace=namespace,
                                      slots=True, kw_only=True)


# Duck-typed as Saga and SagaStep by record() and _dispatch().
_SagaDraft = _draft(Saga, "steps")
_StepDraft = _draft(SagaStep)


def _values(row: Any) -> dict[str, Any]:
    """Every column of a draft row, as set on it."""
    return {c.key: getattr(row, c.key) for c in cast(sa.Table, type(row).__table__).columns}


# ---------------------------------------------------------------- loading and recording


# A lock returns what the last holder committed. The steps are read by a statement of their own,
# after the lock is held: joined to the locked saga in one statement, a saga row that waited on
# another transaction's lock comes back in its new version but its steps as the statement's
# snapshot saw them, before that commit (PostgreSQL re-checks only the locked rows), and the
# engine then wrote those stale steps back (seen in CI: a retry note applied twice as awaited
# when two orchestrators took two notes of one saga). ``populate_existing``: a saga this Session
# read earlier is refreshed, not taken from its identity map.
_LOCKED = {"populate_existing": True}


def lock_saga(session: Session, saga_id: uuid.UUID, *, skip_locked: bool = False) -> Saga | None:
    """The saga row, locked for this transaction: the one point that serializes transitions."""
    query = (
        sa.select(Saga)
        .options(selectinload(Saga.steps))
        .where(Saga.id == saga_id)
        .with_for_update(skip_locked=skip_locked)
        .execution_options(**_LOCKED)
    )
    return session.scalars(query).one_or_none()


def lock_sagas(session: Session, saga_ids: list[uuid.UUID]) -> dict[uuid.UUID, Saga]:
    """Many saga rows with their steps, locked in the order of their ids (one statement for the
    rows, one for their steps): two orchestrators locking overlapping batches wait for each other
    and never deadlock.

    Plain rows, not ORM objects (the engine reads and sets them as it would a Saga): loading a
    batch of one into the ORM and flushing it back was half of its ``apply_batch``'s CPU. What
    the transaction changes on them is written just before its commit, with its timeline, in one
    statement (``_write_events``); a saga locked twice in one transaction is the same row."""
    if not _hooked:  # the changes would never be written
        raise RuntimeError("locked sagas need the session hooks: call bootstrap() first")
    conn = session.connection()
    locked: dict[uuid.UUID, _Locked] = session.info.setdefault(LOCKED_KEY, {})
    wanted = sorted(set(saga_ids) - locked.keys())
    if wanted:
        fresh = {
            row.id: _SagaDraft(**row._mapping, steps=[])
            for row in conn.execute(_LOCK_SAGA_ROWS, {"ids": wanted})
        }
        if fresh:
            for row in conn.execute(_STEP_ROWS, {"ids": list(fresh)}):
                fresh[row.saga_id].steps.append(_StepDraft(**row._mapping))
        for saga_id, saga in fresh.items():
            locked[saga_id] = _Locked(saga, _moved(saga), [_moved(s) for s in saga.steps])
    return {i: locked[i].saga for i in saga_ids if i in locked}


_SAGAS, _STEPS = cast(sa.Table, Saga.__table__), cast(sa.Table, SagaStep.__table__)
# Built once, ids bound per batch (building and cache-keying it per batch was not free).
_LOCK_SAGA_ROWS = (
    sa.select(_SAGAS)
    .where(_SAGAS.c.id.in_(sa.bindparam("ids", expanding=True)))
    .order_by(_SAGAS.c.id)
    .with_for_update()
)
# Read after the lock is held, by a statement of its own (see _LOCKED above).
_STEP_ROWS = (
    sa.select(_STEPS)
    .where(_STEPS.c.saga_id.in_(sa.bindparam("ids", expanding=True)))
    .order_by(_STEPS.c.saga_id, _STEPS.c.idx)
)
LOCKED_KEY = "saga.locked"


@dataclasses.dataclass(slots=True)
class _Locked:
    """A locked saga and the values of its moving columns as read, to find what changed."""

    saga: Any
    was: tuple[Any, ...]
    steps_were: list[tuple[Any, ...]]


def _unnest_update(table: sa.Table, keys: tuple[str, ...], moved: list[str]) -> str:
    """An UPDATE of many rows by one statement: each column's new values (and the keys that find
    the rows) bound as one array, the rows made by ``unnest``. The same text for any number of
    rows (prepared once per connection); zero rows update nothing."""
    columns = [*keys, *moved]
    types = {c: table.c[c].type.compile(dialect=postgresql.dialect()) for c in columns}
    arrays = ", ".join(f"CAST(%({c})s AS {types[c]}[])" for c in columns)
    sets = ", ".join(f"{c} = v.{c}" for c in moved)
    where = " AND ".join(f"t.{c} = v.{c}" for c in keys)
    return (
        f"UPDATE {table.name} AS t SET {sets} FROM unnest({arrays}) AS v({', '.join(columns)})"
        f" WHERE {where}"
    )


def _unnest_insert(
    table: sa.Table, columns: list[str], prefix: str, defaults: dict[str, str]
) -> str:
    """An INSERT of many rows by one statement, in the order of the arrays; a column of
    ``defaults`` takes that SQL where its value is NULL."""
    types = {c: table.c[c].type.compile(dialect=postgresql.dialect()) for c in columns}
    arrays = ", ".join(f"CAST(%({prefix}{c})s AS {types[c]}[])" for c in columns)
    values = ", ".join(
        f"COALESCE(v.{c}, {defaults[c]})" if c in defaults else f"v.{c}" for c in columns
    )
    return (
        f"INSERT INTO {table.name} ({', '.join(columns)}) SELECT {values}"
        f" FROM unnest({arrays}) WITH ORDINALITY AS v({', '.join(columns)}, n) ORDER BY v.n"
    )


def _moved(row: Any) -> tuple[Any, ...]:
    return tuple(getattr(row, key) for key in _MOVED[cast(Any, row).__table__.name])


def _arrays(rows: list[Any], columns: list[str]) -> dict[str, list[Any]]:
    """Each column's values of ``rows``, as the arrays ``_unnest_*`` bind (enums by value)."""
    return {
        c: [v.value if isinstance(v, enum.Enum) else v for v in (getattr(r, c) for r in rows)]
        for c in columns
    }


def _locked_changes(session: Session) -> dict[str, list[Any]]:
    """The changed rows of the sagas ``lock_sagas`` handed out, as ``_WRITE``'s arrays."""
    locked: dict[uuid.UUID, _Locked] = session.info.pop(LOCKED_KEY, None) or {}
    sagas, steps = [], []
    for entry in locked.values():
        saga = entry.saga
        if _moved(saga) != entry.was:
            sagas.append(saga)
        steps += [s for s, was in zip(saga.steps, entry.steps_were, strict=True) if _moved(s) != was]
    return {
        **_arrays(sagas, _SAGA_COLUMNS),
        **{f"s_{k}": v for k, v in _arrays(steps, _STEP_COLUMNS).items()},
    }


EVENTS_KEY = "saga.events"


class _Recorder(Protocol):
    @property
    def info(self) -> dict[Any, Any]: ...


def record(
    session: _Recorder,
    saga: Saga,
    event: TimelineEvent,
    *,
    step: str | None = None,
    attempt: int | None = None,
    detail: str | None = None,
    actor: str | None = None,
    at: datetime | None = None,
) -> None:
    """Add an event to the saga's timeline; the transaction's events are written at its commit.
    ``at``: when it happened, if not now (a participant's note that reached us late)."""
    if not _hooked:  # the event would never be written
        raise RuntimeError("timeline events need the session hooks: call bootstrap() first")
    row: dict[str, Any] = {
        "saga_id": saga.id,
        "event": TimelineEvent(event).value,
        "step": step,
        "attempt": attempt,
        "detail": detail,
        "actor": actor,
    }
    if at is not None:
        row["at"] = at
    session.info.setdefault(EVENTS_KEY, []).append(row)


_hooked = False


def hook_sessions() -> None:
    """Write each transaction's timeline events just before it commits, and its changed saga and
    step rows as one executemany per table (bootstrap calls this)."""
    global _hooked
    hooks = (
        ("before_commit", _write_events),
        ("after_rollback", _forget_events),
        ("before_flush", _uniform_updates),
    )
    for name, fn in hooks:
        if not sa.event.contains(Session, name, fn):
            sa.event.listen(Session, name, fn)
    _hooked = True


# What never changes once a saga is written; the engine moves the other columns.
_FIXED = {"id", "business_key", "definition", "definition_version", "context", "created_at",
          "saga_id", "idx", "name", "compensation"}  # fmt: skip
_MOVED = {
    table.name: [c.key for c in table.columns if c.key not in _FIXED]
    for table in (cast(sa.Table, Saga.__table__), cast(sa.Table, SagaStep.__table__))
}
_SAGA_KEY, _STEP_KEY = ("id",), ("saga_id", "idx")
_SAGA_COLUMNS = [*_SAGA_KEY, *_MOVED[_SAGAS.name]]
_STEP_COLUMNS = [*_STEP_KEY, *_MOVED[_STEPS.name]]
_EVENT_COLUMNS = ["saga_id", "event", "step", "attempt", "detail", "actor", "at"]
# One round trip for a transaction's engine writes (an executemany per table was three, the steps'
# in pipeline mode): the sagas' and the steps' UPDATEs as CTEs, the timeline's INSERT in its order.
_WRITE = (
    f"WITH sagas_written AS ({_unnest_update(_SAGAS, _SAGA_KEY, _MOVED[_SAGAS.name])}), "
    "steps_written AS ("
    + _unnest_update(_STEPS, _STEP_KEY, _MOVED[_STEPS.name]).replace("%(", "%(s_")
    + ") "
    + _unnest_insert(_EVENTS, _EVENT_COLUMNS, "e_", defaults={"at": "clock_timestamp()"})
)


def _uniform_updates(session: Session, *_: object) -> None:
    # The unit of work groups rows into one executemany only while consecutive rows changed the
    # same columns; a batch's steps alternate (the one that ended, the one dispatched), so each
    # was an UPDATE of its own, 40 for a batch of 20 replies. Every changed saga or step row is
    # written with all the columns the engine moves: one executemany per table. The extra values
    # are the row's own, read under the saga's lock.
    for obj in session.dirty:
        moved = _MOVED.get(getattr(type(obj), "__tablename__", ""))
        if moved and session.is_modified(obj, include_collections=False):
            for key in moved:
                flag_modified(obj, key)


def _write_events(session: Session) -> None:
    # The transaction's engine writes in one round trip, just before its commit: the changed rows
    # of the sagas it locked (lock_sagas) and its timeline (one ORM object per event, then one
    # statement per table, were a third of the orchestrator's CPU). ORM-loaded sagas (lock_saga)
    # are flushed first: the events reference the saga.
    changes = _locked_changes(session)
    events = session.info.pop(EVENTS_KEY, None) or []
    session.flush()
    if events or changes["id"] or changes["s_saga_id"]:
        rows = [_EventRow(**{"at": None, **row}) for row in events]
        params = {**changes, **{f"e_{k}": v for k, v in _arrays(rows, _EVENT_COLUMNS).items()}}
        session.connection().exec_driver_sql(_WRITE, params)


@dataclasses.dataclass(slots=True)
class _EventRow:
    saga_id: uuid.UUID
    event: str
    step: str | None
    attempt: int | None
    detail: str | None
    actor: str | None
    at: datetime | None  # None: when it is written (clock_timestamp(), as the column's default)


def _forget_events(session: Session) -> None:
    session.info.pop(EVENTS_KEY, None)
    session.info.pop(LOCKED_KEY, None)


def snapshot_of(saga: Saga) -> Snapshot:
    return Snapshot(
        state=saga.state,
        current=saga.current_step,
        steps=tuple(StepView(row.status, row.comp_status) for row in saga.steps),
        reason=saga.reason,
    )


def awaits(
    saga: Saga,
    index: int,
    kind: PhaseKind,
    request_id: uuid.UUID | None = None,
    *,
    success: bool = False,
) -> bool:
    """Is the saga waiting for this step's action (or compensation), and for this request?

    A parked step or compensation still takes a late *success* of its last request: the work was
    done after it gave up waiting, and the saga carries on instead of staying parked.
    """
    if saga.current_step != index:
        return False
    phase = saga.steps[index].phase(kind)
    running = SagaState.RUNNING if kind == "action" else SagaState.COMPENSATING
    in_flight = StepStatus.RUNNING if kind == "action" else CompensationStatus.RUNNING
    waiting = saga.state is running and phase.status is in_flight
    if not waiting and success and saga.state is SagaState.FAILED:
        snap = snapshot_of(saga)
        waiting = (
            is_parked_step(snap, index)
            if kind == "action"
            else phase.status is CompensationStatus.PARKED
        )
    return waiting and (request_id is None or request_id == phase.request_id)


# ---------------------------------------------------------------- transitions


def transition(session: Session, saga: Saga, event: Event, now: datetime | None = None) -> None:
    """Advance the saga by one event; persist the result, its timeline and its commands."""
    now = now or utcnow()
    reg = registered_of(saga)
    before = snapshot_of(saga)
    after, dispatches = advance(reg.definition, before, event)
    _persist(session, saga, reg, before, after, now)
    _dispatch(session, saga, reg, dispatches, now)


_FINISHED = {
    StepStatus.SUCCEEDED,
    StepStatus.FAILED,
    CompensationStatus.SUCCEEDED,
    CompensationStatus.PARKED,
}
_SUCCEEDED = {StepStatus.SUCCEEDED, CompensationStatus.SUCCEEDED}


def _persist(
    session: Session,
    saga: Saga,
    reg: Registered,
    before: Snapshot,
    after: Snapshot,
    now: datetime,
) -> None:
    for i, (old, new) in enumerate(zip(before.steps, after.steps, strict=True)):
        row = saga.steps[i]
        changes: list[tuple[Phase, Any, Any]] = [
            (row.phase("action"), old.status, new.status),
            (row.phase("compensation"), old.comp_status, new.comp_status),
        ]
        for phase, was, now_is in changes:
            if was is now_is:
                continue
            phase.status = now_is
            if now_is in _FINISHED:
                phase.finished_at, row.deadline_at = now, None
            if now_is in _SUCCEEDED:
                phase.error = None  # earlier attempts' errors stay in the timeline
                name = row.name if phase.kind == "action" else row.compensation
                record(
                    session,
                    saga,
                    E(f"{phase.event_prefix}.succeeded"),
                    step=name,
                    attempt=phase.attempts,
                )
            elif now_is is CompensationStatus.PARKED:
                record(
                    session,
                    saga,
                    E.COMPENSATION_PARKED,
                    step=row.compensation,
                    attempt=phase.attempts,
                    detail="waiting for an operator",
                )
    saga.current_step = after.current
    saga.reason = after.reason
    saga.updated_at = now
    if after.state is not before.state:
        saga.state = after.state
        if after.state.final:
            record(session, saga, E.saga_final(after.state), detail=_reason_text(saga))
        if reg.on_state is not None:
            reg.on_state(session, saga, after.state, before.state)


def _reason_text(saga: Saga) -> str | None:
    return f"reason {saga.reason.value}" if saga.reason else None


def _dispatch(
    session: Any,
    saga: Saga,
    reg: Registered,
    dispatches: list[Dispatch],
    now: datetime,
    enqueue: Enqueue | None = None,
    *,
    holding: holds.Holding | None = None,
    probe: bool = False,
) -> None:
    """Send each dispatch: a fresh request, a timeline event, a deadline, an outbox row (or, with
    ``enqueue``, the command handed to it; ``session`` then only collects the timeline). A command
    whose service is paused (``holding``: the services not running, else read in ``session``) is
    held instead: no attempt, no deadline, an outbox row no one sends until the release
    (release.py); ``probe``: the breaker's one command let through while half open."""
    if holding is None:
        holding = {} if probe else holds.not_running(session)
    definition = reg.definition
    for d in dispatches:
        row = saga.steps[d.index]
        phase = row.phase(d.kind)
        command = command_of(definition, d.index, d.kind)
        policy = retry_policy(definition, d.index, d.kind)
        if d.fresh or phase.request_id is None:
            phase.request_id = uuid.uuid4()
            phase.started_at = phase.started_at or now
        hold = None if probe else holds.hold_in(holding, command, d.kind)
        attempt = phase.attempts + 1
        payload: CommandPayload = reg.build_payload(  # type: ignore[assignment]
            command,
            saga.context,
            RetrySpec(attempts=policy.attempts, base_s=policy.base_s, max_s=policy.max_s),
            saga.reason,
        )
        assert phase.request_id is not None
        envelope = make_command(
            command,
            saga_id=saga.id,
            request_id=phase.request_id,
            step=row.name,
            attempt=attempt,
            payload=payload,
        )
        held = hold is not None
        if hold is not None:
            record(session, saga, E.STEP_HELD, step=command, detail=hold.describe(), actor=hold.by)
            row.deadline_at = None
            saga.held_since = saga.held_since or now
        else:
            phase.attempts = attempt
            record(
                session,
                saga,
                E(f"{phase.event_prefix}.dispatched"),
                step=command,
                attempt=phase.attempts,
            )
            row.deadline_at = now + timedelta(seconds=step_timeout_s(definition, d.index))
            saga.held_since = None
        # In the saga's trace even when a sweep or an operator's request sends it.
        trace = (
            tracing.dispatched(f"dispatch {command}", envelope, saga.context.get(tracing.TRACE_KEY))
            if tracing.enabled()
            else {}
        )
        if enqueue is not None:
            enqueue(command, envelope, trace, held=held)
        else:
            outbox.enqueue(session, command, envelope, trace, held=held)


# ---------------------------------------------------------------- replies


def on_reply(
    session: Session,
    saga: Saga,
    command: str,
    request_id: uuid.UUID,
    attempt: int,
    outcome: ReplyOutcome,
    *,
    error: str | None = None,
    retry_in_s: float | None = None,
    sent_at: datetime | None = None,
    held: bool = False,
) -> str:
    """Apply one participant reply to a locked saga. Returns what happened, for the log.
    ``held``: the attempt failed transiently while its service was paused; it waits again."""
    definition = registered_of(saga).definition
    index, kind = definition.by_command(command)
    phase = saga.steps[index].phase(kind)
    delay = retry_in_s or 0.0
    awaited = awaits(saga, index, kind, request_id, success=outcome is ReplyOutcome.SUCCEEDED)
    # A note of attempt n once a later attempt's note moved the phase past n + 1 (two
    # orchestrator processes took the two replies at once, the later one first).
    overtaken = outcome is ReplyOutcome.RETRYING and awaited and attempt + 1 < phase.attempts
    if not awaited or overtaken:
        if (
            outcome is ReplyOutcome.RETRYING
            and sent_at is not None
            and phase.request_id == request_id
            and not _has_failure_event(session, saga, phase.event_prefix, command, attempt)
        ):
            # Overtaken by a later attempt's reply: the state has moved on, but the failed
            # attempt is history, at its time.
            _record_retry(
                session, saga, phase.event_prefix, command, attempt, error, delay, sent_at
            )
            return "ignored (overtaken: late), its failed attempt kept in the timeline"
        return "ignored (not awaited: late or duplicate)"
    now = utcnow()
    phase.attempts = max(phase.attempts, attempt)
    if outcome is ReplyOutcome.RETRYING and held:
        _hold_again(session, saga, index, kind, command, attempt, error, now)
        return "held (its service is paused)"
    if outcome is ReplyOutcome.RETRYING:
        _record_retry(session, saga, phase.event_prefix, command, attempt, error, delay)
        phase.error = error
        phase.attempts = max(phase.attempts, attempt + 1)
        saga.steps[index].deadline_at = now + timedelta(
            seconds=delay + step_timeout_s(definition, index)
        )
        saga.updated_at = now
        return "retrying"
    if outcome is ReplyOutcome.SUCCEEDED:
        event: Event = StepSucceeded(index) if kind == "action" else CompensationSucceeded(index)
    else:
        record(
            session,
            saga,
            E(f"{phase.event_prefix}.failed"),
            step=command,
            attempt=attempt,
            detail=error,
        )
        phase.error = error
        if kind == "action":
            event = StepFailed(index, definition.steps[index].refusal, partial=False)
        else:
            event = CompensationParked(index)
    transition(session, saga, event, now)
    return f"{outcome.value}: saga {saga.state.value}"


def _hold_again(
    session: Session,
    saga: Saga,
    index: int,
    kind: PhaseKind,
    command: str,
    attempt: int,
    error: str | None,
    now: datetime,
) -> None:
    """An attempt that failed while its service was paused goes back to the held set: the
    failure is history, the attempt is given back to the budget, and the dispatch decides (held,
    or sent if the service was resumed meanwhile)."""
    phase = saga.steps[index].phase(kind)
    record(session, saga, E(f"{phase.event_prefix}.failed"), step=command, attempt=attempt,
           detail=error)
    phase.error = error
    phase.attempts_base = min(phase.attempts, phase.attempts_base + 1)
    dispatch_again(session, saga, index, kind, now)
    saga.updated_at = now


def dispatch_again(
    session: Session, saga: Saga, index: int, kind: PhaseKind, now: datetime, *, probe: bool = False
) -> None:
    """Send the step's action (or compensation) again on its current request: a held command
    released, or put back (held again when its service is still paused)."""
    reg = registered_of(saga)
    _dispatch(session, saga, reg, [Dispatch(index, kind, fresh=False)], now, probe=probe)


def _record_retry(
    session: Session,
    saga: Saga,
    prefix: str,
    command: str,
    attempt: int,
    error: str | None,
    delay: float,
    at: datetime | None = None,
) -> None:
    record(session, saga, E(f"{prefix}.failed"), step=command, attempt=attempt, detail=error, at=at)
    record(
        session,
        saga,
        E.STEP_RETRIED,
        step=command,
        attempt=attempt + 1,
        detail=f"next attempt in {delay:.2f}s",
        at=at,
    )


def _has_failure_event(
    session: Session, saga: Saga, prefix: str, command: str, attempt: int
) -> bool:
    """A late note may also be a duplicate: its failure is recorded once (in the table, or by
    an earlier reply of this transaction: a batch)."""
    event = f"{prefix}.failed"
    for row in session.info.get(EVENTS_KEY, ()):
        if (row["saga_id"], row["event"], row["step"], row["attempt"]) == (
            saga.id,
            event,
            command,
            attempt,
        ):
            return True
    query = sa.select(sa.literal(1)).where(
        _EVENTS.c.saga_id == saga.id,
        _EVENTS.c.event == f"{prefix}.failed",
        _EVENTS.c.step == command,
        _EVENTS.c.attempt == attempt,
    )
    return session.execute(query.limit(1)).first() is not None


def on_exhausted(
    session: Session,
    saga: Saga,
    command: str,
    request_id: uuid.UUID | None,
    why: str,
    *,
    cause: TimelineEvent,
    reason: Reason,
    attempt: int | None = None,
) -> bool:
    """The step or compensation gave up (dead-lettered, or past its deadline with no budget left).

    An action turns the saga back (it may have partly taken effect) unless it only goes forward
    (a retriable step, or a pivot whose outcome nobody knows): then it parks. A compensation parks.
    """
    definition = registered_of(saga).definition
    index, kind = definition.by_command(command)
    if not awaits(saga, index, kind, request_id):
        return False
    phase = saga.steps[index].phase(kind)
    # A dead letter may overtake the "retrying" replies of the attempts before it.
    if attempt is not None:
        phase.attempts = max(phase.attempts, attempt)
    record(session, saga, cause, step=command, attempt=phase.attempts, detail=why)
    phase.error = why
    if kind == "action":
        unknown = cause is E.STEP_TIMED_OUT
        transition(session, saga, StepFailed(index, reason, partial=True, unknown=unknown))
    else:
        record(
            session, saga, E.COMPENSATION_FAILED, step=command, attempt=phase.attempts, detail=why
        )
        transition(session, saga, CompensationParked(index))
    return True


# ---------------------------------------------------------------- operator actions


def is_stuck(saga: Saga, now: datetime | None = None) -> bool:
    if saga.state.final:
        return False
    deadline = saga.steps[saga.current_step].deadline_at
    return deadline is not None and deadline < (now or utcnow())


def current_kind(saga: Saga) -> PhaseKind:
    """Which half of the current step is in hand (or parked)."""
    if saga.state is SagaState.RUNNING:
        return "action"
    if saga.state is SagaState.FAILED and is_parked_step(snapshot_of(saga), saga.current_step):
        return "action"
    return "compensation"


def operator_action(
    session: Session, saga_id: uuid.UUID, action: str, actor: str, note: str | None
) -> SagaState:
    """Retry (resume a stuck or parked saga) or compensate (abort a running one), with a record."""
    saga = lock_saga(session, saga_id)
    if saga is None:
        raise SagaNotFound(str(saga_id))
    if action == "retry":
        if not (saga.state is SagaState.FAILED or is_stuck(saga)):
            raise NotApplicable(f"only a stuck or failed saga can be retried (it is {saga.state})")
        record(session, saga, E.OPERATOR_RETRY, actor=actor, detail=note)
        in_hand = saga.steps[saga.current_step].phase(current_kind(saga))
        in_hand.attempts_base = in_hand.attempts  # a fresh budget; the count goes on
        transition(session, saga, OperatorRetry())
    elif action == "compensate":
        if saga.state is not SagaState.RUNNING:
            raise NotApplicable(f"only a running saga can be compensated (it is {saga.state})")
        # Checked before anything is recorded: the machine refuses past the pivot as well.
        advance(registered_of(saga).definition, snapshot_of(saga), OperatorCompensate())
        record(session, saga, E.OPERATOR_COMPENSATE, actor=actor, detail=note)
        current = saga.steps[saga.current_step]
        record(
            session,
            saga,
            E.STEP_FAILED,
            step=current.name,
            attempt=current.attempts,
            detail="aborted by operator",
        )
        transition(session, saga, OperatorCompensate())
    else:
        raise ValueError(f"unknown action {action!r}")
    return saga.state


# ---------------------------------------------------------------- deadlines


def on_deadline(session: Session, saga: Saga, now: datetime) -> str | None:
    """The sweeper's move for a saga past a deadline: re-send within the budget, else give up.
    A held saga has no deadline running (its service is paused)."""
    if saga.state.final or saga.held_since is not None:
        return None
    reg = registered_of(saga)
    index = saga.current_step
    kind = current_kind(saga)
    row = saga.steps[index]
    phase = row.phase(kind)
    command = command_of(reg.definition, index, kind)
    if kind == "action" and saga.deadline_at < now:
        on_exhausted(
            session,
            saga,
            command,
            phase.request_id,
            "the saga's deadline passed",
            cause=E.STEP_TIMED_OUT,
            reason=Reason.TIMEOUT,
        )
        return "saga deadline"
    if row.deadline_at is None or row.deadline_at >= now:
        return None
    # Attempts of the current budget (an operator retry starts a fresh one).
    attempts = phase.attempts - phase.attempts_base
    if holds.held(session, command, kind) is not None:
        # Its service is paused (or its breaker's probe got no answer): the lost attempt is given
        # back and the command waits again, so an outage never runs a step out of attempts.
        record(session, saga, E.STEP_TIMED_OUT, step=command, attempt=attempts,
               detail="no reply before the deadline; held again (its service is paused)")
        phase.attempts_base = min(phase.attempts, phase.attempts_base + 1)
        dispatch_again(session, saga, index, kind, now)
        saga.updated_at = now
        return "held again"
    if attempts < retry_policy(reg.definition, index, kind).attempts:
        record(
            session,
            saga,
            E.STEP_TIMED_OUT,
            step=command,
            attempt=attempts,
            detail="no reply before the deadline; sending again",
        )
        _dispatch(session, saga, reg, [Dispatch(index, kind, fresh=False)], now)
        saga.updated_at = now
        return "re-sent"
    on_exhausted(
        session,
        saga,
        command,
        phase.request_id,
        "no reply before the deadline, no attempts left",
        cause=E.STEP_TIMED_OUT,
        reason=Reason.TIMEOUT,
    )
    return "gave up"
