"""The pure state machine: one test per path, given a state and an event, the next state and command."""

from __future__ import annotations

import random

import pytest

from models.enums import CompensationStatus as C
from models.enums import Reason, SagaState
from models.enums import StepStatus as S
from orchestrator.kernel.machine import (
    CompensationParked,
    CompensationSucceeded,
    Dispatch,
    NotApplicable,
    OperatorCompensate,
    OperatorRetry,
    RetryPolicy,
    SagaDefinition,
    Snapshot,
    Step,
    StepFailed,
    StepKind,
    StepSucceeded,
    advance,
    initial,
)
from orchestrator.sagas.order import ORDER_SAGA

CREATE, RESERVE, CHARGE, CONFIRM = range(4)


def run(*events: object) -> tuple[Snapshot, list[Dispatch]]:
    snap, commands = initial(ORDER_SAGA)
    for event in events:
        snap, commands = advance(ORDER_SAGA, snap, event)  # type: ignore[arg-type]
    return snap, commands


def statuses(snap: Snapshot) -> list[tuple[S, C | None]]:
    return [(v.status, v.comp_status) for v in snap.steps]


def test_a_new_saga_dispatches_the_reservation() -> None:
    snap, commands = run()
    assert snap.state is SagaState.RUNNING
    assert commands == [Dispatch(RESERVE, "action")]
    assert statuses(snap) == [
        (S.SUCCEEDED, C.PENDING),
        (S.RUNNING, C.PENDING),
        (S.PENDING, C.PENDING),
        (S.PENDING, None),
    ]


def test_each_success_dispatches_the_next_step_and_the_last_completes() -> None:
    assert run(StepSucceeded(RESERVE))[1] == [Dispatch(CHARGE, "action")]
    assert run(StepSucceeded(RESERVE), StepSucceeded(CHARGE))[1] == [Dispatch(CONFIRM, "action")]
    snap, commands = run(StepSucceeded(RESERVE), StepSucceeded(CHARGE), StepSucceeded(CONFIRM))
    assert (snap.state, commands) == (SagaState.COMPLETED, [])
    assert [v.status for v in snap.steps] == [S.SUCCEEDED] * 4


def test_out_of_stock_skips_the_rest_and_only_cancels_the_order() -> None:
    snap, commands = run(StepFailed(RESERVE, Reason.OUT_OF_STOCK, partial=False))
    assert (snap.state, snap.reason) == (SagaState.COMPENSATING, Reason.OUT_OF_STOCK)
    assert commands == [Dispatch(CREATE, "compensation")]
    assert [v.status for v in snap.steps] == [S.SUCCEEDED, S.FAILED, S.SKIPPED, S.SKIPPED]
    snap, commands = advance(ORDER_SAGA, snap, CompensationSucceeded(CREATE))
    assert (snap.state, commands) == (SagaState.COMPENSATED, [])


def test_declined_card_releases_stock_then_cancels_order() -> None:
    snap, commands = run(
        StepSucceeded(RESERVE), StepFailed(CHARGE, Reason.PAYMENT_DECLINED, partial=False)
    )
    assert commands == [Dispatch(RESERVE, "compensation")]  # no refund: nothing was charged
    snap, commands = advance(ORDER_SAGA, snap, CompensationSucceeded(RESERVE))
    assert commands == [Dispatch(CREATE, "compensation")]
    snap, commands = advance(ORDER_SAGA, snap, CompensationSucceeded(CREATE))
    assert (snap.state, snap.reason, commands) == (
        SagaState.COMPENSATED,
        Reason.PAYMENT_DECLINED,
        [],
    )


def test_charge_exhausted_refunds_it_too_then_releases_then_cancels() -> None:
    snap, commands = run(
        StepSucceeded(RESERVE), StepFailed(CHARGE, Reason.RETRIES_EXHAUSTED, partial=True)
    )
    assert commands == [Dispatch(CHARGE, "compensation")]
    order = []
    while commands:
        order.append(commands[0].index)
        snap, commands = advance(ORDER_SAGA, snap, CompensationSucceeded(commands[0].index))
    assert order == [CHARGE, RESERVE, CREATE]
    assert (snap.state, snap.reason) == (SagaState.COMPENSATED, Reason.RETRIES_EXHAUSTED)


def test_confirm_refused_compensates_charge_and_stock_in_reverse_order() -> None:
    snap, commands = run(
        StepSucceeded(RESERVE),
        StepSucceeded(CHARGE),
        StepFailed(CONFIRM, Reason.RETRIES_EXHAUSTED, partial=False),
    )
    order = []
    while commands:
        order.append(commands[0].index)
        snap, commands = advance(ORDER_SAGA, snap, CompensationSucceeded(commands[0].index))
    assert order == [CHARGE, RESERVE, CREATE]
    assert snap.state is SagaState.COMPENSATED


def test_a_timed_out_reservation_is_released_as_it_may_have_happened() -> None:
    snap, commands = run(StepFailed(RESERVE, Reason.TIMEOUT, partial=True))
    assert commands == [Dispatch(RESERVE, "compensation")]
    assert snap.reason is Reason.TIMEOUT


def test_a_failed_compensation_parks_the_saga_as_failed() -> None:
    snap, _ = run(StepSucceeded(RESERVE), StepFailed(CHARGE, Reason.TIMEOUT, partial=True))
    snap, commands = advance(ORDER_SAGA, snap, CompensationParked(CHARGE))
    assert (snap.state, commands) == (SagaState.FAILED, [])
    assert snap.steps[CHARGE].comp_status is C.PARKED
    assert snap.steps[RESERVE].comp_status is C.PENDING  # waits, not skipped


def test_operator_retry_unparks_the_compensation_and_runs_the_rest() -> None:
    snap, _ = run(
        StepSucceeded(RESERVE),
        StepFailed(CHARGE, Reason.TIMEOUT, partial=True),
        CompensationParked(CHARGE),
    )
    snap, commands = advance(ORDER_SAGA, snap, OperatorRetry())
    assert snap.state is SagaState.COMPENSATING
    assert commands == [Dispatch(CHARGE, "compensation", fresh=True)]
    snap, commands = advance(ORDER_SAGA, snap, CompensationSucceeded(CHARGE))
    assert commands == [Dispatch(RESERVE, "compensation")]


def test_operator_retry_of_a_running_saga_resends_the_step_in_flight() -> None:
    snap, commands = advance(ORDER_SAGA, run(StepSucceeded(RESERVE))[0], OperatorRetry())
    assert commands == [Dispatch(CHARGE, "action", fresh=False)]
    assert snap.state is SagaState.RUNNING


def test_operator_compensate_aborts_the_step_in_flight_and_undoes_it() -> None:
    snap, commands = advance(ORDER_SAGA, run(StepSucceeded(RESERVE))[0], OperatorCompensate())
    assert (snap.state, snap.reason) == (SagaState.COMPENSATING, Reason.OPERATOR)
    assert commands == [Dispatch(CHARGE, "compensation")]
    assert snap.steps[CHARGE].status is S.FAILED


@pytest.mark.parametrize("event", [OperatorRetry(), OperatorCompensate()])
def test_operator_actions_do_not_apply_to_a_completed_saga(event: object) -> None:
    done, _ = run(StepSucceeded(RESERVE), StepSucceeded(CHARGE), StepSucceeded(CONFIRM))
    with pytest.raises(NotApplicable):
        advance(ORDER_SAGA, done, event)  # type: ignore[arg-type]


def test_a_late_reply_for_a_step_no_longer_running_is_refused() -> None:
    snap, _ = run(StepFailed(RESERVE, Reason.TIMEOUT, partial=True))
    with pytest.raises(NotApplicable):
        advance(ORDER_SAGA, snap, StepSucceeded(RESERVE))
    with pytest.raises(NotApplicable):
        advance(ORDER_SAGA, snap, CompensationSucceeded(CHARGE))


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    policy = RetryPolicy(attempts=5, base_s=0.5, max_s=3.0)
    rng = random.Random(7)
    for attempt, cap in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (9, 3.0)):
        delays = [policy.delay(attempt, rng) for _ in range(200)]
        assert min(delays) >= 0 and max(delays) <= cap
        assert max(delays) > cap * 0.8  # the whole range is used


def test_a_late_success_of_a_parked_compensation_resumes_the_rollback() -> None:
    snap, _ = run(
        StepSucceeded(RESERVE),
        StepFailed(CHARGE, Reason.TIMEOUT, partial=True),
        CompensationParked(CHARGE),
    )
    snap, commands = advance(ORDER_SAGA, snap, CompensationSucceeded(CHARGE))
    assert (snap.state, snap.reason) == (SagaState.COMPENSATING, Reason.TIMEOUT)
    assert snap.steps[CHARGE].comp_status is C.SUCCEEDED
    assert commands == [Dispatch(RESERVE, "compensation")]


# ---------------------------------------------------------------- pivot and retriable steps

# A saga of every kind: begin (compensatable, done at start), refund (the pivot), two retriable.
MIXED = SagaDefinition(
    "mixed",
    (
        Step("orders.begin", compensation="orders.abort"),
        Step("payment.pay", "payment.pay", kind=StepKind.PIVOT),
        Step("inventory.put", "inventory.put", kind=StepKind.RETRIABLE),
        Step("orders.finish", "orders.finish", kind=StepKind.RETRIABLE),
    ),
)
BEGIN, PIVOT, PUT, FINISH = range(4)


def mixed(*events: object) -> tuple[Snapshot, list[Dispatch]]:
    snap, commands = initial(MIXED)
    for event in events:
        snap, commands = advance(MIXED, snap, event)  # type: ignore[arg-type]
    return snap, commands


def test_the_order_sagas_confirm_is_its_pivot() -> None:
    assert ORDER_SAGA.pivot == CONFIRM
    assert ORDER_SAGA.steps[CONFIRM].kind is StepKind.PIVOT


def test_a_refused_pivot_compensates_the_steps_before_it() -> None:
    snap, commands = mixed(StepFailed(PIVOT, Reason.RETRIES_EXHAUSTED, partial=False))
    assert (snap.state, commands) == (SagaState.COMPENSATING, [Dispatch(BEGIN, "compensation")])
    snap, commands = advance(MIXED, snap, CompensationSucceeded(BEGIN))
    assert (snap.state, commands) == (SagaState.COMPENSATED, [])


def test_a_pivot_whose_retries_ran_out_compensates_too() -> None:
    snap, commands = mixed(StepFailed(PIVOT, Reason.RETRIES_EXHAUSTED, partial=True))
    assert snap.state is SagaState.COMPENSATING
    assert commands == [Dispatch(BEGIN, "compensation")]


def test_a_pivot_whose_outcome_is_unknown_parks_and_never_compensates() -> None:
    snap, commands = mixed(StepFailed(PIVOT, Reason.TIMEOUT, partial=True, unknown=True))
    assert (snap.state, snap.reason, commands) == (SagaState.FAILED, Reason.TIMEOUT, [])
    assert statuses(snap)[BEGIN] == (S.SUCCEEDED, C.PENDING)  # nothing undone
    snap, commands = advance(MIXED, snap, OperatorRetry())
    assert (snap.state, commands) == (SagaState.RUNNING, [Dispatch(PIVOT, "action")])


def test_after_the_pivot_the_saga_only_goes_forward_to_completion() -> None:
    snap, commands = mixed(StepSucceeded(PIVOT))
    assert commands == [Dispatch(PUT, "action")]
    snap, commands = advance(MIXED, snap, StepSucceeded(PUT))
    assert commands == [Dispatch(FINISH, "action")]
    snap, commands = advance(MIXED, snap, StepSucceeded(FINISH))
    assert (snap.state, commands) == (SagaState.COMPLETED, [])


@pytest.mark.parametrize(
    "failure",
    [
        StepFailed(PUT, Reason.RETRIES_EXHAUSTED, partial=False),  # a refusal
        StepFailed(PUT, Reason.RETRIES_EXHAUSTED, partial=True),  # dead-lettered
        StepFailed(PUT, Reason.TIMEOUT, partial=True, unknown=True),  # out of time
    ],
)
def test_a_retriable_step_that_gives_up_parks_and_is_never_compensated(failure: object) -> None:
    snap, commands = mixed(StepSucceeded(PIVOT), failure)
    assert (snap.state, commands) == (SagaState.FAILED, [])
    assert snap.current == PUT
    assert statuses(snap) == [
        (S.SUCCEEDED, C.PENDING),
        (S.SUCCEEDED, None),
        (S.FAILED, None),
        (S.PENDING, None),
    ]


def test_an_operator_retry_resumes_a_parked_retriable_step_with_a_fresh_request() -> None:
    parked, _ = mixed(StepSucceeded(PIVOT), StepFailed(PUT, Reason.RETRIES_EXHAUSTED, False))
    snap, commands = advance(MIXED, parked, OperatorRetry())
    assert (snap.state, commands) == (SagaState.RUNNING, [Dispatch(PUT, "action", fresh=True)])
    snap, commands = advance(MIXED, snap, StepSucceeded(PUT))
    assert commands == [Dispatch(FINISH, "action")]


def test_a_late_success_of_a_parked_retriable_step_carries_the_saga_on() -> None:
    parked, _ = mixed(StepSucceeded(PIVOT), StepFailed(PUT, Reason.TIMEOUT, True, unknown=True))
    snap, commands = advance(MIXED, parked, StepSucceeded(PUT))
    assert (snap.state, commands) == (SagaState.RUNNING, [Dispatch(FINISH, "action")])


def test_an_operator_compensate_after_the_pivot_does_not_apply() -> None:
    snap, _ = mixed(StepSucceeded(PIVOT))
    with pytest.raises(NotApplicable, match="pivot"):
        advance(MIXED, snap, OperatorCompensate())


def test_an_operator_compensate_while_the_pivot_is_in_flight_does_not_apply() -> None:
    snap, commands = mixed()
    assert commands == [Dispatch(PIVOT, "action")]
    with pytest.raises(NotApplicable, match="in flight"):
        advance(MIXED, snap, OperatorCompensate())
