"""The batch-size figures of ``sagactl bench`` and ``sagactl chaos``: what a batched consumer
counts with ``observe_batch`` reaches the report as p50/p99 per process and queue."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from orchestrator.proof import batch_sizes

# A fresh interpreter: prometheus_client picks its (multiprocess) value class once, at import.
# The parent and a forked child (a pool process) both take batches; the parent's endpoint
# serves the merged histogram, as a worker's does.
_FED = textwrap.dedent(
    """
    import os, sys
    from orchestrator.ops import metrics_dir
    metrics_dir.prepare("orchestrator", sys.argv[1])
    from orchestrator.ops import process_metrics as pm

    for size in [1] * 50 + [3] * 40 + [7] * 9:
        pm.observe_batch("saga.orchestrator", size)
    pid = os.fork()
    if pid == 0:
        pm.observe_batch("saga.orchestrator", 60)
        pm.observe_batch("inventory", 2)
        os._exit(0)
    os.waitpid(pid, 0)
    sys.stdout.write(pm.render().decode())
    """
)


def _render(tmp_path: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-c", _FED, str(tmp_path)],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "SAGA_PROCESS": "orchestrator"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_batches_counted_in_parent_and_child_reach_the_report(tmp_path: Path) -> None:
    snap = {"orchestrator": batch_sizes.parse(_render(tmp_path))}
    figures = batch_sizes.summary(snap)
    mine = figures["orchestrator"]["saga.orchestrator"]
    # 100 batches: 50 of 1, 40 of 3, 9 of 7 and one of 60 (in the forked child).
    assert mine["batches"] == 100 and mine["messages"] == 50 + 120 + 63 + 60
    assert mine["p50"] == 1  # the 50th batch is the last of size 1
    assert mine["p99"] == 7  # the 99th: the last of size 7 (sizes up to 10 are exact)
    assert figures["orchestrator"]["inventory"] == {
        "batches": 1, "messages": 2, "mean": 2.0, "p50": 2, "p99": 2}
    text = "\n".join(batch_sizes.lines(figures, "unused"))
    assert "orchestrator <- saga.orchestrator: p50 1, p99 7" in text


def test_the_phase_counts_only_its_own_batches(tmp_path: Path) -> None:
    after = {"orchestrator": batch_sizes.parse(_render(tmp_path))}
    before = {"orchestrator": {"saga.orchestrator": {
        "buckets": {le: n for le, n in after["orchestrator"]["saga.orchestrator"]["buckets"].items()
                    if le < 1},  # the buckets below 1 hold nothing
        "count": 0.0, "sum": 0.0}}}
    assert batch_sizes.summary(batch_sizes.delta(after, before)) == batch_sizes.summary(after)
    assert batch_sizes.summary(batch_sizes.delta(after, after)) == {}


def test_a_restarted_process_adds_to_its_predecessor() -> None:
    one = {"inventory": {"inventory": {"buckets": {1.0: 2.0, 2.0: 2.0, float("inf"): 2.0},
                                       "count": 2.0, "sum": 2.0}}}
    two = {"inventory": {"inventory": {"buckets": {1.0: 0.0, 2.0: 1.0, float("inf"): 1.0},
                                       "count": 1.0, "sum": 2.0}}}
    both = batch_sizes.summary(batch_sizes.add(one, two))["inventory"]["inventory"]
    assert both == {"batches": 3, "messages": 4, "mean": 1.33, "p50": 1, "p99": 2}


def test_a_batch_above_the_largest_bucket_is_shown_as_such() -> None:
    snap = {"payment": {"payment": {"buckets": {512.0: 0.0, float("inf"): 1.0},
                                    "count": 1.0, "sum": 900.0}}}
    assert batch_sizes.summary(snap)["payment"]["payment"]["p99"] == ">512"


def test_nothing_batched_says_so_and_not_measured_says_why() -> None:
    assert batch_sizes.summary({"orchestrator": {}}) == {}
    assert batch_sizes.lines({}, "x") == [f"batch sizes: {batch_sizes.NOTHING_BATCHED}"]
    assert batch_sizes.lines(None, "no endpoints") == ["batch sizes: not measured (no endpoints)"]
