"""Wiring a process: the one place where hooks, signal handlers and consumers are attached.

Importing a module of this project attaches nothing. Every process calls ``bootstrap`` once, from
its entry, before it does any work: the ``sagactl`` commands (orchestrator/ops/cli.py), the web's
``create_app``, the bench and the tests. In order:

1. the saga registry (a released definition that changed stops the process here);
2. the Celery app's settings: queues from the registry, routes, acks, confirms
   (orchestrator/messaging/celery_app.py);
3. the session hooks: a transaction's timeline events and deferred outbox rows are written just
   before it commits (orchestrator/kernel/engine.py, orchestrator/messaging/outbox.py), its outbox
   rows published just after (the fast path, orchestrator/messaging/fastpath.py);
4. Celery's signal handlers: logging, metrics, fork safety
   (orchestrator/messaging/worker_signals.py);
5. traces, when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (orchestrator/ops/tracing.py): the SDK, the
   Celery instrumentation; the web adds Flask's in ``create_app``. Before a prefork pool forks:
   each pool process makes its own exporter (``worker_signals``) for its task runs and its batch
   consumer's spans.

``worker_app(name)`` also loads a worker's tasks (its module, from the registry) and its batch
consumer (orchestrator/messaging/batches.py: the orchestrator's replies, or the service's
commands, workers/batching.py); for the orchestrator, the dead-letter intake too. Calling either again is harmless: the settings are
re-read (a test that switched sandboxes), nothing is attached twice.
"""

from __future__ import annotations

import importlib

from celery import Celery

from orchestrator import registry
from orchestrator.kernel import engine
from orchestrator.messaging import celery_app, fastpath, outbox, worker_signals
from orchestrator.ops import tracing
from orchestrator.ops.config import settings


def bootstrap() -> Celery:
    """Wire this process (steps 1-5 above); returns the Celery app, configured."""
    registry.load()
    app = celery_app.configure(celery_app.app, settings())
    engine.hook_sessions()
    outbox.hook_sessions()
    fastpath.hook_sessions()
    worker_signals.connect()
    tracing.setup(settings().process or "process")  # once: a second call finds it set up
    return app


def worker_app(name: str) -> Celery:
    """``bootstrap`` plus the worker's tasks and, for the orchestrator, its consumer steps."""
    from orchestrator.ops.processes import workers

    app = bootstrap()
    module, queue = workers()[name]
    importlib.import_module(module)
    if name == registry.ORCHESTRATOR:
        from orchestrator.kernel.tasks import on_batch
        from orchestrator.messaging import batches
        from orchestrator.messaging.deadletters import DeadLetterIntake

        app.steps["consumer"].add(DeadLetterIntake)
        batches.consume_in_batches(
            app, registry.ORCHESTRATOR_QUEUE, on_batch, name="orchestrator", source="fast_path"
        )
    else:
        from workers import batching  # a participant service: its commands in batches

        batching.wire(queue)
    return app
