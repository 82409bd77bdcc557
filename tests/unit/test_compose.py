"""docker-compose.yml and the Dockerfile describe the contract's system (no Docker needed to check).

The compose file is parsed as YAML and its ``${VAR:-default}`` / ``${VAR:?error}`` interpolation is
applied as Compose does, so the environment it hands the processes is checked for real.
"""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import sqlalchemy as sa
import yaml

from orchestrator.ops import cli, config
from orchestrator.ops.processes import PROCESS_TABLE

ROOT = Path(__file__).resolve().parents[2]

# The contract's process table: name -> command.
CONTRACT_PROCESSES = {
    "web": "sagactl web",
    "orchestrator": "sagactl worker orchestrator",
    "relay": "sagactl relay",
    "inventory": "sagactl worker inventory",
    "payment": "sagactl worker payment",
    "orders": "sagactl worker orders",
    "beat": "sagactl beat",
}
# The contract's configuration table.
CONTRACT_VARIABLES = {
    "DATABASE_URL",
    "BROKER_URL",
    "SAGA_ENV",
    "SECRET_KEY",
    "SAGA_ADMIN_USER",
    "SAGA_ADMIN_PASSWORD",
    "SAGA_FAULT_INJECTION",
    "PORT",
    "SAGA_URL",
    "SAGA_RETRY_ATTEMPTS",
    "SAGA_RETRY_BASE_S",
    "SAGA_RETRY_MAX_S",
    "SAGA_COMPENSATION_ATTEMPTS",
    "SAGA_STEP_TIMEOUT_S",
    "SAGA_DEADLINE_S",
    "SAGA_SWEEP_S",
}
INFRA = {"postgres", "rabbitmq", "migrate"}
SECRETS = {"SECRET_KEY": "k" * 40, "SAGA_ADMIN_PASSWORD": "a-strong-password"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = compose["services"]
    return found


_VAR = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")


class MissingVariable(Exception):
    pass


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${X}``, ``${X:-default}`` and ``${X:?error}`` (unset or empty alike)."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"], m["arg"]
        if env.get(name):
            return env[name]
        if op == ":?":
            raise MissingVariable(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return _VAR.sub(one, value)


def environment(service: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    return {k: interpolate(str(v), env) for k, v in (service.get("environment") or {}).items()}


def sagactl_commands(command: list[str]) -> list[list[str]]:
    """The ``sagactl`` invocations of a service's command (``sh -c "a && b"`` included)."""
    if command[:2] == ["sh", "-c"]:
        return [shlex.split(part) for part in command[2].split("&&")]
    return [command]


def check_cli(args: list[str]) -> None:
    """Resolve ``sagactl <args>`` through the real click command tree, arguments validated."""
    assert args[0] == "sagactl"
    group: click.Command = cli.main
    rest = args[1:]
    while isinstance(group, click.Group):
        sub = group.get_command(click.Context(group), rest[0])
        assert sub is not None, f"no command {rest[0]!r} in {args}"
        group, rest = sub, rest[1:]
    group.make_context(args[-1], list(rest))  # raises click.UsageError on a bad argument


def test_services_are_the_contracts_processes_plus_infrastructure(services: dict) -> None:
    assert set(services) == set(CONTRACT_PROCESSES) | INFRA
    assert set(PROCESS_TABLE) == set(CONTRACT_PROCESSES)


@pytest.mark.parametrize("name", sorted(CONTRACT_PROCESSES))
def test_each_process_runs_its_contract_command(services: dict, name: str) -> None:
    command = services[name]["command"]
    assert command == ["sagactl", *PROCESS_TABLE[name]]
    assert " ".join(command) == CONTRACT_PROCESSES[name]
    check_cli(command)


def test_migrate_upgrades_then_seeds_once(services: dict) -> None:
    migrate = services["migrate"]
    assert [c[1:] for c in sagactl_commands(migrate["command"])] == [["db", "upgrade"], ["seed"]]
    for command in sagactl_commands(migrate["command"]):
        check_cli(command)
    assert migrate["restart"] == "no"
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}


def test_the_cli_check_catches_a_wrong_command() -> None:
    with pytest.raises(click.UsageError):
        check_cli(["sagactl", "worker", "shipping"])
    with pytest.raises(AssertionError):
        check_cli(["sagactl", "launch"])


@pytest.mark.parametrize("name", sorted(CONTRACT_PROCESSES))
def test_each_process_starts_after_migration_and_a_healthy_broker(
    services: dict, name: str
) -> None:
    assert services[name]["depends_on"] == {
        "migrate": {"condition": "service_completed_successfully"},
        "rabbitmq": {"condition": "service_healthy"},
    }
    assert services[name]["restart"] == "unless-stopped"


def test_every_healthy_condition_points_at_a_service_with_a_healthcheck(services: dict) -> None:
    for name, service in services.items():
        for target, cond in (service.get("depends_on") or {}).items():
            assert target in services, (name, target)
            if cond["condition"] == "service_healthy":
                check = services[target].get("healthcheck", {})
                assert check.get("test") and not check.get("disable"), (name, target)


def test_healthchecks(services: dict) -> None:
    for name in set(services) - {"migrate"}:
        check = services[name]["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL") and not check.get("disable"), name
        assert "interval" in check and "retries" in check, name
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "rabbitmq-diagnostics" in services["rabbitmq"]["healthcheck"]["test"]
    assert "/healthz" in " ".join(services["web"]["healthcheck"]["test"])
    for name in set(CONTRACT_PROCESSES) - {"web"}:
        assert "health.check()" in " ".join(services[name]["healthcheck"]["test"]), name


def test_rabbitmq_is_the_management_image_and_postgres_keeps_its_data(services: dict) -> None:
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3")
    assert services["rabbitmq"]["image"].endswith("-management")
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])


@pytest.mark.parametrize("name", sorted(CONTRACT_PROCESSES | {"migrate": ""}))
def test_each_process_gets_the_contracts_configuration(services: dict, name: str) -> None:
    env = environment(services[name], SECRETS)
    assert set(env) >= CONTRACT_VARIABLES
    url = sa.make_url(env["DATABASE_URL"])
    assert (url.drivername, url.host, url.database) == ("postgresql+psycopg", "postgres", "sagas")
    assert env["BROKER_URL"].startswith("amqp://") and "@rabbitmq:5672/" in env["BROKER_URL"]
    assert env["SAGA_ENV"] == "production"


def test_the_compose_environment_is_a_valid_production_configuration(
    services: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = environment(services["web"], SECRETS)
    for name in CONTRACT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    loaded = config.load_settings()
    assert loaded.production
    password = loaded.admin_password.get_secret_value()
    assert (loaded.admin_user, password) == ("admin", SECRETS["SAGA_ADMIN_PASSWORD"])
    assert (loaded.retry_attempts, loaded.compensation_attempts, loaded.step_timeout_s) == (
        5,
        8,
        30.0,
    )  # the contract's defaults
    assert loaded.port == 8000 and not loaded.fault_injection


def test_the_web_binds_every_interface_in_its_container(
    services: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sagactl web`` binds loopback unless told otherwise; compose and the image tell it."""
    for name, value in environment(services["web"], SECRETS).items():
        monkeypatch.setenv(name, value)
    assert config.load_settings().web_host == "0.0.0.0"
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    assert any(re.search(r"\bSAGA_WEB_HOST=0\.0\.0\.0\b", line) for line in lines)


def test_the_healthchecks_import_what_exists(services: dict) -> None:
    for name in set(CONTRACT_PROCESSES) - {"web"}:
        code = services[name]["healthcheck"]["test"][-1]
        imports = re.findall(r"from [\w.]+ import \w+", code)
        assert imports, code
        for statement in imports:
            exec(statement, {})  # an ImportError fails the test


def test_production_secrets_have_no_default(services: dict) -> None:
    for secret in SECRETS:
        with pytest.raises(MissingVariable, match=secret):
            environment(services["web"], {k: v for k, v in SECRETS.items() if k != secret})


def test_one_beat_only(services: dict) -> None:
    beat = services["beat"]
    assert "scale" not in beat and "replicas" not in (beat.get("deploy") or {})


def test_the_web_is_published_on_its_port(services: dict) -> None:
    assert any(str(p).endswith(":8000") for p in services["web"]["ports"])


def test_dockerfile_installs_the_package_and_runs_as_a_user() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    steps = [line for line in lines if line and not line.startswith("#")]
    assert steps[0] == "FROM python:3.11-slim"
    assert any(re.search(r"\bpip install \.(\s|$)", s) for s in steps)
    users = [s.split()[1] for s in steps if s.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    copied = {s.split()[1] for s in steps if s.startswith("COPY ")}
    packages = configparser.ConfigParser()
    packages.read(ROOT / "setup.cfg")
    top = {p.split(".")[0] for p in packages["options.packages.find"]["include"].split()}
    assert top <= copied, top - copied


def test_dockerignore_keeps_the_environment_and_tests_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "artifacts", "tests"} <= ignored


def test_every_template_and_static_file_is_packaged() -> None:
    """``pip install .`` (the image) ships only what setup.cfg's package_data names."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    globs = [g.strip() for g in parser["options.package_data"]["web"].split(",")]
    web = ROOT / "web"
    files = {p for d in ("templates", "static") for p in (web / d).rglob("*") if p.is_file()}
    packaged = {
        p for g in globs for p in web.glob(g)
    }  # a glob's * stops at a "/", as in setuptools
    assert files and files - packaged == set()
