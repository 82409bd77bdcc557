"""Celery's own tools and every process's metrics, on a system of real processes of its own.

With ``SAGA_CELERY_EVENTS=1`` each worker answers ``celery inspect ping`` on its own node and sends
task events (what Flower reads); a worker without it answers nothing. Every worker, the relay and
beat serve /metrics on a port of their own (``Processes(metrics=True)``), counting what they did
across their prefork children; after a few orders, every metric that deploy/'s alert rules and
dashboard name is exposed by some process, and a real Prometheus scraping them finds data for
every dashboard query and evaluates every rule without an error.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.messaging.topology import service_queue_names
from orchestrator.ops.processes import process_table, workers
from orchestrator.proof.client import Api
from orchestrator.proof.harness import SHORT_TIMINGS, Processes, Sandbox, free_port
from tests.deploy_files import (
    ALERT_RULES,
    PROMETHEUS_OWN,
    dashboards,
    names_used,
    panel_exprs,
    rules,
)

pytestmark = pytest.mark.own_system  # a sandbox and processes of its own (events and metrics on)

NODE_TEMPLATE = "{name}-obs-{pid}@%h"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    sandbox = Sandbox.create("sagatest")
    yield sandbox
    sandbox.destroy()


@pytest.fixture(scope="module")
def observed(box: Sandbox, artifacts: Path) -> Iterator[Processes]:
    procs = Processes(
        box,
        artifacts / "observability",
        metrics=True,
        extra_env={**SHORT_TIMINGS, "SAGA_CELERY_EVENTS": "1", "SAGA_WORKER_NODE": NODE_TEMPLATE},
    )
    try:
        for name in process_table():
            # The web leaves its commands to the relay, so the relay's own metrics have work too.
            env = {"SAGA_OUTBOX_FAST_PATH": "0"} if name == "web" else {}
            procs.start(name, wait=False, **env)
        for name in process_table():
            procs.wait_ready(name)
    except BaseException:
        procs.stop_all()
        raise
    yield procs
    procs.stop_all()


def node(procs: Processes, name: str) -> str:
    """The Celery node name the worker ``name`` took (its pid survives ``sagactl``'s exec)."""
    return f"{name.split('#')[0]}-obs-{procs.pid(name)}@{socket.gethostname()}"


def inspect_ping(
    box: Sandbox, destination: str, timeout_s: float
) -> subprocess.CompletedProcess[str]:
    """The command docker-compose.yml's worker healthcheck runs."""
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "orchestrator.messaging.celery_app", "inspect",
         "--timeout", str(timeout_s), "--destination", destination, "--json", "ping"],
        env=box.env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_every_worker_answers_celery_inspect_ping_on_its_own_node(
    observed: Processes, box: Sandbox
) -> None:
    for name in workers():
        result = inspect_ping(box, node(observed, name), timeout_s=10)
        assert result.returncode == 0, (name, result.stdout, result.stderr)
        assert json.loads(result.stdout) == {node(observed, name): {"ok": "pong"}}


def test_a_worker_without_the_setting_answers_no_ping(observed: Processes, box: Sandbox) -> None:
    observed.start("payment#quiet", SAGA_CELERY_EVENTS="0")
    try:
        result = inspect_ping(box, node(observed, "payment#quiet"), timeout_s=3)
        assert result.returncode != 0
        assert "No nodes replied" in result.stdout + result.stderr
        # ...while the one with it, on the same queue, still does.
        assert inspect_ping(box, node(observed, "payment"), timeout_s=10).returncode == 0
    finally:
        observed.kill("payment#quiet")
        del observed.running["payment#quiet"]


def test_workers_send_task_events(observed: Processes, box: Sandbox) -> None:
    """What Flower shows: a task received and succeeded, by the payment worker."""
    received: dict[str, str] = {}  # task id -> task name
    succeeded: set[str] = set()
    listening = threading.Event()  # set by the first event: the receiver's queue is bound
    app = Celery(broker=box.broker_url)

    def on_event(event: dict[str, Any]) -> None:
        listening.set()
        if event["type"] == "task-received":
            received[event["uuid"]] = event["name"]
        elif event["type"] == "task-succeeded":
            succeeded.add(event["uuid"])

    def charged() -> bool:
        return any(received.get(u) == "payment.charge" for u in succeeded)

    with app.connection_for_read() as conn:
        # wakeup: ask every worker for a heartbeat at once (Flower lists workers by them).
        receiver = app.events.Receiver(conn, handlers={"*": on_event})
        thread = threading.Thread(target=receiver.capture, kwargs={"wakeup": True}, daemon=True)
        thread.start()
        try:
            assert listening.wait(30), "no event (not even a worker heartbeat) within 30 s"
            api = Api.connect(observed.url)
            order = api.place(_order()).json()["order_id"]
            assert api.wait_final([order], 60)[order]["status"] == "confirmed"
            deadline = time.monotonic() + 30
            while not charged() and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            receiver.should_stop = True
            thread.join(10)
    assert charged(), (received, succeeded)


def test_flower_lists_every_worker_behind_basic_auth(
    observed: Processes, box: Sandbox, artifacts: Path
) -> None:
    """As docker-compose.yml runs it: `celery --broker=... flower`, FLOWER_BASIC_AUTH from env."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    auth = ("ops", "a-flower-password")
    with open(artifacts / "observability" / "flower.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", f"--broker={box.broker_url}", "flower",
             f"--port={port}", "--address=127.0.0.1"],
            env={**box.env(), "FLOWER_BASIC_AUTH": ":".join(auth)},
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    expected = {node(observed, name) for name in workers()}
    seen: set[str] = set()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, (artifacts / "observability" / "flower.log").read_text()
            try:
                anonymous = requests.get(f"{url}/api/workers", timeout=5)
                found = requests.get(
                    f"{url}/api/workers", params={"refresh": "1"}, auth=auth, timeout=20
                )
            except requests.RequestException:
                time.sleep(0.5)
                continue
            assert anonymous.status_code == 401
            if found.status_code == 200:
                seen = set(found.json())
                if expected <= seen:
                    break
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert expected <= seen, (expected, seen)


def _order(token: str = "tok_visa", faults: dict[str, str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "customer_id": "c-observed",
        "items": [{"sku": "SKU-APPLE", "quantity": 1}],
        "payment": {"card_token": token},
    }
    if faults:
        body["faults"] = faults
    return body


def scrape(url: str) -> Samples:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, url
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def scrapes(observed: Processes) -> dict[str, Samples]:
    """Every process's /metrics after a few orders of every kind have finished."""
    api = Api.connect(observed.url)
    bodies = [
        _order(),
        _order(),
        _order(faults={"inventory.reserve": "transient:1"}),  # one retry
        _order(token="tok_chargeDeclined"),  # a business refusal: compensated
        _order(faults={"payment.charge": "always"}),  # retries run out: dead-lettered
    ]
    placed = [api.place(body).json()["order_id"] for body in bodies]
    views = api.wait_final(placed, timeout_s=120)
    assert [views[o]["status"] for o in placed] == [
        "confirmed", "confirmed", "confirmed", "cancelled", "cancelled",
    ]  # fmt: skip
    urls = {
        name: f"http://127.0.0.1:{running.metrics_port}/metrics"
        for name, running in observed.running.items()
        if running.metrics_port
    }
    urls["web"] = f"{observed.url}/metrics"
    assert set(urls) == set(process_table())
    # The dead letter is taken in after the saga turned back: wait for it, on evidence.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = scrape(urls["orchestrator"])
        if get(found, "saga_dead_letters_recorded_total", queue="payment") >= 1:
            break
        time.sleep(0.2)
    return {name: scrape(url) for name, url in urls.items()}


def test_every_metric_the_rules_and_the_dashboard_name_is_exposed(
    scrapes: dict[str, Samples],
) -> None:
    exposed = {name for samples in scrapes.values() for name, _ in samples}
    missing = {
        name: sorted(where)
        for name, where in names_used().items()
        if name not in exposed and name not in PROMETHEUS_OWN
    }
    assert not missing, missing


def test_workers_count_their_tasks_across_their_pool(
    observed: Processes, scrapes: dict[str, Samples]
) -> None:
    payment = scrapes["payment"]
    tasks = "saga_worker_tasks_total"
    # Four charges answered (three confirmed, one declined), whichever pool child ran them.
    assert get(payment, tasks, task="payment.charge", outcome="succeeded") >= 4
    assert get(payment, tasks, task="payment.charge", outcome="retried") >= 1
    assert get(payment, tasks, task="payment.charge", outcome="failed") >= 1
    assert get(payment, "saga_worker_task_duration_seconds_count", task="payment.charge") >= 6
    assert get(scrapes["inventory"], tasks, task="inventory.reserve", outcome="retried") >= 1
    orchestrator = scrapes["orchestrator"]
    assert get(orchestrator, tasks, task="saga.reply", outcome="succeeded") >= 12
    assert get(orchestrator, tasks, task="saga.sweep", outcome="succeeded") >= 1
    assert get(orchestrator, "saga_sweeps_total") >= 1
    # Nothing in hand once idle: every child's inc met its dec. Beat's sweep tick may be in hand at
    # one scrape, so each worker gets a few seconds to show 0; a leaked inc never does.
    for name in workers():
        url = f"http://127.0.0.1:{observed.running[name].metrics_port}/metrics"
        deadline = time.monotonic() + 10
        while (active := get(scrape(url), "saga_worker_tasks_active")) != 0:
            assert time.monotonic() < deadline, f"{name}: {active} tasks in hand when idle"
            time.sleep(0.2)


def test_publishers_count_confirms_and_the_relay_its_delay(scrapes: dict[str, Samples]) -> None:
    relay, orchestrator = scrapes["relay"], scrapes["orchestrator"]
    published = "saga_published_messages_total"
    assert get(relay, published, source="relay", result="confirmed") >= 5  # the web's commands
    assert get(relay, "saga_relay_delay_seconds_count", source="relay") >= 5
    assert get(relay, "saga_publish_duration_seconds_count", source="relay") >= 1
    assert get(orchestrator, published, source="fast_path", result="confirmed") >= 10
    assert get(scrapes["beat"], "saga_celery_sent_total", task="saga.sweep") >= 1
    assert get(scrapes["payment"], "saga_celery_sent_total", task="saga.reply") >= 4


def test_dead_letters_and_queues_are_counted(scrapes: dict[str, Samples]) -> None:
    assert get(scrapes["orchestrator"], "saga_dead_letters_recorded_total", queue="payment") == 1
    relay = scrapes["relay"]
    assert get(relay, "saga_broker_up") == 1
    for queue in service_queue_names():
        assert get(relay, "saga_queue_consumers", queue=queue) >= 1, queue
    assert get(scrapes["web"], "saga_dead_letters", state="dead") == 1
    assert get(scrapes["web"], "saga_parked") == 0


@pytest.fixture(scope="module")
def prometheus(
    observed: Processes, scrapes: dict[str, Samples], tmp_path_factory: Any
) -> Iterator[str]:
    """A real Prometheus (Debian's, beside promtool) scraping this system every second with
    deploy/'s alert rules; stopped at the end of the module."""
    exe = shutil.which("prometheus")
    assert exe, "prometheus is missing: run scripts/promtool.sh (`make test` does)"
    folder = tmp_path_factory.mktemp("prometheus")
    targets = {
        name: f"127.0.0.1:{running.metrics_port or observed.port}"
        for name, running in observed.running.items()
    }
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERT_RULES)],
        "scrape_configs": [
            {"job_name": name, "static_configs": [{"targets": [target]}]}
            for name, target in targets.items()
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(folder / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [exe, f"--config.file={folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        # Ready when every target has been scraped healthy a few times (rates need two samples).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, (folder / "prometheus.log").read_text()[-3000:]
            try:
                if _scraped_healthy(url, len(targets), times=3):
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        else:
            raise TimeoutError("Prometheus never saw every target up")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _scraped_healthy(url: str, targets: int, times: int) -> bool:
    """Every target scraped at least ``times`` times (a rate needs two samples), all up."""
    counts = query(url, "count_over_time(up[30s])")
    lowest = query(url, "min_over_time(up[30s])")
    return (
        len(counts) == targets
        and all(float(r["value"][1]) >= times for r in counts)
        and all(float(r["value"][1]) == 1 for r in lowest)
    )


def query(url: str, expr: str) -> list[dict[str, Any]]:
    response = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def test_every_dashboard_query_returns_series_from_the_processes(prometheus: str) -> None:
    """Names are not enough: each panel's query, labels and all, finds data in a real Prometheus."""
    empty = [
        (file, expr)
        for file, dashboard in dashboards().items()
        for expr in panel_exprs(dashboard)
        if not query(prometheus, expr)
    ]
    assert not empty, empty


def test_every_alert_rule_evaluates_and_none_fires_on_a_healthy_system(prometheus: str) -> None:
    deadline = time.monotonic() + 30
    while True:  # rules are evaluated every second; wait for one round that saw them all
        response = requests.get(f"{prometheus}/api/v1/rules", timeout=10).json()
        loaded = [rule for group in response["data"]["groups"] for rule in group["rules"]]
        if len(loaded) == len(rules()) and all(
            r.get("lastEvaluation", "").startswith("2") for r in loaded
        ):
            break
        assert time.monotonic() < deadline, loaded
        time.sleep(0.5)
    assert {r["name"]: r["health"] for r in loaded} == {r["alert"]: "ok" for r in rules()}
    firing = [r["name"] for r in loaded if r["state"] == "firing"]
    assert not firing, firing


def test_series_exist_at_zero_before_their_first_event(scrapes: dict[str, Samples]) -> None:
    """So an alert's increase() sees the first dead letter, the first refused publish, the
    first task of a kind that fails."""

    def has(samples: Samples, name: str, **labels: str) -> bool:
        return (name, tuple(sorted(labels.items()))) in samples

    recorded = "saga_dead_letters_recorded_total"
    assert has(scrapes["orchestrator"], recorded, queue="inventory")
    assert get(scrapes["orchestrator"], recorded, queue="inventory") == 0
    assert has(
        scrapes["payment"], "saga_worker_tasks_total", task="payment.refund", outcome="ignored"
    )
    assert has(scrapes["relay"], "saga_published_messages_total", source="relay", result="refused")
