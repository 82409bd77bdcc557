"""Saga definitions and the pure state machine that advances one saga by one event.

``advance(definition, snapshot, event) -> (snapshot, commands)`` touches no database and no broker:
the engine loads a snapshot, calls it, and persists what it returns. Forward, the saga runs the
step after the one that succeeded; backward, it runs the compensation of the next lower step that
has one. The direction is the saga state (running / compensating); the position is ``current``.

Steps have a kind, in the terms of the saga pattern: *compensatable* steps are undone when the saga
turns back; the *pivot* is the point of no return (its failure compensates what came before; once
it succeeded the saga only goes forward); *retriable* steps come after the pivot and are retried,
then parked for an operator, never compensated.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Literal

from models.enums import CompensationStatus, Reason, SagaState, StepStatus


class NotApplicable(Exception):
    """The event does not apply to the saga in its present state (an operator sees a 409)."""


class StepKind(StrEnum):
    COMPENSATABLE = "compensatable"
    PIVOT = "pivot"
    RETRIABLE = "retriable"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base * 2**(n-1)))."""

    attempts: int
    base_s: float
    max_s: float

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.max_s, self.base_s * 2 ** max(attempt - 1, 0))
        return (rng or random).uniform(0, ceiling)


@dataclass(frozen=True)
class Step:
    """One line of a saga definition. ``action`` None: the step is done when the saga starts.

    ``refusal``: what a business "no" of the action means (the saga's reason when it turns back).
    """

    name: str
    action: str | None = None
    compensation: str | None = None
    kind: StepKind = StepKind.COMPENSATABLE
    refusal: Reason = Reason.RETRIES_EXHAUSTED
    retry: RetryPolicy | None = None  # None: the configured default
    compensation_retry: RetryPolicy | None = None
    timeout_s: float | None = None  # None: the configured default

    def __post_init__(self) -> None:
        if self.kind is not StepKind.COMPENSATABLE and self.compensation is not None:
            raise ValueError(f"step {self.name}: a {self.kind} step has no compensation")

    @property
    def commands(self) -> tuple[str, ...]:
        return tuple(c for c in (self.action, self.compensation) if c)


@dataclass(frozen=True)
class SagaDefinition:
    """A named, versioned list of steps. A released version never changes (see kernel.versions)."""

    name: str
    steps: tuple[Step, ...]
    version: int = 1

    def __post_init__(self) -> None:
        kinds = [s.kind for s in self.steps]
        if kinds.count(StepKind.PIVOT) > 1:
            raise ValueError(f"saga {self.name}: at most one pivot")
        pivot = kinds.index(StepKind.PIVOT) if StepKind.PIVOT in kinds else len(kinds)
        for i, kind in enumerate(kinds):
            if (kind is StepKind.RETRIABLE) != (i > pivot):
                raise ValueError(
                    f"saga {self.name}: retriable steps (and only they) come after the pivot"
                )

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)

    def index(self, step_name: str) -> int:
        for i, step in enumerate(self.steps):
            if step.name == step_name:
                return i
        raise KeyError(step_name)

    def by_command(self, command: str) -> tuple[int, Literal["action", "compensation"]]:
        for i, step in enumerate(self.steps):
            if step.action == command:
                return i, "action"
            if step.compensation == command:
                return i, "compensation"
        raise KeyError(command)

    @property
    def commands(self) -> frozenset[str]:
        return frozenset(c for step in self.steps for c in step.commands)

    @property
    def pivot(self) -> int | None:
        for i, step in enumerate(self.steps):
            if step.kind is StepKind.PIVOT:
                return i
        return None

    def fingerprint(self) -> str:
        """sha256 of what the steps are: names, commands, kinds, refusals, policies, timeouts."""
        canonical = json.dumps(
            [
                [
                    s.name,
                    s.action,
                    s.compensation,
                    s.kind.value,
                    s.refusal.value,
                    _policy(s.retry),
                    _policy(s.compensation_retry),
                    s.timeout_s,
                ]
                for s in self.steps
            ],
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


def _policy(policy: RetryPolicy | None) -> list[float] | None:
    return None if policy is None else [policy.attempts, policy.base_s, policy.max_s]


@dataclass(frozen=True)
class StepView:
    status: StepStatus
    comp_status: CompensationStatus | None  # None: the step has no compensation


@dataclass(frozen=True)
class Snapshot:
    state: SagaState
    current: int
    steps: tuple[StepView, ...]
    reason: Reason | None = None

    def with_step(self, i: int, **changes: object) -> Snapshot:
        steps = list(self.steps)
        steps[i] = replace(steps[i], **changes)  # type: ignore[arg-type]
        return replace(self, steps=tuple(steps))


# Events fed to advance(). `partial`: the step may have partly taken effect, so it is compensated too.
# `unknown`: nobody knows whether it took effect (its deadline passed with no budget left).
@dataclass(frozen=True)
class StepSucceeded:
    index: int


@dataclass(frozen=True)
class StepFailed:
    index: int
    reason: Reason
    partial: bool
    unknown: bool = False


@dataclass(frozen=True)
class CompensationSucceeded:
    index: int


@dataclass(frozen=True)
class CompensationParked:
    index: int


@dataclass(frozen=True)
class OperatorRetry:
    pass


@dataclass(frozen=True)
class OperatorCompensate:
    pass


Event = (
    StepSucceeded
    | StepFailed
    | CompensationSucceeded
    | CompensationParked
    | OperatorRetry
    | OperatorCompensate
)


@dataclass(frozen=True)
class Dispatch:
    """Send the action (or compensation) of step ``index``. ``fresh``: a new request, attempt 1."""

    index: int
    kind: Literal["action", "compensation"]
    fresh: bool = True


def initial(definition: SagaDefinition) -> tuple[Snapshot, list[Dispatch]]:
    """A new saga: steps without an action are done already; the first real step is dispatched."""
    views = tuple(
        StepView(
            StepStatus.SUCCEEDED if step.action is None else StepStatus.PENDING,
            CompensationStatus.PENDING if step.compensation else None,
        )
        for step in definition.steps
    )
    start = Snapshot(SagaState.RUNNING, 0, views)
    return _forward_from(definition, start, 0)


def advance(
    definition: SagaDefinition, snap: Snapshot, event: Event
) -> tuple[Snapshot, list[Dispatch]]:
    match event:
        case StepSucceeded(i):
            if not is_parked_step(snap, i):  # a late success un-parks the saga
                _expect_running_step(snap, i)
            done = replace(snap.with_step(i, status=StepStatus.SUCCEEDED), state=SagaState.RUNNING)
            return _forward_from(definition, done, i + 1)
        case StepFailed(i, reason, partial, unknown):
            _expect_running_step(snap, i)
            if _goes_only_forward(definition, i, unknown):
                return _park_step(snap, i, reason), []
            return _turn_back(definition, snap, i, reason, partial)
        case CompensationSucceeded(i):
            if not _is_parked_compensation(snap, i):  # a late success un-parks the saga
                _expect_running_compensation(snap, i)
            done = snap.with_step(i, comp_status=CompensationStatus.SUCCEEDED)
            return _compensate_from(definition, replace(done, state=SagaState.COMPENSATING), i - 1)
        case CompensationParked(i):
            _expect_running_compensation(snap, i)
            parked = snap.with_step(i, comp_status=CompensationStatus.PARKED)
            return replace(parked, state=SagaState.FAILED), []
        case OperatorRetry():
            return _retry(snap)
        case OperatorCompensate():
            if snap.state is not SagaState.RUNNING:
                raise NotApplicable(f"cannot compensate a {snap.state} saga")
            if past_pivot(definition, snap):
                raise NotApplicable("the saga is past its pivot: it only goes forward")
            if snap.current == definition.pivot:
                raise NotApplicable("the pivot is in flight: its outcome is unknown")
            return _turn_back(definition, snap, snap.current, Reason.OPERATOR, partial=True)
    raise TypeError(f"unknown event {event!r}")


def past_pivot(definition: SagaDefinition, snap: Snapshot) -> bool:
    """Has the pivot succeeded? From then on the saga only goes forward."""
    pivot = definition.pivot
    return pivot is not None and snap.steps[pivot].status is StepStatus.SUCCEEDED


def _goes_only_forward(definition: SagaDefinition, i: int, unknown: bool) -> bool:
    """A retriable step never turns back; neither does a pivot whose outcome is unknown."""
    kind = definition.steps[i].kind
    return kind is StepKind.RETRIABLE or (kind is StepKind.PIVOT and unknown)


def _park_step(snap: Snapshot, i: int, reason: Reason) -> Snapshot:
    """The step waits for an operator: the saga is failed (parked) at it, nothing is undone."""
    failed = snap.with_step(i, status=StepStatus.FAILED)
    return replace(failed, state=SagaState.FAILED, reason=reason)


def _forward_from(
    definition: SagaDefinition, snap: Snapshot, start: int
) -> tuple[Snapshot, list[Dispatch]]:
    for j in range(start, len(definition.steps)):
        if definition.steps[j].action is not None:
            running = replace(snap.with_step(j, status=StepStatus.RUNNING), current=j)
            return running, [Dispatch(j, "action")]
    return replace(snap, state=SagaState.COMPLETED, current=len(definition.steps) - 1), []


def _turn_back(
    definition: SagaDefinition, snap: Snapshot, i: int, reason: Reason, partial: bool
) -> tuple[Snapshot, list[Dispatch]]:
    failed = snap.with_step(i, status=StepStatus.FAILED)
    for j in range(i + 1, len(definition.steps)):
        failed = failed.with_step(j, status=StepStatus.SKIPPED)
    back = replace(failed, state=SagaState.COMPENSATING, reason=reason)
    # A clean refusal took no effect; anything else (timeout, exhausted, abort) may have.
    return _compensate_from(definition, back, i if partial else i - 1)


def _compensate_from(
    definition: SagaDefinition, snap: Snapshot, start: int
) -> tuple[Snapshot, list[Dispatch]]:
    for j in range(start, -1, -1):
        if definition.steps[j].compensation is not None:
            running = snap.with_step(j, comp_status=CompensationStatus.RUNNING)
            return replace(running, current=j), [Dispatch(j, "compensation")]
    return replace(snap, state=SagaState.COMPENSATED, current=0), []


def _retry(snap: Snapshot) -> tuple[Snapshot, list[Dispatch]]:
    """Resume from where the saga stands: re-send what is in flight, or un-park what waits."""
    i = snap.current
    if is_parked_step(snap, i):
        resumed = snap.with_step(i, status=StepStatus.RUNNING)
        return replace(resumed, state=SagaState.RUNNING), [Dispatch(i, "action")]
    if snap.state is SagaState.FAILED:
        resumed = snap.with_step(i, comp_status=CompensationStatus.RUNNING)
        return replace(resumed, state=SagaState.COMPENSATING), [Dispatch(i, "compensation")]
    if snap.state is SagaState.RUNNING:
        return snap, [Dispatch(i, "action", fresh=False)]
    if snap.state is SagaState.COMPENSATING:
        return snap, [Dispatch(i, "compensation", fresh=False)]
    raise NotApplicable(f"cannot retry a {snap.state} saga")


def _expect_running_step(snap: Snapshot, i: int) -> None:
    if not (
        snap.state is SagaState.RUNNING
        and snap.current == i
        and snap.steps[i].status is StepStatus.RUNNING
    ):
        raise NotApplicable(f"step {i} is not the running step")


def is_parked_step(snap: Snapshot, i: int) -> bool:
    """A forward step that gave up without turning the saga back (retriable, or a pivot)."""
    return (
        snap.state is SagaState.FAILED
        and snap.current == i
        and snap.steps[i].status is StepStatus.FAILED
        and snap.steps[i].comp_status is not CompensationStatus.PARKED
    )


def _is_parked_compensation(snap: Snapshot, i: int) -> bool:
    return (
        snap.state is SagaState.FAILED
        and snap.current == i
        and snap.steps[i].comp_status is CompensationStatus.PARKED
    )


def _expect_running_compensation(snap: Snapshot, i: int) -> None:
    if not (
        snap.state is SagaState.COMPENSATING
        and snap.current == i
        and snap.steps[i].comp_status is CompensationStatus.RUNNING
    ):
        raise NotApplicable(f"compensation {i} is not the running compensation")
