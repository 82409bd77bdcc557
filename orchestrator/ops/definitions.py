"""``sagactl definitions``: each registered definition version, its fingerprint, sagas in flight.

A version with nothing in flight (and no saga left to advance on it) can be retired from the
registry; ``in_flight`` says when. Versions in flight that the registry lacks are listed too.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from models.db import transaction
from models.enums import SagaState
from models.sagas import Saga
from orchestrator.kernel import versions
from orchestrator.registry import Registry

NOT_FINAL = (SagaState.RUNNING, SagaState.COMPENSATING, SagaState.FAILED)


def in_flight() -> dict[tuple[str, int], int]:
    """(name, version) -> sagas not completed or compensated (failed ones may still resume)."""
    with transaction() as session:
        rows = session.execute(
            sa.select(Saga.definition, Saga.definition_version, sa.func.count())
            .where(Saga.state.in_(NOT_FINAL))
            .group_by(Saga.definition, Saga.definition_version)
        )
        return {(name, version): int(n) for name, version, n in rows}


def listing(registry: Registry) -> list[dict[str, Any]]:
    counts = in_flight()
    rows = []
    for key, reg in sorted(registry.definitions.items()):
        locked = versions.read_lock(reg.lock_file).get(reg.name, {}).get(str(reg.version))
        fingerprint = reg.definition.fingerprint()
        rows.append(
            {
                "name": reg.name,
                "version": reg.version,
                "fingerprint": fingerprint,
                "lock": "unlocked"
                if locked is None
                else "locked"
                if locked == fingerprint
                else "changed",
                "steps": len(reg.definition.steps),
                "in_flight": counts.get(key, 0),
                "registered": True,
            }
        )
    for (name, version), n in sorted(counts.items()):
        if (name, version) not in registry.definitions:
            rows.append(
                {
                    "name": name,
                    "version": version,
                    "fingerprint": None,
                    "lock": "missing",
                    "steps": None,
                    "in_flight": n,
                    "registered": False,
                }
            )
    return rows
