"""Named fail points for crashes an order cannot reach (``SAGA_FAULT_INJECTION=1`` only).

A test arms one by creating the file ``$SAGA_FAILPOINTS_DIR/<name>``; the next process to pass that
point removes the file (so it fires once) and dies at once, as SIGKILL would.
"""

import os
import signal
from pathlib import Path

NAMES = (
    "relay.after_publish",
    "orchestrator.after_commit",  # committed; its fast path already published (or gave up)
    "orchestrator.before_publish",  # committed, fast path not yet published: the relay sends it
    "orchestrator.after_publish",  # published, not yet marked sent: the relay sends it again
)


def hit(name: str) -> None:
    if os.environ.get("SAGA_FAULT_INJECTION") != "1":
        return
    folder = os.environ.get("SAGA_FAILPOINTS_DIR")
    if not folder:
        return
    marker = Path(folder) / name
    try:
        marker.unlink()
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
