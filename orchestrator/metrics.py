"""Prometheus metrics computed from the database of record at scrape time.

Because every count comes from the tables every process writes, the numbers are the same whichever
gunicorn worker or Celery child answers, and no per-process registry has to be merged.
"""

from __future__ import annotations

from collections.abc import Iterator

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from models.db import transaction
from models.deadletters import DeadLetter
from models.enums import SagaState
from models.sagas import Saga, SagaEvent, SagaStep
from orchestrator import outbox, queries

CONTENT_TYPE = CONTENT_TYPE_LATEST
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _histogram(session: sa.orm.Session, started: sa.ColumnElement, finished: sa.ColumnElement,
               name_col: sa.ColumnElement) -> dict[str, tuple[list[int], float, int]]:
    seconds = sa.func.extract("epoch", finished - started)
    columns = [sa.func.count().filter(seconds <= b) for b in BUCKETS]
    rows = session.execute(
        sa.select(name_col, *columns, sa.func.coalesce(sa.func.sum(seconds), 0), sa.func.count())
        .where(finished.is_not(None), started.is_not(None), name_col.is_not(None))
        .group_by(name_col)
    ).all()
    return {row[0]: (list(row[1:-2]), float(row[-2]), int(row[-1])) for row in rows}


class SagaCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        with transaction() as session:
            by_state = dict(session.execute(
                sa.select(Saga.state, sa.func.count()).group_by(Saga.state)).all())
            started = CounterMetricFamily("saga_started", "Sagas started")
            started.add_metric([], sum(by_state.values()))
            yield started
            finished = CounterMetricFamily("saga_finished", "Sagas finished, by outcome",
                                           labels=["outcome"])
            for state in (SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.FAILED):
                finished.add_metric([state.value], by_state.get(state, 0))
            yield finished
            in_flight = GaugeMetricFamily("saga_in_flight", "Sagas not final, by state",
                                          labels=["state"])
            for state in (SagaState.RUNNING, SagaState.COMPENSATING):
                in_flight.add_metric([state.value], by_state.get(state, 0))
            yield in_flight
            stuck = GaugeMetricFamily("saga_stuck", "Sagas past their current deadline")
            stuck.add_metric([], queries.counts(session)["stuck"])
            yield stuck

            events = dict(session.execute(
                sa.select(SagaEvent.event, sa.func.count())
                .where(SagaEvent.event.in_(["step.retried", "compensation.dispatched",
                                            "step.timed_out"]))
                .group_by(SagaEvent.event)).all())
            for metric, event, text in (
                ("saga_step_retries", "step.retried", "Retries of steps and compensations"),
                ("saga_compensations", "compensation.dispatched", "Compensations dispatched"),
                ("saga_step_timeouts", "step.timed_out", "Steps past their deadline"),
            ):
                counter = CounterMetricFamily(metric, text)
                counter.add_metric([], events.get(event, 0))
                yield counter

            letters = CounterMetricFamily("saga_dead_letters", "Dead letters recorded, by state",
                                          labels=["state"])
            for state, n in session.execute(
                sa.select(DeadLetter.state, sa.func.count()).group_by(DeadLetter.state)):
                letters.add_metric([state.value], n)
            yield letters

            backlog = GaugeMetricFamily("saga_outbox_backlog", "Outbox rows not yet published")
            backlog.add_metric([], outbox.backlog(session, 1_000_000))
            yield backlog
            lag = GaugeMetricFamily("saga_outbox_lag_seconds", "Age of the oldest unsent row")
            lag.add_metric([], outbox.oldest_unsent_age_s(session))
            yield lag

            for metric, text, started_col, finished_col, name_col in (
                ("saga_step_duration_seconds", "Step latency, first dispatch to result",
                 SagaStep.started_at, SagaStep.finished_at, SagaStep.name),
                ("saga_compensation_duration_seconds", "Compensation latency",
                 SagaStep.comp_started_at, SagaStep.comp_finished_at, SagaStep.compensation),
            ):
                hist = HistogramMetricFamily(metric, text, labels=["step"])
                for name, (cumulative, total, count) in _histogram(
                        session, started_col, finished_col, name_col).items():
                    buckets = [(str(b), c) for b, c in zip(BUCKETS, cumulative, strict=True)]
                    buckets.append(("+Inf", count))
                    hist.add_metric([name], buckets, total)
                yield hist


_registry = CollectorRegistry()
_registry.register(SagaCollector())


def render() -> bytes:
    return generate_latest(_registry)
