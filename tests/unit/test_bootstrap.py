"""Importing the product attaches nothing; bootstrap() wires a process, once (issue: control flow
readable, wiring in one explicit place)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Run in a fresh interpreter: this test process is itself bootstrapped (tests/conftest.py).
_PROBE = textwrap.dedent(
    """
    import importlib, pkgutil
    import sqlalchemy as sa
    from sqlalchemy.orm import Session
    from celery.signals import setup_logging, task_prerun, worker_process_init

    import orchestrator, workers, web
    skip = ("orchestrator.proof", "orchestrator.bootstrap")
    for package in (orchestrator, workers, web):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not info.name.startswith(skip):
                importlib.import_module(info.name)

    from orchestrator.kernel import engine
    from orchestrator.messaging import fastpath

    def wired():
        return {
            "events": sa.event.contains(Session, "before_commit", engine._write_events),
            "publish": sa.event.contains(Session, "after_commit", fastpath._publish_after_commit),
            "signals": sum(bool(s.receivers) for s in (setup_logging, task_prerun,
                                                       worker_process_init)),
        }

    before = wired()
    from orchestrator.bootstrap import bootstrap
    bootstrap(); bootstrap()
    after = wired()
    print(before, after, len(task_prerun.receivers))
    """
)


def test_importing_attaches_nothing_and_bootstrap_wires_once() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()
    before, after, prerun = out.rsplit(" ", 1)[0], out, out.rsplit(" ", 1)[1]
    assert before.startswith("{'events': False, 'publish': False, 'signals': 0}"), out
    assert "{'events': True, 'publish': True, 'signals': 3}" in after, out
    assert prerun == "1", out  # a second bootstrap() attached nothing more


def test_a_process_without_its_bootstrap_fails_at_its_first_timeline_event() -> None:
    probe = (
        "from orchestrator.kernel import engine\n"
        "try:\n"
        "    engine.record(None, None, engine.E.SAGA_STARTED)\n"
        "except RuntimeError as exc:\n"
        "    print('refused:', exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "refused: timeline events need the session hooks" in out
