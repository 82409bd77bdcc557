"""How many messages the batched consumers took per batch, read from the processes themselves.

Each process counts its batches in the ``saga_batch_messages`` histogram (``observe_batch`` in
orchestrator/ops/process_metrics.py) and serves it on its metrics endpoint; ``sagactl bench`` and
``sagactl chaos`` scrape every endpoint and report p50/p99 per process and queue. Percentiles
come from the histogram's buckets: exact up to 10 messages, else the bucket's upper bound.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

METRIC = "saga_batch_messages"
NOTHING_BATCHED = ("no batches observed: no process applied messages in batches during the "
                   "run (the consumers of this code take one message at a time)")

# {process: {queue: {"buckets": {upper bound: cumulative count}, "count": n, "sum": s}}}
Snapshot = dict[str, dict[str, dict[str, Any]]]


def parse(text: str) -> dict[str, dict[str, Any]]:
    """One endpoint's batch histograms, by queue."""
    out: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != METRIC:
            continue
        for sample in family.samples:
            queue = sample.labels.get("queue", "")
            entry = out.setdefault(queue, {"buckets": {}, "count": 0.0, "sum": 0.0})
            if sample.name.endswith("_bucket"):
                entry["buckets"][float(sample.labels["le"])] = sample.value
            elif sample.name.endswith("_count"):
                entry["count"] = sample.value
            elif sample.name.endswith("_sum"):
                entry["sum"] = sample.value
    return out


def scrape(endpoints: Mapping[str, str], timeout_s: float = 3.0) -> Snapshot:
    """Every endpoint's histograms (``{process: url}``); one that does not answer is left out."""
    snap: Snapshot = {}
    for process, url in endpoints.items():
        with contextlib.suppress(requests.RequestException):
            r = requests.get(url, timeout=timeout_s)
            if r.status_code == 200:
                snap[process] = parse(r.text)
    return snap


def delta(after: Snapshot, before: Snapshot) -> Snapshot:
    """What was counted between two snapshots (a process absent before counts from zero)."""
    out: Snapshot = {}
    for process, queues in after.items():
        for queue, entry in queues.items():
            old = before.get(process, {}).get(queue, {"buckets": {}, "count": 0.0, "sum": 0.0})
            out.setdefault(process, {})[queue] = {
                "buckets": {le: n - old["buckets"].get(le, 0.0)
                            for le, n in entry["buckets"].items()},
                "count": entry["count"] - old["count"],
                "sum": entry["sum"] - old["sum"],
            }
    return out


def add(total: Snapshot, more: Snapshot) -> Snapshot:
    """The sum of two snapshots (the counts of a process that was restarted, and its successor's)."""
    out: Snapshot = {p: {q: {"buckets": dict(e["buckets"]), "count": e["count"], "sum": e["sum"]}
                         for q, e in qs.items()} for p, qs in total.items()}
    for process, queues in more.items():
        for queue, entry in queues.items():
            mine = out.setdefault(process, {}).setdefault(
                queue, {"buckets": {}, "count": 0.0, "sum": 0.0})
            for le, n in entry["buckets"].items():
                mine["buckets"][le] = mine["buckets"].get(le, 0.0) + n
            mine["count"] += entry["count"]
            mine["sum"] += entry["sum"]
    return out


def _quantile(buckets: dict[float, float], count: float, q: float) -> float | str:
    """Nearest rank: the smallest bucket bound holding at least q % of the batches."""
    rank = max(1.0, math.ceil(count * q / 100))
    bounds = sorted(buckets)
    for le in bounds:
        if buckets[le] >= rank:
            if math.isinf(le):
                finite = [b for b in bounds if not math.isinf(b)]
                return f">{int(finite[-1])}" if finite else "inf"
            return int(le) if le == int(le) else le
    return "?"


def summary(snap: Snapshot) -> dict[str, dict[str, dict[str, Any]]]:
    """p50/p99 messages per batch, batches and messages, by process and queue; {} if none."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for process, queues in sorted(snap.items()):
        for queue, entry in sorted(queues.items()):
            count = entry["count"]
            if count <= 0:
                continue
            out.setdefault(process, {})[queue] = {
                "batches": int(count),
                "messages": int(entry["sum"]),
                "mean": round(entry["sum"] / count, 2),
                "p50": _quantile(entry["buckets"], count, 50),
                "p99": _quantile(entry["buckets"], count, 99),
            }
    return out


def lines(figures: dict[str, dict[str, dict[str, Any]]] | None, why_none: str) -> list[str]:
    """The report's lines: one per process and queue, or one saying why there are none."""
    if figures is None:
        return [f"batch sizes: not measured ({why_none})"]
    if not figures:
        return [f"batch sizes: {NOTHING_BATCHED}"]
    out = ["batch sizes (messages per batch; percentiles from the histogram's buckets):"]
    for process, queues in figures.items():
        for queue, f in queues.items():
            out.append(f"  {process} <- {queue}: p50 {f['p50']}, p99 {f['p99']}, mean "
                       f"{f['mean']} ({f['messages']} messages in {f['batches']} batches)")
    return out


class Sampler:
    """The batch sizes of a run whose processes are killed and restarted (``sagactl chaos``):
    each process instance's last scrape is kept, so a killed one still counts up to its last
    sample; sample often (every few seconds) and once more at the end."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, int], Snapshot] = {}

    def sample(self, procs: Any) -> None:
        for name, running in list(procs.running.items()):
            if running.metrics_port and running.proc.poll() is None:
                url = f"http://127.0.0.1:{running.metrics_port}/metrics"
                snap = scrape({name.split("#")[0]: url})
                if snap:
                    self._last[(name, running.proc.pid)] = snap

    def total(self) -> dict[str, dict[str, dict[str, Any]]]:
        merged: Snapshot = {}
        for snap in self._last.values():
            merged = add(merged, snap)
        return summary(merged)
