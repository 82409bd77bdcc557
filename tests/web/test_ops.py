"""/healthz against real and unreachable services; /metrics as Prometheus reads it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from models.db import get_engine, transaction
from orchestrator.messaging.envelopes import ReplyOutcome
from orchestrator.ops import health
from orchestrator.ops.config import settings
from orchestrator.proof.harness import free_port
from tests.web.drive import answer, command_body, complete, dead_letter, make_stuck, place

FAMILIES = {
    "saga_started": "counter",
    "saga_finished": "counter",
    "saga_in_flight": "gauge",
    "saga_stuck": "gauge",
    "saga_step_duration_seconds": "histogram",
    "saga_compensation_duration_seconds": "histogram",
    "saga_retries": "counter",
    "saga_compensations": "counter",
    "saga_dead_letters": "gauge",
    "saga_outbox_backlog": "gauge",
    "saga_outbox_lag_seconds": "gauge",
}


# ---------------------------------------------------------------- /healthz


def _closed_url(scheme_url: str) -> str:
    """The same URL with its port swapped for one nothing listens on."""
    url = sa.make_url(scheme_url) if "postgresql" in scheme_url else None
    port = free_port()
    if url is not None:
        return url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    return f"amqp://guest:guest@127.0.0.1:{port}//"


@pytest.fixture
def point(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Point the health checks' settings at other URLs for one test."""

    def point(**urls: Any) -> None:
        patched = settings().model_copy(update=urls)
        monkeypatch.setattr(health, "settings", lambda: patched)

    yield point


def test_healthz_is_200_when_both_are_reachable(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json == {"database": "ok", "broker": "ok"}
    assert response.headers["Cache-Control"] == "no-store"


def test_healthz_is_503_with_the_broker_down(client: FlaskClient, point: Any) -> None:
    point(broker_url=_closed_url(settings().broker_url))
    started = time.monotonic()
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json == {"database": "ok", "broker": "down"}
    assert time.monotonic() - started < 10  # a health check must not hang


def test_healthz_is_503_with_the_database_down(client: FlaskClient, point: Any) -> None:
    point(database_url=_closed_url(settings().database_url))
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json == {"database": "down", "broker": "ok"}


def test_healthz_reports_both_down(client: FlaskClient, point: Any) -> None:
    point(
        database_url=_closed_url(settings().database_url),
        broker_url=_closed_url(settings().broker_url),
    )
    response = client.get("/healthz")
    assert (response.status_code, response.json) == (503, {"database": "down", "broker": "down"})


def test_healthz_uses_the_process_pool_for_the_configured_database() -> None:
    assert health._engine(settings().database_url) is get_engine()


# ---------------------------------------------------------------- /metrics


def scrape(client: FlaskClient) -> dict[str, Any]:
    """Families by name, each a {sample name + sorted labels: value} map, and their types."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    text = response.get_data(as_text=True)
    families: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        families[family.name] = {"type": family.type, "samples": samples}
    return families


def value(families: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    key = (sample, tuple(sorted(labels.items())))
    return float(families[family]["samples"].get(key, 0.0))


def test_metrics_expose_every_family_of_the_contract(client: FlaskClient) -> None:
    families = scrape(client)
    for name, kind in FAMILIES.items():
        assert name in families, name
        assert families[name]["type"] == kind, name


def test_metrics_follow_what_happens_to_orders(client: FlaskClient, admin_headers: dict) -> None:
    before = scrape(client)
    done, retried, aborted, parked, stuck = (place(client)["saga_id"] for _ in range(5))
    complete(done)
    answer(retried, ReplyOutcome.RETRYING, "busy")
    answer(retried, ReplyOutcome.RETRYING, "busy")
    answer(retried, ReplyOutcome.SUCCEEDED)
    for saga_id in (aborted, parked):
        assert (
            client.post(
                f"/admin/sagas/{saga_id}/compensate", json={}, headers=admin_headers
            ).status_code
            == 202
        )
    answer(aborted, ReplyOutcome.SUCCEEDED)  # inventory.release done; orders.cancel next
    answer(aborted, ReplyOutcome.SUCCEEDED)  # orders.cancel done: compensated
    answer(parked, ReplyOutcome.FAILED, "release refused")
    make_stuck(stuck)
    dead_letter(parked, command_body(parked, "tok_visa"))
    after = scrape(client)

    def delta(family: str, sample: str, **labels: str) -> float:
        return value(after, family, sample, **labels) - value(before, family, sample, **labels)

    assert delta("saga_started", "saga_started_total") == 5
    assert delta("saga_finished", "saga_finished_total", outcome="completed") == 1
    assert delta("saga_finished", "saga_finished_total", outcome="compensated") == 1
    assert delta("saga_finished", "saga_finished_total", outcome="failed") == 1
    # Reserve finished in done and retried, and failed (operator abort) in aborted and parked.
    assert (
        delta(
            "saga_step_duration_seconds",
            "saga_step_duration_seconds_count",
            step="inventory.reserve",
        )
        == 4
    )
    assert (
        delta(
            "saga_step_duration_seconds", "saga_step_duration_seconds_count", step="orders.confirm"
        )
        == 1
    )
    assert delta("saga_retries", "saga_retries_total", step="inventory.reserve") == 2
    assert (
        delta("saga_compensations", "saga_compensations_total", compensation="inventory.release")
        == 2
    )
    assert (
        delta("saga_compensations", "saga_compensations_total", compensation="orders.cancel") == 1
    )
    assert (
        delta(
            "saga_compensation_duration_seconds",
            "saga_compensation_duration_seconds_count",
            compensation="orders.cancel",
        )
        == 1
    )
    assert delta("saga_dead_letters", "saga_dead_letters", state="dead") == 1
    assert value(after, "saga_stuck", "saga_stuck") >= 1
    assert delta("saga_in_flight", "saga_in_flight", state="running") == 2  # retried, stuck
    with transaction() as session:
        unsent = session.scalar(
            sa.text("SELECT count(*) FROM outbox WHERE sent_at IS NULL AND held_at IS NULL")
        )
    # No relay runs in this tier: every command written is still unsent.
    assert value(after, "saga_outbox_backlog", "saga_outbox_backlog") == unsent
    assert value(after, "saga_outbox_lag_seconds", "saga_outbox_lag_seconds") > 0


def test_a_histogram_is_cumulative_and_ends_at_its_count(client: FlaskClient) -> None:
    complete(place(client)["saga_id"])
    families = scrape(client)
    samples = families["saga_step_duration_seconds"]["samples"]
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in samples.items()
        if name.endswith("_bucket") and dict(labels)["step"] == "payment.charge"
    )
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and buckets[-1][0] == float("inf")
    assert counts[-1] == value(
        families,
        "saga_step_duration_seconds",
        "saga_step_duration_seconds_count",
        step="payment.charge",
    )


def test_a_scrape_runs_a_fixed_handful_of_statements(client: FlaskClient) -> None:
    """Its cost grows with table sizes only through index or single-pass scans: no statement per
    saga, and never the (largest) saga_events table."""
    for _ in range(3):
        place(client)
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    sa.event.listen(get_engine(), "before_cursor_execute", seen)
    try:
        scrape(client)
    finally:
        sa.event.remove(get_engine(), "before_cursor_execute", seen)
    # nine queries (three of them the services': states, failure rates, held commands) and two
    # SET LOCALs
    assert 0 < len(statements) <= 12, statements
    assert not any("saga_events" in s for s in statements)


def test_a_latency_on_a_bucket_bound_counts_in_that_bucket(client: FlaskClient) -> None:
    """Prometheus buckets are "less than or equal"; past the last bound only +Inf counts it."""
    on_bound, past_last = place(client)["saga_id"], place(client)["saga_id"]
    before = scrape(client)
    with transaction() as session:
        for saga_id, seconds in ((on_bound, "0.1"), (past_last, "61")):
            session.execute(
                sa.text(
                    "UPDATE saga_steps SET started_at = now(), "
                    f"finished_at = now() + interval '{seconds} seconds' "
                    "WHERE saga_id = :s AND name = 'inventory.reserve'"
                ),
                {"s": saga_id},
            )
    after = scrape(client)

    def delta(le: str) -> float:
        labels = {"step": "inventory.reserve", "le": le}
        name = "saga_step_duration_seconds"
        return value(after, name, f"{name}_bucket", **labels) - value(
            before, name, f"{name}_bucket", **labels
        )

    assert [delta(le) for le in ("0.05", "0.1", "60.0", "+Inf")] == [0, 1, 1, 2]
    sums = [
        value(
            f,
            "saga_step_duration_seconds",
            "saga_step_duration_seconds_sum",
            step="inventory.reserve",
        )
        for f in (before, after)
    ]
    assert sums[1] - sums[0] == pytest.approx(61.1)
