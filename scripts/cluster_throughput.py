"""Sagas per second with the same processes on one RabbitMQ node and on a three-node cluster.

For docs/scaling.md, from the repository root (it borrows the integration tests' helpers):
``PYTHONPATH=. .venv/bin/python scripts/cluster_throughput.py --nodes 1 --nodes 3``. Each run gets a cluster of its own (one node is a cluster of one: replicas 1), a fresh sandbox and two
of every process; N orders are placed by a few threads as fast as the web takes them (closed
loop); the figure is completed sagas / (last final - first placement). Also prints the database's
commits per saga (``xact_commit``) and the CPU seconds of the RabbitMQ nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa

from models.db import transaction
from orchestrator.ops.cluster import Cluster
from orchestrator.ops.processes import SCALABLE, instance_names
from orchestrator.proof.client import Api
from orchestrator.proof.harness import SHORT_TIMINGS, Processes, Sandbox, use_sandbox
from tests.integration.helpers import make_product, order_body


def _commits(database: str) -> int:
    with transaction() as session:
        return int(
            session.scalar(
                sa.text("SELECT xact_commit FROM pg_stat_database WHERE datname = :d"),
                {"d": database},
            )
        )


def _node_cpu_s(cluster: Cluster) -> float:
    total = 0.0
    for node in cluster.nodes:
        pid = node.pid()
        if pid:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def one_run(nodes: int, orders: int, threads: int, scale: int) -> dict[str, Any]:
    os.environ.update({**SHORT_TIMINGS, "SAGA_STEP_TIMEOUT_S": "30", "SAGA_FAULT_INJECTION": "0"})
    with Cluster.create(nodes) as cluster:
        box = Sandbox.create("sagatput", cluster=cluster)
        use_sandbox(box)
        procs = Processes(box, Path(tempfile.mkdtemp(prefix="sagatput-")))
        try:
            procs.start_all(instance_names(dict.fromkeys(SCALABLE, scale)))
            sku = make_product(stock=orders * 2)
            api = Api.connect(procs.url)
            for _ in range(10):  # warm up: connections, pools, first declarations
                api.place(order_body(sku), str(uuid.uuid4()))
            time.sleep(3)
            commits0, cpu0 = _commits(box.name), _node_cpu_s(cluster)
            saga_ids: list[str] = []
            lock = threading.Lock()

            def place(n: int) -> None:
                client = Api.connect(procs.url)
                for _ in range(n):
                    r = client.place(order_body(sku), str(uuid.uuid4()))
                    with lock:
                        saga_ids.append(r.json()["saga_id"])

            began = time.monotonic()
            workers = [
                threading.Thread(target=place, args=(orders // threads,)) for _ in range(threads)
            ]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            while True:
                with transaction() as session:
                    busy = session.scalar(
                        sa.text(
                            "SELECT count(*) FROM sagas WHERE state IN ('running', 'compensating')"
                        )
                    )
                if not busy:
                    break
                time.sleep(0.1)
            seconds = time.monotonic() - began
            done = len(saga_ids)
            return {
                "nodes": nodes,
                "instances_of_each": scale,
                "sagas": done,
                "seconds": round(seconds, 1),
                "sagas_per_s": round(done / seconds, 1),
                "commits_per_saga": round((_commits(box.name) - commits0) / done, 2),
                "rabbitmq_cpu_ms_per_saga": round((_node_cpu_s(cluster) - cpu0) * 1000 / done, 1),
            }
        finally:
            procs.stop_all()
            from models.db import get_engine

            get_engine().dispose()
            box.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, action="append", default=[])
    parser.add_argument("--orders", type=int, default=300)
    parser.add_argument("--threads", type=int, default=6)
    parser.add_argument("--scale", type=int, default=2)
    args = parser.parse_args()
    for nodes in args.nodes or [1, 3]:
        print(json.dumps(one_run(nodes, args.orders, args.threads, args.scale)), flush=True)


if __name__ == "__main__":
    main()
