"""The parts of the chaos verdict that are functions of data: a saga parked by a disruption, and a
process that died unplanned, each break the run."""

from __future__ import annotations

import uuid

from orchestrator.proof.chaos import checks

BUDGET = 3


def parked(fault: str | None, compensation: str = "payment.refund") -> checks.Parked:
    return checks.Parked(uuid.uuid4(), str(uuid.uuid4()), compensation, fault)


def test_a_park_explained_by_a_permanent_fault_passes() -> None:
    explained = [parked("always"), parked("fail"), parked(f"transient:{BUDGET}")]
    assert checks.parked_by_chaos(explained, BUDGET) == []
    assert checks.no_park_by_chaos([]).ok


def test_a_park_no_permanent_fault_explains_breaks_the_run() -> None:
    unexplained = [parked(None), parked("crash"), parked("hang:6"), parked("transient:2")]
    by_chaos = checks.parked_by_chaos([parked("always"), *unexplained], BUDGET)
    assert by_chaos == unexplained
    check = checks.no_park_by_chaos(by_chaos)
    assert not check.ok
    assert set(check.order_ids) == {p.order_id for p in unexplained}
    assert "payment.refund parked, injected fault None" in check.detail[0]


def test_an_unexpected_process_exit_breaks_the_run() -> None:
    assert checks.no_unexpected_exit([]).ok
    check = checks.no_unexpected_exit(["relay (pid 7) exited with 1; its log ends:\nboom"])
    assert not check.ok and "relay (pid 7)" in check.detail[0]
