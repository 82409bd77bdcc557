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

from orchestrator.proof.harness import Sandbox, free_port

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "the README must open with a bash block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_opens_with_the_run_and_test_commands() -> None:
    assert readme_commands()[:2] == ["make run", "make test"]


def test_make_run_from_a_fresh_clone_serves_orders(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    box = Sandbox.create("sagareadme")
    port = free_port()
    env = box.env(PORT=str(port), SAGA_STATE_DIR=str(tmp_path / "state"))
    env.pop("VIRTUAL_ENV", None)
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen(["make", "run"], cwd=clone, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 540
        output = ""
        while time.monotonic() < deadline and "Ctrl-C stops everything" not in output:
            assert proc.poll() is None, output[-3000:]
            time.sleep(1)
            output = (tmp_path / "run.log").read_text(errors="replace")
        assert f"http://127.0.0.1:{port}/" in output, output[-3000:]
        assert "Admin login:" in output
        time.sleep(3)  # let every worker finish connecting
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
