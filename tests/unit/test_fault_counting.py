"""Chaos counts the faults that fired, from the participants' own log lines, not the faults the
orders planned."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from orchestrator.messaging.envelopes import FAULT_FIRED, fault_fired_line
from orchestrator.proof.chaos.checks import faults_fired


def test_the_fired_line_reads_back() -> None:
    saga = uuid.uuid4()
    found = FAULT_FIRED.search(fault_fired_line("transient:2", "payment.charge", saga, 1))
    assert found and (found["fault"], found["step"], found["saga"]) == (
        "transient:2",
        "payment.charge",
        str(saga),
    )


def test_faults_are_counted_once_per_saga_and_step_with_every_strike(tmp_path: Path) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    text = [
        f"2026-01-01 WARNING payment [saga_id={a}] workers.faults: "
        + fault_fired_line("transient:2", "payment.charge", a, attempt)
        for attempt in (1, 2)
    ]
    (tmp_path / "payment.log").write_text("\n".join([*text, "an unrelated line"]) + "\n")
    as_json = {"message": fault_fired_line("crash", "inventory.release", b, 1)}
    (tmp_path / "inventory.log").write_text(json.dumps(as_json) + "\n")
    (tmp_path / "orchestrator.log").write_text(text[0] + "\n")  # not a participant: not counted
    assert faults_fired(tmp_path) == {
        "fired": {"transient": 1, "crash": 1},
        "strikes": {"transient": 2, "crash": 1},
    }
