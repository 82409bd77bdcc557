"""The Celery settings that the failure model rests on are the ones Celery 5.7 reads, unhidden."""

from __future__ import annotations

import types
import warnings

from celery.app.defaults import find_deprecated_settings

import orchestrator.kernel.tasks  # noqa: F401  (registers the orchestrator's tasks)
import workers.inventory
import workers.orders
import workers.payment  # noqa: F401
from orchestrator.messaging.celery_app import app, celery_settings
from orchestrator.ops.config import settings


def test_no_deprecated_setting_is_set() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        find_deprecated_settings(types.SimpleNamespace(**celery_settings(settings())))


def test_a_failure_is_rejected_and_a_timeout_requeued_not_acked() -> None:
    assert app.conf.task_acks_late is True
    assert app.conf.task_acks_on_failure is False  # failed for good: rejected, so dead-lettered
    assert app.conf.task_acks_on_timeout is False  # killed at the hard limit: requeued
    assert app.conf.task_reject_on_worker_lost is True
    task = app.tasks["inventory.reserve"]
    assert (task.acks_on_failure, task.acks_on_timeout) == (False, False)


def test_tasks_have_time_limits_above_any_legitimate_run() -> None:
    cfg = settings()
    assert app.conf.task_time_limit == cfg.task_time_limit_s
    assert app.conf.task_soft_time_limit == cfg.task_soft_time_limit_s
    # The longest injected hang the tests and chaos use is a few seconds.
    assert 10 < app.conf.task_soft_time_limit < app.conf.task_time_limit


def test_every_retry_backoff_is_what_celery_applies() -> None:
    """Celery rounds a backoff up to whole seconds (``int(max(1.0, backoff))``)."""
    ours = {n: t for n, t in app.tasks.items() if not n.startswith("celery.")}
    backoffs = {n: t.retry_backoff for n, t in ours.items() if getattr(t, "retry_backoff", False)}
    assert backoffs, "no task with a backoff found"
    for name, backoff in backoffs.items():
        assert backoff is True or backoff == int(max(1.0, backoff)), (name, backoff)
