"""The bench's raw chain runs with the saga workers' pool, concurrency, prefetch, acks and
publisher confirms, read from the same source: a change of one changes both."""

from __future__ import annotations

import pytest

from orchestrator.ops import processes
from orchestrator.ops.config import settings
from orchestrator.proof.bench import raw


@pytest.fixture
def fresh_settings(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    settings.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    settings.cache_clear()


def _shape(argv: list[str]) -> list[str]:
    """The worker's arguments with the queue and the node name (its own by design) blanked."""
    out = argv[argv.index("worker") :]
    for flag in ("-Q", "-n"):
        out[out.index(flag) + 1] = "*"
    return out


def test_the_raw_workers_command_line_is_the_saga_workers(
    fresh_settings: pytest.MonkeyPatch,
) -> None:
    fresh_settings.setenv("SAGA_WORKER_CONCURRENCY", "3")
    fresh_settings.setattr(processes, "WORKER_POOL", "threads")
    saga = processes.celery_worker_args("inventory", settings().worker_concurrency)
    chain = raw.worker_argv("bench.reserve")
    assert _shape(chain) == _shape(saga)
    assert chain[chain.index("--concurrency") + 1] == "3"
    assert chain[chain.index("--pool") + 1] == "threads"


def test_the_raw_app_takes_the_saga_apps_delivery_settings(
    fresh_settings: pytest.MonkeyPatch,
) -> None:
    fresh_settings.setenv("SAGA_PREFETCH", "9")
    fresh_settings.setenv("SAGA_BATCH_MAX", "0")  # the raw prefetch is max(prefetch, batch bound)
    fresh_settings.setenv("SAGA_WORKER_CONCURRENCY", "3")
    conf = raw.create_raw_celery("amqp://guest:guest@127.0.0.1:5672/unused").conf
    assert conf.worker_prefetch_multiplier == 9
    assert conf.worker_concurrency == 3
    assert conf.task_acks_late is True and conf.task_acks_on_failure is False
    assert conf.task_reject_on_worker_lost is True
    assert conf.broker_transport_options["confirm_publish"] is True
    assert conf.task_default_delivery_mode == "persistent"
    assert conf.worker_consumer == "orchestrator.messaging.poison:RejectingConsumer"
