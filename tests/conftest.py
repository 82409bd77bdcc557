"""Fixtures shared by every tier. Tiers that need PostgreSQL and RabbitMQ get a sandbox of their own
(a fresh database and vhost); if either service is missing the run fails loudly, never skips."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Short timings for every process a test starts (the contract's variables).
TEST_TIMINGS = {
    "SAGA_FAULT_INJECTION": "1",
    "SAGA_RETRY_ATTEMPTS": "3",
    "SAGA_RETRY_BASE_S": "0.05",
    "SAGA_RETRY_MAX_S": "0.2",
    "SAGA_COMPENSATION_ATTEMPTS": "3",
    "SAGA_STEP_TIMEOUT_S": "4",
    "SAGA_SWEEP_S": "1",
    "SAGA_DEADLINE_S": "120",
    "SAGA_WORKER_CONCURRENCY": "2",
}


@pytest.fixture(scope="session")
def artifacts() -> Path:
    path = Path(os.environ.get("SAGA_TEST_ARTIFACTS", "artifacts")) / uuid.uuid4().hex[:8]
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def sandbox(artifacts: Path) -> Iterator[object]:
    from orchestrator.harness import Sandbox, use_sandbox

    os.environ.update(TEST_TIMINGS)
    os.environ["SAGA_FAILPOINTS_DIR"] = str(artifacts / "failpoints")
    (artifacts / "failpoints").mkdir(exist_ok=True)
    os.environ.setdefault("SAGA_STATE_DIR", str(artifacts / "state"))
    box = Sandbox.create("sagatest")
    use_sandbox(box)
    yield box
    from models.db import get_engine

    get_engine().dispose()
    if os.environ.get("SAGA_KEEP_SANDBOX") != "1":
        box.destroy()
