"""The harness tells a planned death (its own kill, a fail point that fired, ``expect_exit``) from
a crash, which the integration tier fails a test on and chaos counts against its verdict."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.ops import failpoints
from orchestrator.proof.harness import Processes, Running, Sandbox


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    box = Sandbox("unit", "postgresql+psycopg://nowhere/unit", "amqp://nowhere/unit")
    points = tmp_path / "failpoints"
    points.mkdir()
    procs = Processes(box, tmp_path / "logs", extra_env={"SAGA_FAILPOINTS_DIR": str(points)})
    yield procs
    for running in procs.running.values():
        if running.proc.poll() is None:
            running.proc.kill()
        running.proc.wait()


def sleeper(procs: Processes, name: str, tmp_path: Path) -> Running:
    """A stand-in process with a log of its own, registered as ``name``."""
    log = tmp_path / f"{name}.log"
    log.write_text(f"{name} started\n{name}: the last words\n")
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    procs.running[name] = Running(name, proc, log, 0)
    return procs.running[name]


def test_a_process_that_dies_on_its_own_is_reported_with_its_log_tail(
    procs: Processes, tmp_path: Path
) -> None:
    relay = sleeper(procs, "relay", tmp_path)
    assert procs.take_unplanned_exits() == []
    os.kill(relay.proc.pid, signal.SIGKILL)
    relay.proc.wait()
    [death] = procs.take_unplanned_exits()
    assert (death.name, death.pid, death.returncode) == ("relay", relay.proc.pid, -9)
    assert "relay: the last words" in str(death)
    assert procs.take_unplanned_exits() == []  # reported once


def test_a_kill_by_the_harness_is_planned(procs: Processes, tmp_path: Path) -> None:
    sleeper(procs, "orchestrator", tmp_path)
    procs.kill("orchestrator")
    assert procs.take_unplanned_exits() == []


def test_a_death_hidden_by_a_later_kill_is_still_reported(procs: Processes, tmp_path: Path) -> None:
    beat = sleeper(procs, "beat", tmp_path)
    os.kill(beat.proc.pid, signal.SIGKILL)
    beat.proc.wait()
    procs.kill("beat")  # e.g. a restart: the crash before it must not vanish
    assert [d.name for d in procs.take_unplanned_exits()] == ["beat"]


def test_a_fail_point_that_fired_in_the_process_is_planned(
    procs: Processes, tmp_path: Path
) -> None:
    relay = sleeper(procs, "relay", tmp_path)
    points = tmp_path / "failpoints"
    (points / failpoints.FIRED).write_text(f"relay.after_publish {relay.proc.pid}\n")
    os.kill(relay.proc.pid, signal.SIGKILL)
    relay.proc.wait()
    assert procs.take_unplanned_exits() == []


def test_expect_exit_plans_a_death_the_harness_cannot_see(procs: Processes, tmp_path: Path) -> None:
    web = sleeper(procs, "web", tmp_path)
    procs.expect_exit("web")
    os.kill(web.proc.pid, signal.SIGKILL)
    web.proc.wait()
    assert procs.take_unplanned_exits() == []


def test_a_fail_point_records_the_pid_it_kills(tmp_path: Path) -> None:
    env = {**os.environ, "SAGA_FAULT_INJECTION": "1", "SAGA_FAILPOINTS_DIR": str(tmp_path)}
    (tmp_path / "relay.after_publish").touch()
    code = "from orchestrator.ops import failpoints; failpoints.hit('relay.after_publish')"
    child = subprocess.Popen([sys.executable, "-c", code], env=env)
    assert child.wait(timeout=60) == -signal.SIGKILL
    assert not (tmp_path / "relay.after_publish").exists()  # it fires once
    assert failpoints.fired_pids(tmp_path) == {child.pid}
