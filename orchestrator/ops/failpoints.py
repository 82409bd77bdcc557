"""Named fail points for crashes an order cannot reach (``SAGA_FAULT_INJECTION=1`` only).

A test arms one by creating the file ``$SAGA_FAILPOINTS_DIR/<name>``; the next process to pass that
point removes the file (so it fires once) and dies at once, as SIGKILL would. A file that reads
``batch>=N`` fires only in a batch of at least N messages (batches.py passes the size). Before dying it adds
``<name> <pid>`` to ``$SAGA_FAILPOINTS_DIR/fired``, so a harness can tell a planned death from a crash.
"""

import os
import signal
from pathlib import Path

from orchestrator.ops.config import settings

FIRED = "fired"  # the record of every fail point that fired: "<name> <pid>" a line

NAMES = (
    "relay.after_publish",
    "orchestrator.after_commit",  # committed; its fast path already published (or gave up)
    "orchestrator.before_publish",  # committed, fast path not yet published: the relay sends it
    "orchestrator.after_publish",  # published, not yet marked sent: the relay sends it again
    "orchestrator.before_commit",  # a batch of replies applied, not committed: all redelivered
)
# Each participant service's batch consumer has three more, named by its queue (not drawn by
# chaos): "<queue>.mid_batch" (half its batch applied, nothing committed: workers/applying.py),
# "<queue>.before_publish" (committed, no reply sent), "<queue>.after_publish" (replies sent,
# nothing acked), the last two in orchestrator/messaging/batches.py.


def hit(name: str, batch: int = 1) -> None:
    cfg = settings()
    if not cfg.fault_injection or cfg.failpoints_dir is None:
        return
    marker = cfg.failpoints_dir / name
    try:
        condition = marker.read_text(encoding="utf-8").strip()
        if condition.startswith("batch>=") and batch < int(condition.removeprefix("batch>=")):
            return
        marker.unlink()
    except FileNotFoundError:
        return
    with open(cfg.failpoints_dir / FIRED, "a", encoding="utf-8") as record:  # one short append
        record.write(f"{name} {os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def fired_pids(folder: Path | str | None) -> set[int]:
    """The pids that fail points of ``folder`` have killed so far."""
    if not folder:
        return set()
    try:
        lines = (Path(folder) / FIRED).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return set()
    return {int(line.rsplit(" ", 1)[1]) for line in lines if line.rsplit(" ", 1)[-1].isdigit()}
