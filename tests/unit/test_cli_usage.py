"""``sagactl`` without services: ``--help`` and ``--version`` need no configuration and write
nothing; a bad configuration is exit 2; a database that cannot be reached is exit 3, said in one
line with the URL and without its password."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from orchestrator.ops import cli, config
from orchestrator.ops.processes import sagactl
from orchestrator.proof.harness import free_port


def command_paths(
    group: click.Group = cli.main, prefix: tuple[str, ...] = ()
) -> Iterator[list[str]]:
    for name, command in sorted(group.commands.items()):
        yield [*prefix, name]
        if isinstance(command, click.Group):
            yield from command_paths(command, (*prefix, name))


def bare_env(state_dir: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any of the system's settings."""
    names = {str(f.validation_alias) for f in config.Settings.model_fields.values()}
    env = {k: v for k, v in os.environ.items() if k not in names}
    return {**env, "SAGA_STATE_DIR": str(state_dir), **extra}


def run(state_dir: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sagactl(*args),
        env=bare_env(state_dir, **extra),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("path", [[], *command_paths()], ids=lambda p: " ".join(p) or "sagactl")
def test_help_needs_no_configuration_and_writes_nothing(
    path: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in bare_env(tmp_path, SAGA_ENV="production").items():
        monkeypatch.setenv(name, value)
    for name in set(os.environ) - set(bare_env(tmp_path, SAGA_ENV="production")):
        monkeypatch.delenv(name)
    config.settings.cache_clear()
    try:
        result = CliRunner().invoke(cli.main, [*path, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.output
        assert config.settings.cache_info().currsize == 0  # never read
        assert list(tmp_path.iterdir()) == []
    finally:
        config.settings.cache_clear()


def test_help_in_a_fresh_process_in_production_without_secrets(tmp_path: Path) -> None:
    for args in (["--help"], ["audit", "--help"], ["db", "upgrade", "--help"]):
        result = run(tmp_path, *args, SAGA_ENV="production")
        assert result.returncode == 0, result.stderr
        assert "Usage:" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_version_is_the_packages(tmp_path: Path) -> None:
    result = run(tmp_path, "--version", SAGA_ENV="production")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == importlib.metadata.version("saga-orchestrator")
    assert list(tmp_path.iterdir()) == []


def test_a_bad_configuration_is_exit_2_with_every_problem(tmp_path: Path) -> None:
    result = run(tmp_path, "audit", SAGA_ENV="production", PORT="eighty")
    assert result.returncode == 2
    for variable in ("PORT", "SECRET_KEY", "SAGA_ADMIN_PASSWORD"):
        assert variable in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["audit"],
        ["seed"],
        ["restock", "SKU-APPLE", "1"],
        ["db", "upgrade"],
        ["dlq", "list"],
        ["dlq", "discard", "1"],
        ["prune", "--older-than", "1"],
    ],
    ids=" ".join,
)
def test_an_unreachable_database_is_exit_3_in_one_line(args: list[str], tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql+psycopg://postgres:hunter2@127.0.0.1:{port}/sagas"
    result = run(tmp_path, *args, DATABASE_URL=url)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cannot reach the database at ")
    assert f"127.0.0.1:{port}/sagas" in lines[0] and "hunter2" not in lines[0]


def test_chaos_and_bench_check_the_sandbox_servers_first(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres"
    for args in (["chaos"], ["bench"]):
        result = run(tmp_path, *args, SAGA_SANDBOX_DATABASE_URL=url)
        assert result.returncode == 3, result.stderr
        assert "cannot reach the database" in result.stderr
