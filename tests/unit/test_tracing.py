"""orchestrator/ops/tracing.py: its API's spans and headers, log lines that carry the trace id,
nothing at all when off, and an exporter of its own in a forked child."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestrator.ops import tracing
from orchestrator.ops.logs import ContextFilter, JsonFormatter, TextFormatter, log_context

ROOT = Path(__file__).resolve().parents[2]
HOSTILE = "x\r\n2026-01-01 00:00:00,000 INFO web forged\x1b[2J"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.setup("test", exporter=lambda: exporter)
    yield exporter
    tracing.shutdown()


def finished(exporter: InMemorySpanExporter) -> dict[str, object]:
    tracing.flush()
    return {span.name: span for span in exporter.get_finished_spans()}


def line(formatter: logging.Formatter, **extra: str) -> str:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "hello", None, None)
    record.__dict__.update(extra)
    with log_context(saga_id="s-1"):
        ContextFilter().filter(record)
    return formatter.format(record)


def test_log_lines_carry_the_trace_id_when_a_span_is_active(
    spans: InMemorySpanExporter,
) -> None:
    assert "trace_id=" not in line(TextFormatter("web"))  # no span: no id
    assert "trace_id" not in json.loads(line(JsonFormatter("web")))
    with tracing.current(tracing.received({}, "work")):
        trace_id = tracing.current_trace_id()
        assert trace_id is not None and len(trace_id) == 32
        assert f"[saga_id=s-1 trace_id={trace_id}]" in line(TextFormatter("web"))
        assert json.loads(line(JsonFormatter("web")))["trace_id"] == trace_id
        # A trace id given by hand goes through the same escaping as every field.
        forged = line(TextFormatter("web"), trace_id=HOSTILE)
        assert "\n" not in forged and "\x1b" not in forged and "x\\r\\n2026" in forged
        assert "\\x1b[2J" in json.loads(line(JsonFormatter("web"), trace_id=HOSTILE))["trace_id"]


def test_a_consumer_span_is_a_child_of_the_message_traceparent(
    spans: InMemorySpanExporter,
) -> None:
    headers: dict[str, str] = {"saga_id": "s-1"}
    with tracing.producing(headers, "send", {tracing.SAGA_ID: "s-1"}):
        pass
    assert headers["traceparent"].startswith("00-")
    tracing.finish(tracing.received(headers, "receive", {tracing.SAGA_ID: "s-1", "none": None}))
    tracing.finish(tracing.received({"saga_id": "s-2"}, "orphan"))
    got = finished(spans)
    sent, received = got["send"], got["receive"]
    assert received.parent.span_id == sent.context.span_id  # type: ignore[attr-defined]
    assert received.context.trace_id == sent.context.trace_id  # type: ignore[attr-defined]
    assert dict(received.attributes) == {tracing.SAGA_ID: "s-1"}  # type: ignore[attr-defined]
    assert got["orphan"].parent is None  # type: ignore[attr-defined]  # no traceparent: a new trace


def test_a_batch_gets_one_span_per_message_each_under_its_own_parent(
    spans: InMemorySpanExporter,
) -> None:
    first = tracing.saga_trace("s-1", "o-1")[tracing.TRACE_KEY]
    second = tracing.saga_trace("s-2", "o-2")[tracing.TRACE_KEY]
    batch = [dict(first), dict(second)]
    with tracing.publishing([(h, f"publish {i}", {"n": i}) for i, h in enumerate(batch)]):
        pass
    got = finished(spans)
    roots = {s.attributes[tracing.SAGA_ID]: s for s in got.values() if s.parent is None}  # type: ignore[attr-defined]
    for i, saga in enumerate(("s-1", "s-2")):
        publish = got[f"publish {i}"]
        assert publish.parent.span_id == roots[saga].context.span_id  # type: ignore[attr-defined]
        # The message now names its publish span: its consumer becomes that span's child.
        assert batch[i]["traceparent"].split("-")[2] == f"{publish.context.span_id:016x}"  # type: ignore[attr-defined]


def test_a_dispatch_from_outside_a_saga_trace_joins_it_and_links_to_the_current_span(
    spans: InMemorySpanExporter,
) -> None:
    stored = tracing.saga_trace("s-1", "o-1")[tracing.TRACE_KEY]
    sweep_run = tracing.received({}, "sweep")
    with tracing.current(sweep_run):
        tracing.dispatched("dispatch", {}, stored)
    tracing.finish(sweep_run)
    reply_run = tracing.received(stored, "reply")
    with tracing.current(reply_run):
        tracing.dispatched("dispatch again", {}, stored)
    tracing.finish(reply_run)
    got = finished(spans)
    saga = next(s for s in got.values() if s.name.startswith("saga "))
    dispatch, sweep = got["dispatch"], got["sweep"]
    assert dispatch.context.trace_id == saga.context.trace_id != sweep.context.trace_id  # type: ignore[attr-defined]
    assert [link.context.span_id for link in dispatch.links] == [sweep.context.span_id]  # type: ignore[attr-defined]
    # Already in the saga's trace: a plain child, no link.
    again = got["dispatch again"]
    assert again.parent.span_id == got["reply"].context.span_id and not again.links  # type: ignore[attr-defined]


def test_a_batch_message_span_is_current_only_where_its_work_is(
    spans: InMemorySpanExporter,
) -> None:
    """A batch consumer's span per message (``received``): started with the batch, current
    around that message's work (``current``), ended when it is settled (``finish``)."""
    stored = tracing.saga_trace("s-1", "o-1")[tracing.TRACE_KEY]
    first = tracing.received(stored, "run/one", {tracing.SAGA_ID: "s-1"})
    second = tracing.received({}, "run/two")
    assert tracing.current_trace_id() is None
    with tracing.current(first):
        assert tracing.current_trace_id() == f"{first.get_span_context().trace_id:032x}"
        trace = tracing.dispatched("dispatch next", {"saga_id": "s-1", "attempt": 1}, stored)
    assert tracing.current_trace_id() is None
    tracing.finish(first)
    tracing.finish(second, error="rejected: poison")
    got = finished(spans)
    one, two, dispatch = got["run/one"], got["run/two"], got["dispatch next"]
    assert (
        one.parent.span_id
        == next(s for s in got.values() if s.name.startswith("saga ")).context.span_id
    )  # type: ignore[attr-defined]
    assert dispatch.parent.span_id == one.context.span_id and not dispatch.links  # type: ignore[attr-defined]
    assert trace["traceparent"].split("-")[2] == f"{dispatch.context.span_id:016x}"  # type: ignore[attr-defined]
    assert dict(dispatch.attributes) == {tracing.SAGA_ID: "s-1", tracing.ATTEMPT: 1}  # type: ignore[attr-defined]
    assert two.parent is None and not two.status.is_ok  # type: ignore[attr-defined]


def test_off_every_call_does_nothing() -> None:
    assert not tracing.enabled()
    headers: dict[str, str] = {}
    with (
        tracing.producing(headers, "x"),
        tracing.publishing([(headers, "p", None)]),
        tracing.current(tracing.received({}, "r")),
    ):
        tracing.inject(headers)
        tracing.tag({"a": 1})
    assert headers == {} and tracing.carrier() == {} and tracing.current_trace_id() is None
    assert tracing.saga_trace("s", "o") == {} and tracing.envelope_attributes({"saga_id": 1}) == {}
    assert tracing.dispatched("d", {"saga_id": 1}, {"traceparent": "x"}) == {}


def test_without_the_endpoint_no_process_imports_opentelemetry() -> None:
    """Each process's set-up, run as it runs at start: no SDK, no exporter, no import at all."""
    script = """
import sys
from orchestrator.bootstrap import bootstrap, worker_app
from orchestrator.messaging import batches, outbox, worker_signals
from orchestrator.ops import tracing
from web import create_app
from web.serving import JsonErrorWorker
bootstrap()
worker_app("payment")
worker_app("orchestrator")
worker_signals._fresh_pool_after_fork()
create_app()
assert not tracing.enabled() and not tracing.setup("web")
with tracing.current(tracing.received({}, "x")):
    tracing.flush()
row = outbox.row("payment.charge", {"saga_id": "s", "request_id": "r", "payload": {}})
assert "traceparent" not in row.headers
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = _fresh_interpreter(script, env)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_forked_child_exports_through_an_exporter_of_its_own(tmp_path: Path) -> None:
    made = tmp_path / "made"

    def exporter() -> InMemorySpanExporter:
        with open(made, "a") as f:
            f.write(f"{os.getpid()}\n")
        built = InMemorySpanExporter()
        exporters.append(built)
        return built

    exporters: list[InMemorySpanExporter] = []
    assert tracing.setup("test", exporter=exporter)
    try:
        tracing.finish(tracing.received({}, "parent"))
        tracing.flush()
        pid = os.fork()
        if pid == 0:  # the child: its own exporter, started by after_fork
            code = 1
            try:
                tracing.after_fork()
                tracing.finish(tracing.received({}, "child"))
                tracing.flush()
                names = [s.name for s in exporters[-1].get_finished_spans()]
                code = 0 if len(exporters) == 2 and names == ["child"] else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert made.read_text().split() == [str(os.getpid()), str(pid)]
        assert [s.name for s in exporters[0].get_finished_spans()] == ["parent"]
    finally:
        tracing.shutdown()


def test_with_the_endpoint_the_bootstrap_sets_tracing_up_once() -> None:
    """Importing attaches nothing even with the variable set; ``bootstrap()`` sets the SDK and
    Celery's instrumentation up, and a second call attaches nothing more."""
    script = """
import importlib, pkgutil, sys
from celery.signals import before_task_publish, task_prerun
import orchestrator, workers, web
for package in (orchestrator, workers, web):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not info.name.startswith("orchestrator.proof"):
            importlib.import_module(info.name)
from orchestrator.ops import tracing
imported = [m for m in sys.modules if m.startswith("opentelemetry")]
before = (tracing.enabled(), len(task_prerun.receivers), len(before_task_publish.receivers))
from orchestrator.bootstrap import bootstrap
bootstrap()
once = (tracing.enabled(), len(task_prerun.receivers), len(before_task_publish.receivers))
bootstrap()
twice = (tracing.enabled(), len(task_prerun.receivers), len(before_task_publish.receivers))
print(imported, before, once, twice)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:9"  # never reached: no span is made
    done = _fresh_interpreter(script, env)
    # Celery's prerun: the metrics' handler, then the instrumentation's; before_task_publish:
    # only our context injection (the instrumentation's publish spans are left out).
    last = done.stdout.strip().splitlines()[-1]
    assert last == "[] (False, 0, 0) (True, 2, 1) (True, 2, 1)", last


def _fresh_interpreter(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``script`` run by a new Python in the project's root (nothing imported or set up yet)."""
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done
