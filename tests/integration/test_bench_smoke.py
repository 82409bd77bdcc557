"""``sagactl bench`` in miniature: a tiny run must report every figure, with sane values, and leave
no sandbox behind. Timings are not asserted (the machine is shared); shapes and counts are."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from orchestrator.ops.config import DEFAULT_DATABASE_URL
from orchestrator.ops.processes import sagactl

N = 20
LATENCY_KEYS = ("p50_ms", "p95_ms", "p99_ms", "max_ms")


# `sagactl bench` starts its own sandbox and processes, not the session's shared system.
pytestmark = pytest.mark.own_system


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    result = subprocess.run(
        sagactl("bench", "-n", str(N), "--warmup", "5", "--concurrency", "4",
                "--idle-window", "3", "--floor", "--post-seconds", "2", "--json"),
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    data: dict[str, Any] = json.loads(result.stdout)
    assert "[saga]" in result.stderr  # progress went to stderr, the JSON alone to stdout
    return data


def _sane_latencies(figures: dict[str, Any]) -> None:
    values = [figures[k] for k in LATENCY_KEYS]
    assert 0 < values[0] <= values[1] <= values[2] <= values[3] < 120_000, figures


def test_the_saga_side_reports_every_figure(report: dict[str, Any]) -> None:
    saga = report["saga"]
    assert report["ok"] is True
    assert (saga["n"], saga["completed"], saga["errors"]) == (N, N, 0)
    assert saga["outcomes"] == {"completed": N}
    assert saga["sagas_per_s"] > 0
    _sane_latencies(saga)
    assert 0 < saga["post_p50_ms"] <= saga["post_p99_ms"]
    for hop in ("relay_pickup", "sent_to_reply_applied"):
        figures = saga["hops_ms"][hop]
        assert 0 <= figures["p50_ms"] <= figures["max_ms"], saga["hops_ms"]
    busy = {k: v for k, v in saga["cpu_s"].items() if v > 0}
    assert {"web", "orchestrator", "inventory", "payment", "orders"} <= set(busy)
    assert "relay" in saga["cpu_s"]  # measured; about idle, as the writers publish themselves


def test_the_raw_chain_runs_the_same_n_and_the_ratios_follow(report: dict[str, Any]) -> None:
    raw = report["raw"]
    assert (raw["n"], raw["completed"], raw["errors"]) == (N, N, 0)
    assert raw["sagas_per_s"] > 0
    _sane_latencies(raw)
    assert report["ratio"] == pytest.approx(report["saga"]["sagas_per_s"] / raw["sagas_per_s"],
                                            rel=0.01)
    assert report["p99_ratio"] == pytest.approx(report["saga"]["p99_ms"] / raw["p99_ms"],
                                                rel=0.01)


def test_the_floor_runs_six_tasks_committing_one_row_each(report: dict[str, Any]) -> None:
    floor = report["floor"]
    assert (floor["n"], floor["completed"], floor["errors"]) == (N, N, 0)
    _sane_latencies(floor)
    assert floor["commits_per_chain"] == 6.0
    assert report["floor_ratio"] == pytest.approx(
        floor["sagas_per_s"] / report["raw"]["sagas_per_s"], rel=0.01
    )


def test_messages_and_commits_per_saga_are_counted(report: dict[str, Any]) -> None:
    # Three commands and three replies per confirmed order, nothing more (no retries here).
    assert report["messages"]["commands"] == 3 * N
    assert report["messages"]["replies"] == 3 * N
    assert report["messages_per_saga"] == pytest.approx(6.0, abs=0.5)
    # At least the order's own commit (the web writes each order in a transaction of its own; a
    # worker's commit is shared by the sagas of its batch); far fewer than a runaway loop makes.
    assert 1 <= report["commits_per_saga"] < 60, report["commits"]


def test_the_sandbox_and_the_raw_vhost_are_gone(report: dict[str, Any]) -> None:
    name, vhost = report["sandbox"], report["raw_vhost"]
    assert name and vhost
    server = os.environ.get("SAGA_SANDBOX_DATABASE_URL", DEFAULT_DATABASE_URL)
    admin = sa.make_url(server).set(drivername="postgresql", database="postgres")
    with psycopg.connect(admin.render_as_string(hide_password=False)) as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() \
            is None
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    vhosts = subprocess.run([exe, "list_vhosts", "--silent"], capture_output=True, text=True,
                            timeout=60, check=True).stdout.split()
    assert name not in vhosts and vhost not in vhosts


def test_batch_sizes_are_reported_per_process_and_queue(report: dict[str, Any]) -> None:
    # Read from every process's metrics endpoint; {} (with a note saying so) while no
    # consumer batches, else p50/p99 messages per batch for each process and queue.
    figures = report["batch_sizes"]
    assert isinstance(figures, dict)
    if not figures:
        assert "no batches observed" in report["batch_sizes_note"]
    for queues in figures.values():
        for f in queues.values():
            assert f["batches"] >= 1 and f["messages"] >= f["batches"], f
            assert {"p50", "p99", "mean"} <= set(f)


def test_post_latency_is_measured_at_half_saturation_and_at_100_per_s(
    report: dict[str, Any],
) -> None:
    half, fixed = report["post_latency"]["half_saturation"], report["post_latency"]["at_100_per_s"]
    assert half["rate"] == pytest.approx(report["saga"]["sagas_per_s"] / 2, rel=0.1)
    assert half["accepted"] == half["n"] and half["drained"] is True, half
    assert fixed["rate"] == 100 and fixed["n"] == 200
    # Every request answered: accepted, or a 503 with Retry-After that the client retried.
    assert fixed["accepted"] + fixed["not_accepted"].get("gave up", 0) == fixed["n"], fixed
    assert set(fixed["not_accepted"]) <= {"503 (retried)", "gave up"}, fixed
    for figures in (half, fixed):
        assert 0 < figures["post_p50_ms"] <= figures["post_p99_ms"], figures
