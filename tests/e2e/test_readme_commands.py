"""The README's first command, run from a fresh clone, brings up a working system.

(The second one, ``make test``, is what CI runs on a fresh clone: this very suite.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import sqlalchemy as sa
from alembic.script import ScriptDirectory

from orchestrator.ops.database import alembic_config
from orchestrator.proof.harness import READY_MARKERS, Sandbox, free_port
from orchestrator.sagas import catalog

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "the README must open with a bash block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_opens_with_the_run_and_test_commands() -> None:
    assert readme_commands()[:2] == ["make run", "make test"]


def database_exists(url: str) -> bool:
    target = sa.make_url(url)
    admin = target.set(drivername="postgresql", database="postgres")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target.database,))
        return found.fetchone() is not None


def test_make_run_from_a_fresh_clone_serves_orders(tmp_path: Path) -> None:
    """From nothing: no database (``sagactl db upgrade`` creates it) and an empty vhost."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    box = Sandbox.create("sagareadme", prepare=False)
    assert not database_exists(box.database_url)
    port = free_port()
    env = box.env(PORT=str(port), SAGA_STATE_DIR=str(tmp_path / "state"))
    env.pop("VIRTUAL_ENV", None)
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen(["make", "run"], cwd=clone, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 540
        output = ""
        while time.monotonic() < deadline and not every_process_ready(output):
            assert proc.poll() is None, output[-3000:]
            time.sleep(1)
            output = (tmp_path / "run.log").read_text(errors="replace")
        assert every_process_ready(output), output[-3000:]
        assert f"http://127.0.0.1:{port}/" in output, output[-3000:]
        assert "Admin login:" in output
        # The upgrade created the database and migrated it to the head; the seed filled it.
        assert database_exists(box.database_url)
        catalogue = len(catalog.DEMO_PRODUCTS)
        assert f"seeded: {catalogue} product(s) created, 0 already there" in output, output[-3000:]
        engine = sa.create_engine(box.database_url)
        try:
            with engine.connect() as conn:
                revision = conn.scalar(sa.text("SELECT version_num FROM alembic_version"))
                skus = set(conn.scalars(sa.text("SELECT sku FROM products")))
        finally:
            engine.dispose()
        assert revision == ScriptDirectory.from_config(alembic_config(box.database_url)).get_current_head()
        assert skus == {sku for sku, *_ in catalog.DEMO_PRODUCTS}
        demo = subprocess.run([str(clone / ".venv/bin/sagactl"), "demo", "--count", "8", "--json",
                               "--url", f"http://127.0.0.1:{port}"], env=env,
                              capture_output=True, text=True, timeout=180)
        assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        box.destroy()


def every_process_ready(output: str) -> bool:
    """``sagactl run`` printed its banner and every process its ready line (they share its
    output): what "the system is up" means, instead of a guess at how long that takes."""
    if "Ctrl-C stops everything" not in output:
        return False
    return all(output.count(marker) >= sum(m == marker for m in READY_MARKERS.values())
               for marker in READY_MARKERS.values())
