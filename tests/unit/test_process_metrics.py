"""The pieces of the processes' metrics that need no services: multiprocess folders, merging a
forked child's counts, dropping a killed child's live gauges, node names and ports."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.ops import metrics_dir
from orchestrator.ops.processes import metrics_ports, process_table, worker_node_name


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_prepare_gives_a_fresh_folder_and_removes_those_of_processes_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(metrics_dir.MULTIPROC_ENV, raising=False)
    gone = tmp_path / f"payment-{_dead_pid()}"
    alive = tmp_path / f"relay-{os.getppid()}"
    own = tmp_path / f"web-{os.getpid()}"
    for folder in (gone, alive, own):
        folder.mkdir()
        (folder / "counter_1.db").write_bytes(b"old")
    metrics_dir.prepare("web", str(tmp_path))
    assert os.environ[metrics_dir.MULTIPROC_ENV] == str(own)
    assert own.is_dir() and not list(own.iterdir())  # an earlier run's counts never add up
    assert not gone.exists()
    assert (alive / "counter_1.db").exists()  # another live process's files are its own


def test_prepare_disabled_leaves_no_folder_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(metrics_dir.MULTIPROC_ENV, str(tmp_path))
    metrics_dir.prepare("relay", str(tmp_path), enabled=False)
    assert metrics_dir.MULTIPROC_ENV not in os.environ


# Run in a fresh interpreter: prometheus_client picks its value class once, at import.
_FORKED = textwrap.dedent(
    """
    import os, signal, sys
    from orchestrator.ops import metrics_dir
    metrics_dir.prepare("payment", sys.argv[1])
    from prometheus_client.parser import text_string_to_metric_families
    from orchestrator.ops import process_metrics as pm

    def value(name):
        text = pm.render().decode()
        return sum(s.value for f in text_string_to_metric_families(text)
                   for s in f.samples if s.name == name)

    pm.task_started("parent-task")  # the parent holds one task in hand throughout
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a pool child: runs a task, starts another, then is killed mid-way
        pm.task_started("t1")
        pm.task_finished("t1", "payment.charge", "SUCCESS")
        pm.task_started("t2")
        os.write(w, b"x")
        signal.pause()
    os.read(r, 1)
    before = value("saga_worker_tasks_active")
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    print(value("saga_worker_tasks_total"), before, value("saga_worker_tasks_active"))
    """
)


def test_a_forked_childs_counts_merge_and_a_killed_childs_live_gauge_goes(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _FORKED, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SAGA_PROCESS": "payment"},
    )
    assert result.returncode == 0, result.stderr
    tasks, active_before, active_after = map(float, result.stdout.split())
    assert tasks == 1  # counted in the child, served by the parent
    assert active_before == 2  # the parent's and the child's task in hand
    assert active_after == 1  # the SIGKILLed child's is dropped at the next scrape


def test_worker_node_names_are_unique_per_process_unless_the_host_is() -> None:
    assert worker_node_name("payment") == f"payment-{os.getpid()}@%h"
    assert worker_node_name("payment", "{name}@%h") == "payment@%h"


def test_run_hands_out_one_metrics_port_per_process_but_the_web() -> None:
    ports = metrics_ports(list(process_table()), "9101")
    assert set(ports) == set(process_table()) - {"web"}
    assert sorted(ports.values()) == list(range(9101, 9101 + len(process_table()) - 1))
    assert metrics_ports(list(process_table()), None) == {}
