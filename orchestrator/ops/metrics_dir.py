"""Where a process's metrics files live (prometheus-client's multiprocess mode).

Kept apart from process_metrics: it must run before anything imports prometheus_client, which
picks its value class (in memory, or files in ``PROMETHEUS_MULTIPROC_DIR``) once, at import.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _base(configured: str) -> Path:
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "saga-metrics"


def prepare(process: str, metrics_dir: str = "", enabled: bool = True) -> None:
    """Give this process (and the children it forks) a fresh multiprocess directory.

    Call before prometheus_client is imported in this process (``sagactl`` does, before exec).
    The folder is ``<SAGA_METRICS_DIR or $TMP/saga-metrics>/<process>-<pid>``: a pid survives the
    exec, so the parent's files are the endpoint's. Folders of processes that are gone are removed
    here, so counts of an earlier run never add to this one.
    """
    if not enabled:
        os.environ.pop(MULTIPROC_ENV, None)
        return
    base = _base(metrics_dir)
    base.mkdir(parents=True, exist_ok=True)
    for old in base.iterdir():
        pid = old.name.rsplit("-", 1)[-1]
        if old.is_dir() and pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    own = base / f"{process.replace('/', '_')}-{os.getpid()}"
    shutil.rmtree(own, ignore_errors=True)
    own.mkdir()
    os.environ[MULTIPROC_ENV] = str(own)
