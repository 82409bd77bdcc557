"""A sandbox of its own running the loyalty services: the processes get the extension registry
modules through ``SAGA_REGISTRY_MODULES``, exactly as a deployment would."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from models.db import get_engine, transaction
from models.sagas import Saga
from orchestrator import registry
from orchestrator.kernel import engine
from orchestrator.proof.harness import Processes, Sandbox, sandbox_in_use
from tests.extension import tables

V1 = "tests.extension.loyalty"
V2 = "tests.extension.loyalty_v2"
PROCESSES = ("orchestrator", "relay", "points", "ledger", "beat")


def use_modules(*modules: str) -> None:
    """This process's registry from the built-in sagas and ``modules``."""
    os.environ[registry.EXTRA_MODULES_ENV] = ",".join(modules)
    registry.reset()
    registry.load()


@contextlib.contextmanager
def loyalty_system(log_dir: Path, *modules: str) -> Iterator[Processes]:
    """A sandbox of its own with the loyalty processes; this process points at it meanwhile and
    goes back to what it used before (the session's sandbox) afterwards."""
    box = Sandbox.create("sagaext")
    before = os.environ.get(registry.EXTRA_MODULES_ENV)
    procs = Processes(box, log_dir, extra_env={registry.EXTRA_MODULES_ENV: ",".join(modules)})
    try:
        with sandbox_in_use(box):
            try:
                use_modules(*modules)
                tables.create(get_engine())
                procs.start_all(PROCESSES)
                yield procs
            finally:
                procs.stop_all()
                if before is None:
                    os.environ.pop(registry.EXTRA_MODULES_ENV, None)
                else:
                    os.environ[registry.EXTRA_MODULES_ENV] = before
                registry.reset()
    finally:
        box.destroy()


def start(points: int, faults: dict[str, str] | None = None) -> uuid.UUID:
    """One loyalty saga for a new member, started as a web view would (one transaction)."""
    member = f"m-{uuid.uuid4().hex[:10]}"
    with transaction() as session:
        return engine.start_saga(
            session, "loyalty", member, {"member": member, "points": points, "faults": faults or {}}
        )


def saga(saga_id: uuid.UUID) -> dict[str, Any]:
    with transaction() as session:
        row = session.get(Saga, saga_id, populate_existing=True)
        assert row is not None
        return {
            "state": row.state.value,
            "version": row.definition_version,
            "steps": [
                (s.name, s.status.value, s.comp_status.value if s.comp_status else None)
                for s in row.steps
            ],
        }


def wait_state(saga_id: uuid.UUID, states: set[str], timeout_s: float = 60) -> dict[str, Any]:
    """Until the saga is in one of ``states`` (evidence, polled), or fail with where it is."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = saga(saga_id)
        if seen["state"] in states:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"saga {saga_id} still {seen} after {timeout_s}s")
        time.sleep(0.2)


def wait_step(saga_id: uuid.UUID, step: str, status: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        seen = saga(saga_id)
        if any(name == step and st == status for name, st, _ in seen["steps"]):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"saga {saga_id}: {step} not {status}: {seen}")
        time.sleep(0.2)


def award(saga_id: uuid.UUID) -> dict[str, Any] | None:
    with transaction() as session:
        row = session.execute(
            sa.select(tables.Award.status, tables.Award.points, tables.Award.bonus).where(
                tables.Award.saga_id == saga_id
            )
        ).one_or_none()
        return None if row is None else {"status": row[0], "points": row[1], "bonus": row[2]}
