"""``sagactl chaos --broker-nodes N``: disruptions of the run's own RabbitMQ cluster, and a probe
that measures, from a publisher's side, how long the broker refused publishes.

Every action touches a node of the run's own cluster (``orchestrator/ops/cluster.py``), never the
machine's node. Each returns what it found: which service queues the node led when it was hit,
how long until the survivors led them all, how long the node was down.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from orchestrator.messaging import outbox
from orchestrator.messaging.topology import TASK_EXCHANGE, replicas_argument, service_queue_names
from orchestrator.ops.cluster import Cluster, ClusterError, Node

PROBE_QUEUE = "chaos.probe"
PROBE_EVERY_S = 0.1
PROBE_TIMEOUT_S = 1.0  # a publish not confirmed within this counts as refused


@dataclass
class BrokerChaos:
    """The cluster's disruptions; ``started`` is the run's clock (monotonic) for ``at_s``."""

    cluster: Cluster
    vhost: str
    started: float = field(default_factory=time.monotonic)

    def _now_s(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def leaders(self) -> dict[str, str]:
        """Service queue -> its leader node (the queues a saga's messages go through)."""
        return {
            q: n for q, n in self.cluster.queue_leaders(self.vhost).items() if _is_service_queue(q)
        }

    def busiest_leader(self) -> tuple[Node, list[str]]:
        """The node that leads the most service queues, and those queues."""
        leaders = self.leaders()
        counts = Counter(leaders.values())
        name = counts.most_common(1)[0][0] if counts else self.cluster.nodes[0].name
        return self.cluster.node(name), sorted(q for q, n in leaders.items() if n == name)

    def _wait_reelected(self, gone: Node, queues: list[str], timeout_s: float = 60) -> float | None:
        """Seconds until every queue ``gone`` led has a leader elsewhere (None: not in time)."""
        began = time.monotonic()
        while time.monotonic() - began < timeout_s:
            try:
                leaders = self.leaders()
            except (ClusterError, OSError):
                leaders = {}
            if leaders and all(leaders.get(q) not in (None, "", gone.name) for q in queues):
                return round(time.monotonic() - began, 2)
            time.sleep(0.2)
        return None

    def kill_leader(self, down_s: float) -> dict[str, Any]:
        """SIGKILL the node leading the most service queues; restart it after ``down_s``."""
        node, led = self.busiest_leader()
        at = self._now_s()
        node.kill()
        reelected = self._wait_reelected(node, led)
        after = self.leaders()
        time.sleep(max(0.0, down_s - (reelected or 0)))
        up_s = self.cluster.restart(node)
        return {"node": node.name, "led": led, "at_s": at,
                "leaders_elsewhere_after_s": reelected,
                "new_leaders": {q: after.get(q) for q in led},
                "down_s": round(time.monotonic() - self.started - at, 1),
                "restart_s": round(up_s, 1)}  # fmt: skip

    def stop_start(self, rng: random.Random, down_s: float) -> dict[str, Any]:
        """A clean stop of one node (``rabbitmqctl stop``), then a start after ``down_s``."""
        node = rng.choice(self.cluster.nodes)
        led = sorted(q for q, n in self.leaders().items() if n == node.name)
        at = self._now_s()
        node.stop()
        time.sleep(down_s)
        up_s = self.cluster.restart(node)
        return {"node": node.name, "led": led, "at_s": at,
                "down_s": round(time.monotonic() - self.started - at, 1),
                "restart_s": round(up_s, 1)}  # fmt: skip

    def pause(self, rng: random.Random, paused_s: float) -> dict[str, Any]:
        """SIGSTOP one node for ``paused_s`` (a slow node, not a dead one), then SIGCONT."""
        node = rng.choice(self.cluster.nodes)
        led = sorted(q for q, n in self.leaders().items() if n == node.name)
        at = self._now_s()
        node.signal(signal.SIGSTOP)
        try:
            time.sleep(paused_s)
        finally:
            node.signal(signal.SIGCONT)
        return {"node": node.name, "led": led, "at_s": at, "paused_s": round(paused_s, 1)}

    def restart_one(self, rng: random.Random) -> dict[str, Any]:
        """``--allow-broker-restart``: stop and start one node of the run's own (on a one-node
        cluster, the whole broker of the run)."""
        return self.stop_start(rng, down_s=2.0)


def _is_service_queue(name: str) -> bool:
    return name in service_queue_names()


@dataclass
class PublishProbe:
    """Publishes one persistent message every PROBE_EVERY_S into a quorum queue of the run's
    vhost, with confirms, as the relay does; a refusal window runs from the first failed or
    unconfirmed publish to the next confirmed one."""

    broker_url: str
    replicas: int | None
    started: float = field(default_factory=time.monotonic)
    windows: list[tuple[float, float]] = field(default_factory=list)  # (start at_s, seconds)
    attempts: int = 0
    refused: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="publish-probe", daemon=True)
        self._thread.start()

    def finish(self) -> None:
        self.stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        self._delete_queue()

    def _declare(self) -> None:
        from kombu import Connection, Queue

        with Connection(self.broker_url, connect_timeout=2) as conn:
            Queue(PROBE_QUEUE, TASK_EXCHANGE, routing_key=PROBE_QUEUE, durable=True,
                  queue_arguments={"x-queue-type": "quorum", "x-max-length": 100,
                                   **replicas_argument(self.replicas)}
                  ).bind(conn.default_channel).declare()  # fmt: skip

    def _delete_queue(self) -> None:
        from kombu import Connection

        try:
            with Connection(self.broker_url, connect_timeout=5) as conn:
                conn.default_channel.queue_delete(PROBE_QUEUE)
        except Exception:  # the run's vhost goes anyway; the drained check would name it
            pass

    def _loop(self) -> None:
        publisher = outbox.ConfirmingPublisher(self.broker_url, connect_timeout_s=PROBE_TIMEOUT_S)
        wire = outbox._Wire(b"probe", {"delivery_mode": 2}, PROBE_QUEUE)
        declared = False
        failing_since: float | None = None
        while not self.stop.wait(PROBE_EVERY_S):
            self.attempts += 1
            try:
                if not declared:
                    self._declare()
                    declared = True
                publisher.publish([wire], timeout_s=PROBE_TIMEOUT_S)
            except Exception:
                self.refused += 1
                publisher.close()
                if failing_since is None:
                    failing_since = time.monotonic()
                continue
            if failing_since is not None:
                self.windows.append(
                    (
                        round(failing_since - self.started, 1),
                        round(time.monotonic() - failing_since, 2),
                    )
                )
                failing_since = None
        publisher.close()

    def summary(self, events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The refusal windows, each with the disruption that began last before it."""
        events = sorted(events or [], key=lambda e: e["at_s"])
        shown = []
        for at, seconds in self.windows:
            before = [e for e in events if e["at_s"] <= at + 0.5]
            cause = f"{before[-1]['action']} {before[-1]['target']}" if before else None
            shown.append({"at_s": at, "refused_s": seconds, "after": cause})
        return {"attempts": self.attempts, "refused": self.refused,
                "refused_s_total": round(sum(s for _, s in self.windows), 2),
                "longest_s": max((s for _, s in self.windows), default=0.0),
                "windows": shown}  # fmt: skip
