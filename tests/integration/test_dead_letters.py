"""Poison messages and exhausted retries end in the dead-letter queues, are drained into the
``dead_letters`` table, and can be replayed or discarded with ``sagactl dlq``."""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from typing import Any

import sqlalchemy as sa
from kombu import Connection, Producer

from models.db import transaction
from orchestrator.messaging.topology import TASK_EXCHANGE
from orchestrator.ops.config import settings
from orchestrator.ops.processes import sagactl
from orchestrator.proof.client import Api
from orchestrator.proof.harness import Processes
from tests.integration.helpers import make_product, order_body, place, wait_final


def publish_raw(body: bytes, routing_key: str, headers: dict[str, Any], content_type: str) -> None:
    with Connection(settings().broker_url) as conn:
        Producer(conn.default_channel).publish(
            body,
            exchange=TASK_EXCHANGE,
            routing_key=routing_key,
            headers=headers,
            content_type=content_type,
            content_encoding="utf-8",
            delivery_mode=2,
            declare=[],
        )


def letters(where: str, params: dict[str, Any], timeout_s: float = 20) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        with transaction() as session:
            rows = [
                dict(r._mapping)
                for r in session.execute(
                    sa.text(
                        f"SELECT id, saga_id, step, queue, reason, state FROM dead_letters WHERE {where}"
                    ),
                    params,
                )
            ]
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def celery_headers(task: str, marker: str) -> dict[str, Any]:
    return {
        "lang": "py",
        "task": task,
        "id": str(uuid.uuid4()),
        "root_id": None,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
        "test_marker": marker,
    }


def test_an_undecodable_body_is_dead_lettered_as_an_orphan(system: Processes) -> None:
    marker = str(uuid.uuid4())
    publish_raw(
        b"\xff\xfe{not json" + marker.encode(),
        "payment",
        celery_headers("payment.charge", marker),
        "application/json",
    )
    rows = letters("queue = 'payment' AND encode(body, 'escape') LIKE :m", {"m": f"%{marker}%"})
    assert len(rows) == 1
    assert rows[0]["saga_id"] is None and rows[0]["state"] == "dead"
    assert rows[0]["reason"].startswith("rejected")


def test_an_unknown_task_is_dead_lettered(system: Processes) -> None:
    marker = str(uuid.uuid4())
    body = json.dumps([[{"marker": marker}], {}, {}]).encode()
    publish_raw(body, "inventory", celery_headers("inventory.teleport", marker), "application/json")
    rows = letters("queue = 'inventory' AND encode(body, 'escape') LIKE :m", {"m": f"%{marker}%"})
    assert len(rows) == 1 and rows[0]["reason"].startswith("rejected")


def test_an_invalid_envelope_is_dead_lettered_with_its_saga(system: Processes) -> None:
    saga_id = str(uuid.uuid4())
    envelope = {
        "type": "orders.confirm",
        "version": 99,
        "saga_id": saga_id,
        "request_id": str(uuid.uuid4()),
        "step": "orders.confirm",
        "attempt": 1,
        "sent_at": "2026-01-01T00:00:00Z",
        "payload": {},
    }
    publish_raw(
        json.dumps([[envelope], {}, {}]).encode(),
        "orders",
        celery_headers("orders.confirm", saga_id),
        "application/json",
    )
    rows = letters("saga_id = :s", {"s": saga_id})
    assert len(rows) == 1
    assert (rows[0]["queue"], rows[0]["step"]) == ("orders", "orders.confirm")


def test_always_failing_charge_is_dead_lettered_compensated_and_replayable(
    api: Api, system: Processes
) -> None:
    sku = make_product(stock=5)
    placed = place(api, order_body(sku, faults={"payment.charge": "always"}))
    view = wait_final(api, placed["order_id"])
    assert (view["status"], view["reason"], view["saga"]["state"]) == (
        "cancelled",
        "retries_exhausted",
        "compensated",
    )
    rows = letters("saga_id = :s", {"s": placed["saga_id"]})
    assert [(r["queue"], r["step"], r["state"]) for r in rows] == [
        ("payment", "payment.charge", "dead")
    ]
    events = [e["event"] for e in view["saga"]["timeline"]]
    assert "step.dead_lettered" in events

    env = system.box.env()
    listed = subprocess.run(
        sagactl("dlq", "list", "--json"), env=env, capture_output=True, text=True, check=True
    )
    assert rows[0]["id"] in [d["id"] for d in json.loads(listed.stdout)["dead_letters"]]
    subprocess.run(
        sagactl("dlq", "replay", str(rows[0]["id"])), env=env, check=True, capture_output=True
    )
    # The replayed command runs again (and, still carrying `always`, dies again: a new letter).
    again = letters(
        "saga_id = :s AND id <> :i", {"s": placed["saga_id"], "i": rows[0]["id"]}, timeout_s=30
    )
    assert len(again) == 1
    assert letters("id = :i", {"i": rows[0]["id"]})[0]["state"] == "replayed"
    after = api.order(placed["order_id"])
    assert after["status"] == "cancelled"
    assert "dead_letter.replayed" in [e["event"] for e in after["saga"]["timeline"]]
    # Replaying the same letter twice is refused; discarding the new one works.
    second = subprocess.run(
        sagactl("dlq", "replay", str(rows[0]["id"])), env=env, capture_output=True, text=True
    )
    assert second.returncode == 1
    subprocess.run(
        sagactl("dlq", "discard", str(again[0]["id"])), env=env, check=True, capture_output=True
    )
    assert letters("id = :i", {"i": again[0]["id"]})[0]["state"] == "discarded"
    with transaction() as session:
        charges = session.scalar(
            sa.text("SELECT count(*) FROM charges WHERE saga_id = :s AND status = 'charged'"),
            {"s": placed["saga_id"]},
        )
    assert charges == 0


# ---------------------------------------------------------------- time limits


def wait_for_log(
    system: Processes, name: str, pattern: str, timeout_s: float = 30
) -> re.Match[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = re.search(pattern, system.output(name))
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} never logged by {name}:\n{system.tail(name)}")
        time.sleep(0.2)


def test_a_task_past_its_hard_time_limit_is_killed_and_redelivered(
    api: Api, system: Processes
) -> None:
    """A hung task cannot hold its pool process forever: at the hard limit the process is killed
    and, with acks_on_timeout=False, the message is requeued and redelivered (not acked, lost)."""
    system.restart("inventory", SAGA_TASK_TIME_LIMIT_S="2", SAGA_TASK_SOFT_TIME_LIMIT_S="0")
    try:
        placed = place(
            api, order_body(make_product(stock=2), faults={"inventory.reserve": "hang:60"})
        )
        killed = wait_for_log(
            system,
            "inventory",
            r"Hard time limit \(2(\.0)?s\) exceeded for inventory\.reserve\[([\w-]+)\]",
        )
        task_id = killed.group(2)
        # The same message (same task id) runs again, and this time finishes.
        wait_for_log(system, "inventory", rf"Task inventory\.reserve\[{task_id}\] succeeded")
        assert wait_final(api, placed["order_id"])["status"] == "confirmed"
    finally:
        system.restart("inventory")


def test_a_task_past_its_soft_time_limit_is_retried_as_transient(
    api: Api, system: Processes
) -> None:
    system.restart("inventory", SAGA_TASK_TIME_LIMIT_S="10", SAGA_TASK_SOFT_TIME_LIMIT_S="1")
    try:
        placed = place(
            api, order_body(make_product(stock=2), faults={"inventory.reserve": "hang:60"})
        )
        wait_for_log(
            system, "inventory", r"Soft time limit \(1(\.0)?s\) exceeded for inventory\.reserve"
        )
        view = wait_final(api, placed["order_id"])
        assert view["status"] == "confirmed"
        retried = [
            e
            for e in view["saga"]["timeline"]
            if e["event"] == "step.failed" and e["step"] == "inventory.reserve"
        ]
        assert retried and "SoftTimeLimitExceeded" in (retried[0]["detail"] or "")
    finally:
        system.restart("inventory")
