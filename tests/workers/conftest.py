"""Participants tier: the participants' batch application against a real PostgreSQL sandbox of its
own, called in-process (no worker, no broker traffic): the transaction is the thing under test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from orchestrator.proof.harness import Sandbox


@pytest.fixture(scope="package", autouse=True)
def workers_sandbox(sandbox: Sandbox) -> Iterator[Sandbox]:
    """A database of this tier alone: its reservations and charges belong to no saga, so the
    integration tier's audits must never see them; the process points back when the tier ends."""
    from models.db import get_engine
    from orchestrator.proof.harness import use_sandbox

    box = Sandbox.create("sagawork")
    use_sandbox(box)
    try:
        yield box
    finally:
        get_engine().dispose()
        use_sandbox(sandbox)
        box.destroy()
