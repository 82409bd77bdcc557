"""Traces on real processes: with ``OTEL_EXPORTER_OTLP_ENDPOINT`` pointed at a receiver in this
test, one order is one trace from ``POST /orders`` through every command, task and reply of its
saga, in causal order, each span carrying the saga's id; a return is a trace of its own; a command
the sweeper re-sends minutes later (here: seconds) joins its saga's trace; the web's own fast-path
publish is in the trace as the relay's is. Without the variable, no process sends anything (the
SDK's own default endpoint variable, set as a trap, stays unused).

The workers run as they do by default: commands and replies consumed in batches
(orchestrator/messaging/batches.py), outside Celery's task signals, so every run span here is one
the batch consumers make.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.proof.client import Api
from orchestrator.proof.harness import SHORT_TIMINGS, Processes, Sandbox, sandbox_in_use
from tests.integration.helpers import make_product, order_body, place, wait_final
from tests.otlp_receiver import SERVER_KIND, ReceivedSpan, Receiver, receiving

pytestmark = pytest.mark.own_system  # a sandbox and processes of its own (tracing on)

STEP_TIMEOUT_S = float(SHORT_TIMINGS["SAGA_STEP_TIMEOUT_S"])
# Task runs (service, message), in causal order.
ORDER_RUNS = [
    ("inventory", "inventory.reserve"),
    ("orchestrator", "inventory.reserve.reply"),
    ("payment", "payment.charge"),
    ("orchestrator", "payment.charge.reply"),
    ("orders", "orders.confirm"),
    ("orchestrator", "orders.confirm.reply"),
]
RETURN_RUNS = [
    ("payment", "payment.return_refund"),
    ("orchestrator", "payment.return_refund.reply"),
    ("inventory", "inventory.return_stock"),
    ("orchestrator", "inventory.return_stock.reply"),
    ("orders", "orders.complete_return"),
    ("orchestrator", "orders.complete_return.reply"),
]
EVERY_SERVICE = {"web", "inventory", "payment", "orders", "orchestrator"}


@pytest.fixture(scope="module")
def collector() -> Iterator[Receiver]:
    with receiving() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def box(sandbox: Sandbox) -> Iterator[Sandbox]:
    # ``sandbox``: the session's, which this process goes back to afterwards.
    own = Sandbox.create("sagatest")
    try:
        with sandbox_in_use(own):
            yield own
    finally:
        own.destroy()


def traced_env(collector: Receiver) -> dict[str, str]:
    return {
        **SHORT_TIMINGS,
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # the SDK's batch delay: spans within a second
    }


@pytest.fixture(scope="module")
def traced(box: Sandbox, collector: Receiver, artifacts: Path) -> Iterator[Processes]:
    procs = Processes(box, artifacts / "tracing", extra_env=traced_env(collector))
    # The web leaves its commands to the relay: the relay's publishes are traced too (it has no
    # span of its own to hang them on; only the outbox row's header links them).
    procs.start_all(env={"web": {"SAGA_OUTBOX_FAST_PATH": "0"}})
    yield procs
    procs.stop_all()


def trace_of(
    collector: Receiver, saga_id: str, runs: int, timeout_s: float = 30
) -> list[ReceivedSpan]:
    """The spans of the one trace that carries ``saga_id``, by start time, once it holds ``runs``
    task runs and every span's parent has arrived too."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = collector.snapshot()
        traces = {s.trace_id for s in spans if s.attributes.get("saga.id") == saga_id}
        trace = sorted((s for s in spans if s.trace_id in traces), key=lambda s: s.start_ns)
        ids = {s.span_id for s in trace}
        complete = all(not s.parent_id or s.parent_id in ids for s in trace)
        if len(traces) == 1 and complete and sum(s.name.startswith("run/") for s in trace) >= runs:
            return trace
        if time.monotonic() >= deadline:
            shown = "\n".join(f"  {s.service} {s.name} {s.trace_id[:8]}" for s in trace)
            raise AssertionError(
                f"{len(traces)} trace(s) carry saga {saga_id}, complete={complete}:\n{shown}"
            )
        time.sleep(0.1)


def runs_of(trace: list[ReceivedSpan]) -> list[tuple[str, str]]:
    """Each task run's (service, message) by the start of its first run: a message delivered
    twice (the relay sending a row whose fast-path mark came late, a redelivery) is harmless by
    design and counted once."""
    seen: list[tuple[str, str]] = []
    for span in trace:
        if span.name.startswith("run/"):
            run = (span.service, str(span.attributes.get("saga.command")))
            if run not in seen:
                seen.append(run)
    return seen


def assert_one_saga_trace(trace: list[ReceivedSpan], saga_id: str, route: str) -> None:
    root = trace[0]
    assert (root.service, root.kind, root.parent_id) == ("web", SERVER_KIND, ""), root
    assert root.name.startswith("POST") and root.attributes.get("http.route") == route, root
    assert [s for s in trace if s.attributes.get("saga.id") != saga_id] == []
    assert {s.service for s in trace} >= EVERY_SERVICE


def test_one_order_is_one_trace_across_every_process_in_order(
    traced: Processes, collector: Receiver
) -> None:
    api = Api.connect(traced.url)
    placed = place(api, order_body(make_product(stock=5)))
    assert wait_final(api, placed["order_id"])["saga"]["state"] == "completed"
    trace = trace_of(collector, placed["saga_id"], runs=len(ORDER_RUNS))

    assert_one_saga_trace(trace, placed["saga_id"], "/orders")
    assert runs_of(trace) == ORDER_RUNS
    # Every run is a batch consumer's span (Celery's instrumentation never saw these messages).
    assert not [s for s in trace if s.name.startswith("run/") and "celery.action" in s.attributes]
    for span in trace:
        if span.name.startswith(("run/", "dispatch ")) and span.name != "run/saga.reply":
            assert span.attributes["saga.business_key"] == placed["order_id"], span
            assert span.attributes["saga.attempt"] >= 1, span
    # Each command dispatched in the saga's trace, attempt 1 first (a loaded machine may pass a
    # step's deadline: the sweep's re-send, attempt 2, joins the same trace).
    commands = ["inventory.reserve", "payment.charge", "orders.confirm"]
    dispatches = [s for s in trace if s.name.startswith("dispatch ")]
    firsts: dict[str, int] = {}
    for span in dispatches:
        firsts.setdefault(span.name, span.attributes["saga.attempt"])
    assert firsts == {f"dispatch {c}": 1 for c in commands}
    assert list(firsts) == [f"dispatch {c}" for c in commands]
    # Each command was published in a span of its own, a child of its dispatch (the relay for
    # the web's; the orchestrator's fast path, or the relay or sweeper after the grace period),
    # and consumed in a child of that.
    by_id = {s.span_id: s for s in trace}
    first = {s.attributes["saga.publisher"] for s in trace if s.name == "publish inventory.reserve"}
    assert first and first <= {"relay", "sweeper"}  # the web has no fast path here
    for span in trace:
        if span.name.startswith("run/") and span.name != "run/saga.reply":
            publish = by_id[span.parent_id]
            assert publish.name == f"publish {span.attributes['saga.command']}", publish
            assert publish.attributes["saga.publisher"] in ("fast_path", "relay", "sweeper")
            assert by_id[publish.parent_id].name.startswith("dispatch "), publish

    # The trace id is in the log lines of the saga's work, in every process.
    trace_id = trace[0].trace_id
    for name in ("web", "inventory", "payment", "orders", "orchestrator"):
        lines = [line for line in traced.output(name).splitlines() if placed["saga_id"] in line]
        assert any(f"trace_id={trace_id}" in line for line in lines), (name, lines)


def test_a_return_is_a_trace_of_its_own(traced: Processes, collector: Receiver) -> None:
    api = Api.connect(traced.url)
    placed = place(api, order_body(make_product(stock=5)))
    assert wait_final(api, placed["order_id"])["saga"]["state"] == "completed"
    started = api.return_order(placed["order_id"])
    assert started.status_code == 202, started.text
    return_saga = started.json()["saga_id"]
    assert api.wait_returned(placed["order_id"], 60)["returns"][-1]["state"] == "completed"

    trace = trace_of(collector, return_saga, runs=len(RETURN_RUNS))
    assert_one_saga_trace(trace, return_saga, "/orders/<order_id>/return")
    assert runs_of(trace) == RETURN_RUNS
    order_trace = trace_of(collector, placed["saga_id"], runs=len(ORDER_RUNS))
    assert order_trace[0].trace_id != trace[0].trace_id


def test_a_command_the_sweeper_sends_again_joins_its_sagas_trace(
    traced: Processes, collector: Receiver
) -> None:
    api = Api.connect(traced.url)
    hang_s = STEP_TIMEOUT_S * 2  # past the step's deadline: the sweep sends attempt 2
    body = order_body(make_product(stock=5), faults={"payment.charge": f"hang:{hang_s:g}"})
    placed = place(api, body)
    assert wait_final(api, placed["order_id"], timeout_s=hang_s + 30)["saga"]["state"] == (
        "completed"
    )
    # Both attempts' runs and the late reply of the first: 8 runs in all.
    trace = trace_of(collector, placed["saga_id"], runs=len(ORDER_RUNS) + 2)

    assert_one_saga_trace(trace, placed["saga_id"], "/orders")
    charges = [s for s in trace if s.name == "run/payment.charge"]
    assert {1, 2} <= {s.attributes["saga.attempt"] for s in charges}
    resent = [
        s
        for s in trace
        if s.name == "dispatch payment.charge" and s.attributes["saga.attempt"] >= 2
    ]
    # Sent from the orchestrator's sweep (a trace of its own), to which each links.
    assert resent and all(s.service == "orchestrator" and s.links for s in resent), resent
    linked = {link for s in resent for link in s.links}
    deadline = time.monotonic() + 10  # the sweep's own span ends (and is exported) after
    while not linked <= (sweeps := sweep_spans(collector)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert linked <= sweeps


def sweep_spans(collector: Receiver) -> set[str]:
    return {s.span_id for s in collector.snapshot() if s.name == "run/saga.sweep"}


def one_order_on_its_own(
    box: Sandbox, collector: Receiver, logs: Path, env: dict[str, str]
) -> list[ReceivedSpan]:
    """One order through a system of its own (traced, with ``env``): its saga's whole trace."""
    procs = Processes(box, logs, extra_env={**traced_env(collector), **env})
    procs.start_all()
    try:
        api = Api.connect(procs.url)
        placed = place(api, order_body(make_product(stock=5)))
        assert wait_final(api, placed["order_id"])["saga"]["state"] == "completed"
        trace = trace_of(collector, placed["saga_id"], runs=len(ORDER_RUNS))
    finally:
        procs.stop_all()
    assert_one_saga_trace(trace, placed["saga_id"], "/orders")
    assert runs_of(trace) == ORDER_RUNS
    return trace


def test_the_webs_fast_path_publish_is_in_the_trace(
    box: Sandbox, collector: Receiver, traced: Processes, artifacts: Path
) -> None:
    """The web's publish right after its one-statement commit (its background publisher, group
    confirms) is a span of the order's trace too, child of the dispatch its row names."""
    traced.stop_all()  # one system at a time on this sandbox
    trace = one_order_on_its_own(box, collector, artifacts / "tracing-fast-path", {})
    by_id = {s.span_id: s for s in trace}
    parents = [by_id[s.parent_id] for s in trace if s.name == "run/inventory.reserve"]
    web = [
        p for p in parents if p.service == "web" and p.attributes["saga.publisher"] == "fast_path"
    ]
    assert web and by_id[web[0].parent_id].name == "dispatch inventory.reserve", parents


def test_without_batches_celerys_task_runs_are_the_trace(
    box: Sandbox, collector: Receiver, traced: Processes, artifacts: Path
) -> None:
    """``SAGA_BATCH_MAX=0``: Celery runs one task per message, and its instrumentation's run spans
    (parent: the message's ``traceparent``) make the same trace, in the same order."""
    traced.stop_all()
    trace = one_order_on_its_own(box, collector, artifacts / "tracing-celery",
                                 {"SAGA_BATCH_MAX": "0"})
    runs = [s for s in trace if s.name.startswith("run/")]
    assert all(s.attributes.get("celery.action") == "run" for s in runs), runs
    assert all(s.attributes["saga.attempt"] >= 1 for s in runs), runs


def test_without_the_endpoint_no_process_sends_a_span(
    box: Sandbox, collector: Receiver, traced: Processes, artifacts: Path
) -> None:
    traced.stop_all()  # one system at a time on this sandbox; its processes flushed on the way out
    before = collector.requests
    # The SDK's own variable for the traces endpoint, as a trap: an exporter made anyway (by
    # default, or by an instrumentation) would send its spans here.
    procs = Processes(
        box,
        artifacts / "tracing-off",
        extra_env={
            **SHORT_TIMINGS,
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{collector.url}/v1/traces",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        },
    )
    procs.start_all()
    try:
        api = Api.connect(procs.url)
        placed = place(api, order_body(make_product(stock=5)))
        assert wait_final(api, placed["order_id"])["saga"]["state"] == "completed"
    finally:
        procs.stop_all()  # a provider, had one been made, exports at exit
    assert collector.requests == before
    for name in procs.running:
        output = procs.output(name)
        assert "tracing on" not in output and "trace_id=" not in output, name
