"""Traces (OpenTelemetry): one trace per saga across every process; nothing at all when off.

On only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set: ``setup(process)`` (called once by the
process's bootstrap, orchestrator/bootstrap.py) then builds the SDK (spans batched to
``<endpoint>/v1/traces`` over OTLP/HTTP), instruments Celery's task runs and, through
``instrument_flask``, the web's requests. Unset, opentelemetry is never imported and every
function here returns at once (no span, no header, no thread): ``enabled()`` is the one boolean
the hot paths test before any per-message work.

How a saga's context travels: ``saga_start`` stores its trace context in the saga's context
(``TRACE_KEY``); every command is dispatched in a span of that trace (``dispatched``: a sweep or an
operator's action minutes later joins it too), whose W3C ``traceparent`` the outbox row keeps in
its headers; whoever publishes the row (fast path, relay, sweeper, a batch consumer) does so in a
``publishing`` span child of it, and the consumer's span is a child of the publish.

The API, for code that consumes or publishes messages outside Celery's signals (the outbox's raw
AMQP publishes, the batch consumers); all no-ops when tracing is off:

- ``setup(process) -> bool`` once per process at start; ``after_fork()`` first thing in a forked
  child (a prefork pool process); ``flush()`` before a child exits.
- ``received(headers, name, attributes) -> span | None``: a CONSUMER span for one message of a
  batch, child of its ``traceparent``, not current; ``current(span)`` makes it current for a
  block (the work and log lines of that message), ``finish(span, error)`` ends it.
- ``with producing(headers, name, attributes):`` one message about to be sent: a PRODUCER span,
  current for the block, whose context is written into ``headers``.
- ``with publishing([(headers, name, attributes), ...]):`` a batch sent at once: one PRODUCER
  span per message, child of the context in its own headers (else the current one), its context
  written back there; they end together when the block does (the broker confirmed).
- ``dispatched(name, envelope, within) -> carrier``: a command decided now, as a span of the
  saga's trace (``within``: its stored carrier: a plain child of the current span when that is
  in the saga's trace already, else a child of the stored context linked to the current span, as
  for a sweep's re-send or an operator's retry), and that span's context to keep with the row.
- ``inject(headers)``, ``carrier(span=None) -> dict``: the current (or a given span's) context as
  W3C headers; ``saga_trace(saga_id, business_key)``: what a new saga stores of it.
- ``tag(attributes)``: attributes on the current span. ``envelope_attributes(envelope)``: the
  saga id, business key, step, command and attempt of a wire envelope, named as below.
- ``current_trace_id() -> str | None``: for log lines.

Fork safety: each process makes its own exporter and BatchSpanProcessor the first time it needs
them (``_PerProcessBatch``); one inherited over a fork would share the parent's HTTP connection.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported only when tracing is on
    from opentelemetry.sdk.trace import ReadableSpan, Span, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)

# Where a saga keeps its trace context (in its context JSON; the kernel writes it at the start).
TRACE_KEY = "trace"

# Span attribute names.
SAGA_ID = "saga.id"
BUSINESS_KEY = "saga.business_key"  # the order id in the shop's sagas
STEP = "saga.step"
COMMAND = "saga.command"
ATTEMPT = "saga.attempt"
PUBLISHER = "saga.publisher"  # fast_path, relay, sweeper

# The web's requests that are not traced (probes and scrapes, polled all day).
UNTRACED_URLS = "healthz,metrics,static"

Attributes = Mapping[str, Any]
Headers = MutableMapping[str, Any]


@dataclass
class _State:
    provider: TracerProvider
    tracer: Tracer
    batch: _PerProcessBatch
    where: str = ""


_state: _State | None = None


def enabled() -> bool:
    return _state is not None


def setup(process: str, exporter: Callable[[], SpanExporter] | None = None) -> bool:
    """Tracing for this process, if ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (True then).

    ``exporter`` builds the span exporter instead of OTLP/HTTP (tests: an in-memory one)."""
    global _state
    from orchestrator.ops.config import settings

    endpoint = settings().otel_endpoint
    if _state is not None:
        return True
    if not endpoint and exporter is None:
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    kind = process.split("#")[0]
    resource = Resource.create(
        {
            "service.name": kind,
            "service.namespace": "saga-orchestrator",
            "service.instance.id": f"{process}-{os.getpid()}",
        }
    )
    provider = TracerProvider(resource=resource)
    batch = _PerProcessBatch(exporter or _otlp_exporter(endpoint))
    provider.add_span_processor(batch)  # type: ignore[arg-type]  # a SpanProcessor by its methods
    trace.set_tracer_provider(provider)  # once per process; other libraries' spans join ours
    _state = _State(provider, provider.get_tracer("saga-orchestrator"), batch)
    _instrument_celery(provider)
    _state.where = f"spans of {kind} exported to {endpoint or 'a test exporter'}"
    announce()
    return True


def announce() -> None:
    """Say that this process traces (again once its logging is set up: logs.setup_logging)."""
    if _state is not None:
        log.info("tracing on: %s", _state.where)


def _otlp_exporter(endpoint: str) -> Callable[[], SpanExporter]:
    def build() -> SpanExporter:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # The other OTEL_EXPORTER_OTLP_* variables (headers, timeout, compression) apply as usual.
        return OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")

    return build


def after_fork() -> None:
    """In a forked child: start this process's own exporter now, not at its first span."""
    if _state is not None:
        _state.batch.here()


def flush() -> None:
    """Export what is waiting (a child that leaves by ``os._exit`` skips atexit)."""
    if _state is not None:
        _state.batch.force_flush()


def shutdown() -> None:
    """Flush and switch tracing off in this process (tests that turned it on)."""
    global _state
    if _state is None:
        return
    _uninstrument_celery()
    _state.provider.shutdown()
    _state = None


# ---------------------------------------------------------------- per-process export


class _PerProcessBatch:
    """A SpanProcessor (by its methods: the SDK is not imported until tracing is on) whose
    BatchSpanProcessor (thread, queue, exporter and its HTTP session) is made in each process the
    first time a span ends there: nothing of a parent's is used after a fork. (The SDK's own BatchSpanProcessor restarts its thread in a child, but keeps the
    exporter, whose connection the parent also uses.)"""

    def __init__(self, exporter: Callable[[], SpanExporter]) -> None:
        self._exporter = exporter
        self._pid = 0
        self._inner: Any = None
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()  # a thread of the parent may have held it at the fork
        self._inner, self._pid = None, 0

    def here(self) -> Any:
        if self._pid != os.getpid():
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            with self._lock:
                if self._pid != os.getpid():
                    self._inner = BatchSpanProcessor(self._exporter())
                    self._pid = os.getpid()
        return self._inner

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        self.here().on_end(span)

    def _on_ending(self, span: Span) -> None:
        pass

    def shutdown(self) -> None:
        if self._pid == os.getpid() and self._inner is not None:
            self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        if self._pid == os.getpid() and self._inner is not None:
            return bool(self._inner.force_flush(timeout_millis))
        return True


# ---------------------------------------------------------------- instrumentations


def _instrument_celery(provider: TracerProvider) -> None:
    """Celery's task runs get the instrumentation's CONSUMER spans (parent: the message's
    ``traceparent``). Its publish spans are left out: for a task sent by name that the sending
    app has not registered (a participant's ``saga.reply``, beat's ``saga.sweep``) it never ends
    them and leaves their context attached (opentelemetry-instrumentation-celery 0.66b1,
    ``_trace_after_publish``); our own ``producing`` spans and ``_inject_on_publish`` do that."""
    from celery import signals
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    instrumentor = CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    signals.before_task_publish.disconnect(instrumentor._trace_before_publish)
    signals.after_task_publish.disconnect(instrumentor._trace_after_publish)
    signals.before_task_publish.connect(_inject_on_publish, weak=False)


def _uninstrument_celery() -> None:
    from celery import signals
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    signals.before_task_publish.disconnect(_inject_on_publish)
    CeleryInstrumentor().uninstrument()


def _inject_on_publish(headers: Headers | None = None, **_: Any) -> None:
    """Every Celery publish (a reply, a retry of a task) carries the current context."""
    if headers is not None:
        inject(headers)


def instrument_flask(app: Any) -> None:
    """The web's requests as SERVER spans (the root of an order's trace)."""
    if _state is None:
        return
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    FlaskInstrumentor.instrument_app(
        app,
        tracer_provider=_state.provider,
        excluded_urls=UNTRACED_URLS,
        enable_commenter=False,
    )


# ---------------------------------------------------------------- the API

# What every context manager here is when tracing is off: stateless, so one instance serves all.
_NOTHING: AbstractContextManager[None] = nullcontext()


def _kind(name: str) -> Any:
    from opentelemetry.trace import SpanKind

    return SpanKind[name]


def _extract(headers: Mapping[str, Any] | None) -> Any:
    """The context a carrier names, or None when it names none."""
    from opentelemetry import trace
    from opentelemetry.propagate import extract

    if not headers or "traceparent" not in headers:
        return None
    context = extract({k: str(v) for k, v in headers.items() if isinstance(v, str | bytes)})
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def _clean(attributes: Attributes | None) -> dict[str, Any]:
    return {k: v for k, v in (attributes or {}).items() if v is not None}


def received(
    headers: Mapping[str, Any] | None, name: str, attributes: Attributes | None = None
) -> Any:
    """A CONSUMER span for one message of a batch, child of its ``traceparent`` (a new trace if
    none), started now and not current (``current``, ``finish``); None when off."""
    if _state is None:
        return None
    return _state.tracer.start_span(
        name, context=_extract(headers), kind=_kind("CONSUMER"), attributes=_clean(attributes)
    )


def current(span: Any) -> AbstractContextManager[Any]:
    """``span`` (from ``received``) current for the block; nothing when it is None."""
    if span is None:
        return _NOTHING
    from opentelemetry import trace

    return trace.use_span(span, end_on_exit=False)


def finish(span: Any, error: str | None = None) -> None:
    """End a span from ``received``, as failed when ``error`` says why."""
    if span is None:
        return
    if error is not None:
        from opentelemetry import trace

        span.set_status(trace.Status(trace.StatusCode.ERROR, error))
    span.end()


def producing(
    headers: Headers, name: str, attributes: Attributes | None = None
) -> AbstractContextManager[None]:
    """A PRODUCER span for one message about to be sent; its context goes into ``headers``."""
    if _state is None:
        return _NOTHING
    return _producing(_state, headers, name, attributes)


@contextmanager
def _producing(
    state: _State, headers: Headers, name: str, attributes: Attributes | None
) -> Iterator[None]:
    with state.tracer.start_as_current_span(
        name, kind=_kind("PRODUCER"), attributes=_clean(attributes)
    ):
        inject(headers)
        yield


def publishing(
    messages: Iterable[tuple[Headers, str, Attributes | None]],
) -> AbstractContextManager[None]:
    """One PRODUCER span per message of a batch, each child of the context its own headers carry
    (else the current one), written back there; all end when the block ends."""
    if _state is None:
        return _NOTHING
    return _publishing(_state, messages)


@contextmanager
def _publishing(
    state: _State, messages: Iterable[tuple[Headers, str, Attributes | None]]
) -> Iterator[None]:
    from opentelemetry import trace
    from opentelemetry.propagate import inject as inject_into

    spans = []
    for headers, name, attributes in messages:
        started = state.tracer.start_span(
            name, context=_extract(headers), kind=_kind("PRODUCER"), attributes=_clean(attributes)
        )
        inject_into(headers, context=trace.set_span_in_context(started))
        spans.append(started)
    try:
        yield
    except BaseException as exc:
        for started in spans:
            started.record_exception(exc)
            started.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
        raise
    finally:
        for started in spans:
            started.end()


def _joined(within: Mapping[str, Any] | None) -> tuple[Any, list[Any]]:
    """The parent context and links of a span that belongs to the trace ``within`` names: a
    plain child of the current span when that is already in the trace, else a child of the
    stored context linked to the current span."""
    from opentelemetry import trace

    stored = _extract(within)
    current_span = trace.get_current_span().get_span_context()
    if stored is None:
        return None, []
    joined = trace.get_current_span(stored).get_span_context()
    if current_span.is_valid and current_span.trace_id == joined.trace_id:
        return None, []
    return stored, [trace.Link(current_span)] if current_span.is_valid else []


def dispatched(
    name: str, envelope: Mapping[str, Any], within: Mapping[str, Any] | None
) -> dict[str, str]:
    """A command the engine decides to send, as a span of its saga's trace (see ``_joined``), and
    that span's context: the headers its outbox row keeps, so whoever publishes it, now or
    minutes later, publishes in the saga's trace. ``{}`` when off."""
    if _state is None:
        return {}
    parent, links = _joined(within)
    started = _state.tracer.start_span(
        name, context=parent, links=links, attributes=envelope_attributes(envelope)
    )
    found = carrier(started)
    started.end()
    return found


def inject(headers: Headers) -> None:
    """The current context into ``headers`` (W3C ``traceparent``, ``tracestate``), if any."""
    if _state is None:
        return
    from opentelemetry import trace
    from opentelemetry.propagate import inject as inject_into

    if trace.get_current_span().get_span_context().is_valid:
        inject_into(headers)


def carrier(of: Any = None) -> dict[str, str]:
    """The context of span ``of`` (else the current one) as headers, to store or send."""
    found: dict[str, str] = {}
    if _state is None:
        return found
    if of is None:
        inject(found)
        return found
    from opentelemetry import trace
    from opentelemetry.propagate import inject as inject_into

    inject_into(found, context=trace.set_span_in_context(of))
    return found


def saga_trace(saga_id: Any, business_key: str) -> dict[str, Any]:
    """What a new saga keeps of its trace: ``{TRACE_KEY: carrier}`` of the current span (the
    request that starts it, tagged with the saga's ids), or, with none current, of a root span of
    its own; ``{}`` when off."""
    if _state is None:
        return {}
    from opentelemetry import trace

    ids = {SAGA_ID: str(saga_id), BUSINESS_KEY: business_key}
    if trace.get_current_span().get_span_context().is_valid:
        tag(ids)
        return {TRACE_KEY: carrier()}
    root = _state.tracer.start_span(f"saga {saga_id}", attributes=ids)
    root.end()
    return {TRACE_KEY: carrier(root)}


def tag(attributes: Attributes) -> None:
    """Attributes on the current span (the request's, the task run's)."""
    if _state is None:
        return
    from opentelemetry import trace

    trace.get_current_span().set_attributes(_clean(attributes))


def envelope_attributes(
    envelope: Mapping[str, Any], headers: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A wire envelope's saga id, business key (its payload's order id, else the ``order_id``
    header: a reply's), step, command and attempt as span attributes (``{}`` when tracing is
    off: nothing to compute then)."""
    if _state is None or not isinstance(envelope, Mapping):
        return {}
    payload = envelope.get("payload")
    key = (payload.get("order_id") if isinstance(payload, Mapping) else None) or (
        headers or {}
    ).get("order_id")
    return _clean(
        {
            SAGA_ID: _text(envelope.get("saga_id")),
            BUSINESS_KEY: _text(key),
            STEP: _text(envelope.get("step")),
            COMMAND: _text(envelope.get("type")),
            ATTEMPT: envelope.get("attempt"),
        }
    )


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def current_trace_id() -> str | None:
    """The current trace's id (32 hex digits), for log lines; None outside a span or when off."""
    if _state is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None
