"""A PostgreSQL server of a run's own (``initdb`` on another port), so chaos may restart it.

PostgreSQL refuses to run as root: the server runs as the ``postgres`` OS user, its data directory
under a temporary folder that user owns. Only this server is ever stopped; the machine's own
PostgreSQL on 5432 is never touched.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")  # Debian's PostgreSQL 15
OS_USER = "postgres"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(*argv: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    prefix = ["runuser", "-u", OS_USER, "--"] if os.geteuid() == 0 else []
    return subprocess.run(
        [*prefix, *argv], capture_output=True, text=True, timeout=timeout_s, check=False
    )


@dataclass
class PrivatePostgres:
    root: Path
    port: int

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        """A SQLAlchemy URL of its ``postgres`` database (trust auth on loopback)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @classmethod
    def create(cls) -> PrivatePostgres:
        root = Path(tempfile.mkdtemp(prefix="sagapg-"))
        shutil.chown(root, OS_USER, OS_USER)
        server = cls(root, _free_port())
        done = _as_postgres(
            str(PG_BIN / "initdb"), "-D", str(server.data), "-U", "postgres",
            "--auth=trust", "--no-sync", "-E", "UTF8",
        )  # fmt: skip
        if done.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError(f"initdb failed: {done.stderr.strip()[-800:]}")
        server.start()
        return server

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=300"
        )
        done = _as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {done.stderr.strip()[-800:]}")

    def stop(self, mode: str = "fast") -> None:
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, down_s: float = 2.0) -> float:
        """Stop (fast: every session is cut), stay down ``down_s``, start; returns the downtime."""
        began = time.monotonic()
        self.stop()
        time.sleep(down_s)
        self.start()
        return time.monotonic() - began

    def destroy(self) -> None:
        self.stop(mode="immediate")
        shutil.rmtree(self.root, ignore_errors=True)
