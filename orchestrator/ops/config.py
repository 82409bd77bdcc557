"""Every setting of every process, read from the environment in one place (README, Configuration).

``settings()`` reads them once per process with pydantic-settings: typed, every error reported at
once, and the secrets held as ``SecretStr`` so a repr or a log line never shows them.
"""

from __future__ import annotations

import json
import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@localhost:5432/sagas"
DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672//"

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class ConfigError(RuntimeError):
    """A required setting is missing or malformed; the process must not start."""


def _env(name: str, default: Any = None, **kw: Any) -> Any:
    """A field read from the environment variable ``name`` (the one name users see)."""
    return Field(default, validation_alias=name, **kw)


def _dev_secrets(folder: Path) -> dict[str, str]:
    """Generated once per machine user, so every development process agrees on them."""
    path = folder / "dev-secrets.json"
    if path.exists():
        loaded: dict[str, str] = json.loads(path.read_text())
        return loaded
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {
        "secret_key": secrets.token_urlsafe(32),
        "admin_user": "admin",
        "admin_password": secrets.token_urlsafe(12),
    }
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
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


class Settings(BaseSettings):
    """One field per environment variable; field order matters where a default depends on another."""

    model_config = SettingsConfigDict(
        frozen=True,
        env_ignore_empty=True,  # an empty variable means "unset", as Compose's ${X:-} gives it
        validate_default=True,  # the computed defaults below run their validators
        extra="ignore",
    )

    # --- the contract's table
    env: Literal["development", "production"] = _env("SAGA_ENV", "development")
    database_url: str = _env("DATABASE_URL", DEFAULT_DATABASE_URL)
    broker_url: str = _env("BROKER_URL", DEFAULT_BROKER_URL)
    port: int = _env("PORT", 8000, ge=1, le=65535)
    saga_url: str = _env("SAGA_URL", "")
    fault_injection: bool = _env("SAGA_FAULT_INJECTION", False)
    retry_attempts: int = _env("SAGA_RETRY_ATTEMPTS", 5, ge=1)
    retry_base_s: float = _env("SAGA_RETRY_BASE_S", 0.5, ge=0)
    retry_max_s: float = _env("SAGA_RETRY_MAX_S", 10.0, ge=0)
    compensation_attempts: int = _env("SAGA_COMPENSATION_ATTEMPTS", 8, ge=1)
    step_timeout_s: float = _env("SAGA_STEP_TIMEOUT_S", 30.0, gt=0)
    saga_deadline_s: float = _env("SAGA_DEADLINE_S", 300.0, gt=0)
    sweep_s: float = _env("SAGA_SWEEP_S", 5.0, gt=0)
    # A paused service's held commands are released at this rate once it resumes (per second),
    # so a service that just recovered is not flooded with the backlog at once.
    resume_rate: float = _env("SAGA_RESUME_RATE", 50.0, gt=0)
    # The circuit breaker of each service: over the last BREAKER_WINDOW_S seconds of replies, at
    # least BREAKER_MIN_CALLS of them and a share of transient failures of BREAKER_THRESHOLD or
    # more pause the service (breaker_open); after BREAKER_COOLDOWN_S one probe command goes
    # through (half_open). Business refusals count as healthy calls.
    breaker_window_s: float = _env("SAGA_BREAKER_WINDOW_S", 60.0, gt=0)
    breaker_threshold: float = _env("SAGA_BREAKER_THRESHOLD", 0.5, gt=0, le=1)
    breaker_min_calls: int = _env("SAGA_BREAKER_MIN_CALLS", 20, ge=1)
    breaker_cooldown_s: float = _env("SAGA_BREAKER_COOLDOWN_S", 30.0, gt=0)
    # Traces by OTLP/HTTP to <endpoint>/v1/traces (orchestrator/ops/tracing.py); unset: none, and
    # OpenTelemetry is not even imported.
    otel_endpoint: str = _env("OTEL_EXPORTER_OTLP_ENDPOINT", "")

    # --- where state lives (before the secrets: development secrets are kept there)
    xdg_state_home: Path | None = _env("XDG_STATE_HOME")
    state_dir: Path = _env("SAGA_STATE_DIR", Path())

    # --- secrets and the admin login (required in production, generated in development)
    secret_key: SecretStr = _env("SECRET_KEY", SecretStr(""))
    admin_user: str = _env("SAGA_ADMIN_USER", "")
    admin_password: SecretStr = _env("SAGA_ADMIN_PASSWORD", SecretStr(""))

    # --- outbox and workers
    outbox_limit: int = _env("SAGA_OUTBOX_LIMIT", 10_000, ge=1)
    outbox_fast_path: bool = _env("SAGA_OUTBOX_FAST_PATH", True)
    outbox_grace_s: float = _env("SAGA_OUTBOX_GRACE_S", 5.0, ge=0)
    worker_concurrency: int = _env("SAGA_WORKER_CONCURRENCY", 2, ge=1)
    # The niceness of the background processes (the Celery workers, the relay, beat): on a host
    # they share with the web, an order request gets a core before a batch does. 0: equal.
    background_nice: int = _env("SAGA_BACKGROUND_NICE", 10, ge=0, le=19)
    prefetch: int = _env("SAGA_PREFETCH", 4, ge=1)
    # Messages a batch consumer (orchestrator/messaging/batches.py) takes at once, and so its
    # prefetch: every one that is waiting, up to this many, never waiting for more. 0: no
    # batching (Celery's consumer, one task and one transaction per message).
    batch_max: int = _env("SAGA_BATCH_MAX", 100, ge=0)
    # Quorum queue replicas (x-quorum-initial-group-size); every process must agree, since the broker
    # refuses a declaration that differs from the queue's. Unset: the argument is not sent, so
    # queues declared before the setting existed are still accepted (RabbitMQ's default applies).
    queue_replicas: int | None = _env("SAGA_QUEUE_REPLICAS", None, ge=1)
    # Far above any legitimate task (milliseconds) and the test faults' hang:S (a few seconds).
    task_time_limit_s: float = _env("SAGA_TASK_TIME_LIMIT_S", 90.0, gt=0)
    task_soft_time_limit_s: float = _env("SAGA_TASK_SOFT_TIME_LIMIT_S", 60.0, ge=0)
    db_pool_size: int = _env("SAGA_DB_POOL_SIZE", 2, ge=1)
    db_pool_overflow: int = _env("SAGA_DB_POOL_OVERFLOW", 6, ge=0)
    beat_schedule: Path | None = _env("SAGA_BEAT_SCHEDULE")
    # A bulk operation by filter acts on at most this many sagas a second (beat's sweep runs it),
    # so "retry the 2,000 that failed" does not flood the participants at once.
    bulk_rate: float = _env("SAGA_BULK_RATE", 20.0, gt=0)

    # --- the web server
    web_host: str = _env("SAGA_WEB_HOST", "127.0.0.1", min_length=1)
    # Comma-separated; empty: any Host header is answered (development).
    trusted_hosts: Annotated[tuple[str, ...], NoDecode] = _env("SAGA_TRUSTED_HOSTS", ())
    # Extra saga registry modules every process loads at start (docs/extending.md).
    registry_modules: Annotated[tuple[str, ...], NoDecode] = _env("SAGA_REGISTRY_MODULES", ())
    web_workers: int = _env("SAGA_WEB_WORKERS", 2, ge=1)
    web_threads: int = _env("SAGA_WEB_THREADS", 8, ge=1)

    # --- Celery's own tools and per-process metrics
    celery_events: bool = _env("SAGA_CELERY_EVENTS", False)  # task events + remote control
    worker_node: str = _env("SAGA_WORKER_NODE", "")  # node name template, e.g. "{name}@%h"
    metrics_port: int | None = _env("SAGA_METRICS_PORT", None, ge=1, le=65535)
    metrics_addr: str = _env("SAGA_METRICS_ADDR", "127.0.0.1")
    metrics_dir: str = _env("SAGA_METRICS_DIR", "")

    # --- logs and process identity
    process: str | None = _env("SAGA_PROCESS")  # set by sagactl for each process it starts
    log_json: bool = _env("SAGA_LOG_JSON", False)
    log_level: LogLevel = _env("SAGA_LOG_LEVEL", "INFO")

    # --- proof tools and test-only knobs
    rabbitmq_api: str | None = _env("SAGA_RABBITMQ_API")  # bench: management API for counts
    rabbitmq_bin: Path = _env("SAGA_RABBITMQ_BIN", Path("/usr/lib/rabbitmq/bin"))  # sagactl cluster
    pg_bin: Path = _env("SAGA_PG_BIN", Path("/usr/lib/postgresql/15/bin"))  # chaos --allow-db-restart
    sandbox_database_url: str = _env("SAGA_SANDBOX_DATABASE_URL", DEFAULT_DATABASE_URL)
    sandbox_broker_url: str = _env("SAGA_SANDBOX_BROKER_URL", DEFAULT_BROKER_URL)
    failpoints_dir: Path | None = _env("SAGA_FAILPOINTS_DIR")

    @field_validator("saga_url")
    @classmethod
    def _saga_url_defaults_to_the_port(cls, value: str, info: ValidationInfo) -> str:
        return value or f"http://127.0.0.1:{info.data.get('port', 8000)}"

    @field_validator("state_dir")
    @classmethod
    def _state_dir_default(cls, value: Path, info: ValidationInfo) -> Path:
        if value != Path():
            return value
        base = info.data.get("xdg_state_home") or Path(os.path.expanduser("~/.local/state"))
        return Path(base) / "saga-orchestrator"

    @field_validator("secret_key", "admin_user", "admin_password")
    @classmethod
    def _required_or_generated(cls, value: Any, info: ValidationInfo) -> Any:
        plain = value.get_secret_value() if isinstance(value, SecretStr) else value
        if plain:
            return value
        env = info.data.get("env")
        if env == "production":
            raise ValueError("required in production")
        if env is None or "state_dir" not in info.data:
            return value  # another error is reported for those fields
        generated = _dev_secrets(info.data["state_dir"])[info.field_name or ""]
        return SecretStr(generated) if isinstance(value, SecretStr) else generated

    @field_validator("trusted_hosts", "registry_modules", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(h.strip() for h in value.split(",") if h.strip())
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_any_case(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("task_soft_time_limit_s")
    @classmethod
    def _soft_below_hard(cls, value: float, info: ValidationInfo) -> float:
        hard = info.data.get("task_time_limit_s")
        if hard is not None and value >= hard:
            raise ValueError(f"must be below SAGA_TASK_TIME_LIMIT_S ({hard:g}); 0 turns it off")
        return value

    @property
    def production(self) -> bool:
        return self.env == "production"


SECRET_VARIABLES = ("SECRET_KEY", "SAGA_ADMIN_PASSWORD")


def _variable(loc: tuple[int | str, ...]) -> str:
    """The environment variable an error is about (a defaulted field reports its own name)."""
    head = str(loc[0]) if loc else "settings"
    field = Settings.model_fields.get(head)
    alias = field.validation_alias if field is not None else None
    return alias if isinstance(alias, str) else head


def _describe(exc: ValidationError) -> str:
    """Every problem on a line of its own, named by its environment variable."""
    lines = []
    for error in exc.errors():
        name = _variable(error["loc"])
        given = error.get("input")
        shown = isinstance(given, str) and given and name not in SECRET_VARIABLES
        lines.append(f"{name}: {error['msg']}" + (f" (got {given!r})" if shown else ""))
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


@lru_cache(maxsize=1)
def settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()


def state_dir() -> Path:
    """Where development secrets and beat's schedule live (``SAGA_STATE_DIR``)."""
    return settings().state_dir
