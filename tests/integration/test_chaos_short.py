"""The chaos run's short form, for CI: about 90 s of orders, kills, cut connections and injected
faults against a sandbox of its own (``sagactl chaos``), then every invariant must hold."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from orchestrator.ops.processes import sagactl

DURATION_S = 90
SEED = 20240607


# `sagactl chaos` starts its own sandbox and processes, not the session's shared system.
pytestmark = pytest.mark.own_system


def _invariant(report: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in report["invariants"] if c["name"] == name)
    return found


def test_a_short_chaos_run_loses_nothing_and_keeps_every_invariant(artifacts: Path) -> None:
    result = subprocess.run(
        sagactl("chaos", "--duration", str(DURATION_S), "--seed", str(SEED), "--rate", "4",
                "--json", "--log-dir", str(artifacts / "chaos")),
        capture_output=True, text=True, timeout=DURATION_S + 600,
    )
    assert result.stdout.strip(), result.stderr[-4000:]
    (artifacts / "chaos" / "report.json").write_text(result.stdout)
    report = json.loads(result.stdout)
    broken = [c for c in report["invariants"] if not c["ok"]]
    assert not broken, json.dumps(broken, indent=2)[:6000] + f"\nlogs: {report['log_dir']}"
    assert _invariant(report, "every accepted order present")["detail"]["lost"] == 0
    assert _invariant(report, "no unexpected order")["detail"]["unexpected"] == 0
    assert report["drain"]["settled"]
    # The run really did something: orders of every kind, and disruptions of several kinds.
    assert report["orders"]["accepted"] >= 150
    assert set(report["faults_injected"]) >= {"transient", "always", "fail", "crash", "hang"}
    # What fired (the participants' own count) never exceeds what the orders planned.
    for kind, fired in report["faults_injected"].items():
        assert 0 < fired <= report["faults_planned"][kind], (kind, report["faults_planned"])
    # Deaths nobody planned and parks no injected fault explains are part of the verdict.
    assert _invariant(report, "no unexpected process exit")["ok"]
    assert _invariant(report, "no saga parked by a disruption")["ok"]
    assert report["disruptions"]["total"] >= 10
    assert {"kill", "close_connections", "terminate_backends"} <= set(
        report["disruptions"]["by_action"])
    assert not report["broker_restart"]["done"]  # the shared broker is never restarted in CI
    # Batch sizes by process and queue, read from each process's endpoint ({}: none batched).
    assert isinstance(report["batch_sizes"], dict)
    assert result.returncode == 0, result.stderr[-4000:]
