"""The batch consumer (orchestrator/messaging/batches.py) on the session's real broker, on a
quorum queue of the test's own that dead-letters like the service queues: what it takes at once,
what it acks, what it rejects alone, and what it reruns."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from kombu import Connection, Producer, Queue
from sqlalchemy.exc import OperationalError

from orchestrator.messaging import batches, outbox
from orchestrator.messaging.topology import TASK_EXCHANGE, dead_letter_queue, service_queue
from orchestrator.ops.config import settings
from tests.integration.test_crashes import wait_until

pytestmark = pytest.mark.own_system  # the broker of the session's sandbox is all it needs


@dataclass
class Queues:
    work: Queue
    dead: Queue
    out: Queue
    conn: Connection

    def depth(self, queue: Queue) -> int:
        with Connection(settings().broker_url) as conn:  # any thread may ask
            _, count, _ = queue.bind(conn.default_channel).queue_declare(passive=True)
        return int(count)

    def send(self, *bodies: bytes, task: str = "test.echo") -> None:
        producer = Producer(self.conn.default_channel)
        for body in bodies:
            producer.publish(
                body,
                exchange=TASK_EXCHANGE,
                routing_key=self.work.name,
                headers={"task": task, "id": str(uuid.uuid4())},
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
            )


def message(arg: str) -> bytes:
    return json.dumps([[arg], {}, {}]).encode()


@pytest.fixture
def queues(sandbox: object) -> Iterator[Queues]:
    """A work queue (quorum, dead-lettering into its own dead queue) and a queue for what the
    batches publish; deleted afterwards."""
    name = f"batchtest-{uuid.uuid4().hex[:8]}"
    work, dead = service_queue(name, None), dead_letter_queue(name, None)  # as a service's
    out = Queue(f"{name}.out", TASK_EXCHANGE, routing_key=f"{name}.out", durable=True)
    with Connection(settings().broker_url) as conn:
        for queue in (dead, work, out):
            queue.bind(conn.default_channel).declare()
        yield Queues(work, dead, out, conn)
        for queue in (dead, work, out):
            queue.bind(conn.default_channel).delete()


@dataclass
class Recorder:
    """A handler that records each batch it is given; ``then`` decides what it does."""

    then: Callable[[list[batches.Delivery]], batches.Outcome] = lambda _: batches.Outcome()
    batches: list[list[str]] = field(default_factory=list)
    seen_at: list[float] = field(default_factory=list)

    def __call__(self, deliveries: list[batches.Delivery]) -> batches.Outcome:
        self.batches.append([d.args[0] for d in deliveries])
        self.seen_at.append(time.monotonic())
        return self.then(deliveries)


@pytest.fixture
def consume(queues: Queues) -> Iterator[Callable[[Recorder], Callable[[], None]]]:
    """Start a consumer with a handler; returns what stops it (and waits for it to stop: its
    unacked messages then go back to the queue, so an empty queue after it means acked)."""
    stops: list[Callable[[], None]] = []

    def start(handler: Recorder) -> Callable[[], None]:
        stop = threading.Event()
        consumer = batches.BatchConsumer(queues.work, handler, name="batchtest")
        thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
        thread.start()

        def stopped() -> None:
            stop.set()
            thread.join(10)
            assert not thread.is_alive()

        stops.append(stopped)
        return stopped

    yield start
    for stopped in stops:
        stopped()


def test_what_waits_is_one_batch_and_poison_is_rejected_alone(
    queues: Queues, consume: Callable[[Recorder], Callable[[], None]]
) -> None:
    queues.send(*(message(f"m{i}") for i in range(8)))
    queues.send(b"\xff not json", message("boom"))  # undecodable; raises in the handler

    def fail_on_boom(deliveries: list[batches.Delivery]) -> batches.Outcome:
        if any(d.args == ["boom"] for d in deliveries):
            raise ValueError("boom")
        return batches.Outcome()

    handler = Recorder(fail_on_boom)
    stop = consume(handler)
    wait_until(lambda: queues.depth(queues.dead) == 2, what="the two poison messages dead")
    wait_until(lambda: len({m for b in handler.batches for m in b}) == 9, what="all handled")
    stop()
    assert queues.depth(queues.work) == 0  # the others were acked
    assert max(len(b) for b in handler.batches) > 1  # what waited, taken at once
    assert ["boom"] in handler.batches  # its batch raised: each message again alone...
    handled = {m for b in handler.batches for m in b}
    assert handled == {f"m{i}" for i in range(8)} | {"boom"}  # ...the others acked


def test_a_lone_message_is_handled_at_once(
    queues: Queues, consume: Callable[[Recorder], Callable[[], None]]
) -> None:
    handler = Recorder()
    consume(handler)
    wait_until(lambda: queues.depth(queues.work) == 0, what="an empty queue")
    sent = time.monotonic()
    queues.send(message("alone"))
    wait_until(lambda: handler.batches == [["alone"]], what="the lone message handled")
    assert handler.seen_at[0] - sent < 2.0  # no waiting for a batch to fill (or a timer)


def test_a_transient_error_reruns_the_batch_and_outcome_is_published_before_the_ack(
    queues: Queues, consume: Callable[[Recorder], Callable[[], None]]
) -> None:
    calls: list[int] = []
    order: list[str] = []

    def flaky(deliveries: list[batches.Delivery]) -> batches.Outcome:
        calls.append(len(deliveries))
        if len(calls) == 1:
            raise OperationalError("SELECT 1", {}, Exception("connection lost"))
        envelope = {"type": "test.out", "saga_id": uuid.uuid4(), "request_id": uuid.uuid4(),
                    "of": deliveries[0].args[0]}
        command = outbox.row("payment.charge", envelope)
        row = dataclasses.replace(command, task="test.out", queue=queues.out.name, headers={})
        return batches.Outcome(
            publish=[row], after_publish=lambda: order.append(f"out={queues.depth(queues.out)}")
        )

    queues.send(message("once"))
    stop = consume(Recorder(flaky))
    wait_until(lambda: bool(order), timeout_s=30, what="the rerun published")
    stop()
    assert queues.depth(queues.work) == 0  # acked
    assert calls == [1, 1]
    assert order == ["out=1"]  # confirmed on the out queue before the ack
    assert queues.depth(queues.dead) == 0

