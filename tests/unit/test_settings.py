"""Every setting is read in orchestrator/ops/config.py, typed, all its errors at once, secrets hidden,
and each one documented in the README."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from orchestrator.ops import config

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("orchestrator", "workers", "web", "models", "migrations")
CONFIG = Path("orchestrator/ops/config.py")
# Reads of the environment that are not settings: each says why it may stay.
ALLOWED_READS = {
    # The bench hands its raw baseline's child process a DSN of the bench's own making.
    (Path("orchestrator/proof/bench/raw.py"), "BENCH_FLOOR_DSN"),
    # The cluster's nodes run with an environment of their own, which keeps the caller's PATH.
    (Path("orchestrator/ops/cluster.py"), "PATH"),
    # sandbox_in_use saves the sandbox variables it is about to set, to put them back after.
    (Path("orchestrator/proof/harness.py"), "?"),
    # prometheus_client's own variable, set for this process by metrics_dir.prepare().
    (Path("orchestrator/ops/process_metrics.py"), "?"),
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for field in config.Settings.model_fields.values():
        monkeypatch.delenv(str(field.validation_alias), raising=False)
    monkeypatch.setenv("SAGA_STATE_DIR", str(tmp_path))
    return monkeypatch


def _environment_reads(path: Path) -> list[tuple[int, str]]:
    """``os.environ.get(X)``, ``os.environ[X]`` (read), ``os.getenv(X)``, ``X in os.environ``."""

    def is_environ(node: ast.AST) -> bool:
        # os.environ, or environ imported from os (a WSGI request.environ is not the process's)
        return (
            isinstance(node, ast.Attribute)
            and node.attr == "environ"
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        ) or (isinstance(node, ast.Name) and node.id == "environ")

    def name(arg: ast.AST | None) -> str:
        return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else "?"

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target, method = node.func.value, node.func.attr
            first = node.args[0] if node.args else None
            if is_environ(target) and method == "get":
                found.append((node.lineno, name(first)))
            if method == "getenv":
                found.append((node.lineno, name(first)))
        if (
            isinstance(node, ast.Subscript)
            and is_environ(node.value)
            and isinstance(node.ctx, ast.Load)
        ):
            found.append((node.lineno, name(node.slice)))
        if isinstance(node, ast.Compare) and any(is_environ(c) for c in node.comparators):
            found.append((node.lineno, name(node.left)))
    return found


def test_no_setting_is_read_outside_config() -> None:
    strays = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT)
            if relative == CONFIG:
                continue
            for line, variable in _environment_reads(path):
                if (relative, variable) not in ALLOWED_READS:
                    strays.append(f"{relative}:{line} reads {variable}")
    assert strays == [], "read it through orchestrator.ops.config.settings():\n" + "\n".join(strays)


def test_the_scan_finds_each_kind_of_read(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\nfrom os import environ\n"
        "a = os.environ.get('A')\nb = os.environ['B']\nc = os.getenv('C')\n"
        "d = 'D' in os.environ\ne = environ.get('E')\nos.environ['W'] = '1'\n"
        "w = request.environ['wsgi.input']\n"
    )
    assert [v for _, v in _environment_reads(sample)] == ["A", "B", "C", "D", "E"]


def test_every_error_is_reported_at_once(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PORT", "eighty")
    clean_env.setenv("SAGA_RETRY_ATTEMPTS", "many")
    clean_env.setenv("SAGA_SWEEP_S", "-1")
    clean_env.setenv("SAGA_ENV", "production")
    with pytest.raises(config.ConfigError) as raised:
        config.load_settings()
    message = str(raised.value)
    for variable in (
        "PORT",
        "SAGA_RETRY_ATTEMPTS",
        "SAGA_SWEEP_S",
        "SECRET_KEY",
        "SAGA_ADMIN_USER",
        "SAGA_ADMIN_PASSWORD",
    ):
        assert re.search(rf"^\s*{variable}: ", message, re.MULTILINE), (variable, message)


def test_secrets_never_show_in_a_repr(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SECRET_KEY", "the-secret-key-itself-0123456789")
    clean_env.setenv("SAGA_ADMIN_PASSWORD", "the-admin-password-itself")
    loaded = config.load_settings()
    for shown in (repr(loaded), str(loaded), repr(loaded.model_dump())):
        assert "the-secret-key-itself" not in shown and "the-admin-password-itself" not in shown
    assert loaded.secret_key.get_secret_value() == "the-secret-key-itself-0123456789"


def test_a_secret_is_not_echoed_in_an_error(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SAGA_ENV", "production")
    clean_env.setenv("SAGA_ADMIN_USER", "admin")
    clean_env.setenv("SECRET_KEY", "kept-out-of-messages")
    with pytest.raises(config.ConfigError) as raised:
        config.load_settings()
    assert "SAGA_ADMIN_PASSWORD" in str(raised.value)
    assert "kept-out-of-messages" not in str(raised.value)


def test_defaults_are_the_documented_ones(clean_env: pytest.MonkeyPatch) -> None:
    loaded = config.load_settings()
    assert (loaded.db_pool_size, loaded.db_pool_overflow, loaded.web_host) == (2, 6, "127.0.0.1")
    assert loaded.saga_url == "http://127.0.0.1:8000"
    assert loaded.task_soft_time_limit_s < loaded.task_time_limit_s


def test_a_soft_time_limit_must_be_below_the_hard_one(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SAGA_TASK_TIME_LIMIT_S", "10")
    clean_env.setenv("SAGA_TASK_SOFT_TIME_LIMIT_S", "10")
    with pytest.raises(config.ConfigError, match="SAGA_TASK_SOFT_TIME_LIMIT_S"):
        config.load_settings()


def _readme_configuration() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("## Configuration", 1)[1].split("\n## ", 1)[0]


def test_every_setting_is_documented_in_the_readme() -> None:
    rows = [line for line in _readme_configuration().splitlines() if line.startswith("| `")]
    variables = {str(f.validation_alias) for f in config.Settings.model_fields.values()}
    missing = sorted(v for v in variables if not any(r.startswith(f"| `{v}` |") for r in rows))
    assert missing == [], "each needs its row: | `NAME` | meaning | default |"


def test_the_web_keeps_a_connection_for_each_of_its_threads() -> None:
    """A pool smaller than the web's threads opened and closed a connection per request over it."""
    from models.db import pool_size

    assert pool_size("web", 2, 8) == 9  # each thread, and the publisher's sent marks
    assert pool_size("web#2", 2, 8) == 9
    assert pool_size("web", 12, 8) == 12  # a larger setting stands
    assert pool_size("orchestrator", 2, 8) == 2  # a worker's child runs one batch at a time
    assert pool_size(None, 2, 8) == 2
