"""Settings read from the environment (see the contract's configuration table), in one place."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@localhost:5432/sagas"
DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672//"


class ConfigError(RuntimeError):
    """A required setting is missing or malformed; the process must not start."""


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw not in (None, "") else default
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return int(raw) if raw not in (None, "") else default
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc


def state_dir() -> Path:
    """Where development secrets live, shared by every process of one user."""
    base = os.environ.get("SAGA_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"),
        "saga-orchestrator",
    )
    return Path(base)


def _dev_secrets() -> dict[str, str]:
    """Generated once per machine user, so every development process agrees on them."""
    path = state_dir() / "dev-secrets.json"
    if path.exists():
        loaded: dict[str, str] = json.loads(path.read_text())
        return loaded
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {
        "secret_key": secrets.token_urlsafe(32),
        "admin_user": "admin",
        "admin_password": secrets.token_urlsafe(12),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values))
    os.chmod(tmp, 0o600)
    try:
        os.link(tmp, path)  # first writer wins when two processes race
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    loaded = json.loads(path.read_text())
    return loaded


@dataclass(frozen=True)
class Settings:
    database_url: str
    broker_url: str
    env: str
    secret_key: str
    admin_user: str
    admin_password: str
    fault_injection: bool
    port: int
    retry_attempts: int
    retry_base_s: float
    retry_max_s: float
    compensation_attempts: int
    step_timeout_s: float
    saga_deadline_s: float
    sweep_s: float
    outbox_limit: int
    outbox_fast_path: bool
    outbox_grace_s: float
    worker_concurrency: int
    prefetch: int
    trusted_hosts: tuple[str, ...]
    celery_events: bool
    worker_node: str
    metrics_port: int | None
    metrics_addr: str
    metrics_dir: str

    @property
    def production(self) -> bool:
        return self.env == "production"

    @property
    def saga_url(self) -> str:
        return os.environ.get("SAGA_URL") or f"http://127.0.0.1:{self.port}"


def load_settings() -> Settings:
    env = os.environ.get("SAGA_ENV", "development")
    if env not in ("development", "production"):
        raise ConfigError(f"SAGA_ENV must be development or production, got {env!r}")
    secret_key = os.environ.get("SECRET_KEY", "")
    admin_user = os.environ.get("SAGA_ADMIN_USER", "")
    admin_password = os.environ.get("SAGA_ADMIN_PASSWORD", "")
    if env == "production":
        missing = [
            name
            for name, value in (
                ("SECRET_KEY", secret_key),
                ("SAGA_ADMIN_USER", admin_user),
                ("SAGA_ADMIN_PASSWORD", admin_password),
            )
            if not value
        ]
        if missing:
            raise ConfigError(f"production needs {', '.join(missing)} set")
    elif not (secret_key and admin_user and admin_password):
        dev = _dev_secrets()
        secret_key = secret_key or dev["secret_key"]
        admin_user = admin_user or dev["admin_user"]
        admin_password = admin_password or dev["admin_password"]
    return Settings(
        database_url=os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL),
        broker_url=os.environ.get("BROKER_URL", DEFAULT_BROKER_URL),
        env=env,
        secret_key=secret_key,
        admin_user=admin_user,
        admin_password=admin_password,
        fault_injection=os.environ.get("SAGA_FAULT_INJECTION") == "1",
        port=_int("PORT", 8000),
        retry_attempts=_int("SAGA_RETRY_ATTEMPTS", 5),
        retry_base_s=_float("SAGA_RETRY_BASE_S", 0.5),
        retry_max_s=_float("SAGA_RETRY_MAX_S", 10.0),
        compensation_attempts=_int("SAGA_COMPENSATION_ATTEMPTS", 8),
        step_timeout_s=_float("SAGA_STEP_TIMEOUT_S", 30.0),
        saga_deadline_s=_float("SAGA_DEADLINE_S", 300.0),
        sweep_s=_float("SAGA_SWEEP_S", 5.0),
        outbox_limit=_int("SAGA_OUTBOX_LIMIT", 10_000),
        outbox_fast_path=os.environ.get("SAGA_OUTBOX_FAST_PATH", "1") != "0",
        outbox_grace_s=_float("SAGA_OUTBOX_GRACE_S", 5.0),
        worker_concurrency=_int("SAGA_WORKER_CONCURRENCY", 2),
        prefetch=_int("SAGA_PREFETCH", 4),
        trusted_hosts=tuple(
            h.strip() for h in os.environ.get("SAGA_TRUSTED_HOSTS", "").split(",") if h.strip()
        ),
        celery_events=os.environ.get("SAGA_CELERY_EVENTS") == "1",
        worker_node=os.environ.get("SAGA_WORKER_NODE", ""),
        metrics_port=_int("SAGA_METRICS_PORT", 0) or None,
        metrics_addr=os.environ.get("SAGA_METRICS_ADDR", "127.0.0.1"),
        metrics_dir=os.environ.get("SAGA_METRICS_DIR", ""),
    )


@lru_cache(maxsize=1)
def settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
