"""The one list of the system's vocabulary: services, commands, saga definitions, timeline events.

Every process builds it once at start (``load()``, called by each process's bootstrap): the shop's
own sagas (``BUILTIN``) and the modules named in ``SAGA_REGISTRY_MODULES`` (comma-separated), each
of which has a ``register(registry)`` function. Topology, routing, worker start-up, validation of
messages, the CLI, chaos and bench read it; nothing else lists a service, a queue or a command.
An unknown service, command or definition is an error, never a silent default.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.enums import Reason, SagaState
from orchestrator.kernel.machine import SagaDefinition

if TYPE_CHECKING:
    from pydantic import BaseModel
    from sqlalchemy.orm import Session

    from models.sagas import Saga

BUILTIN = ("orchestrator.sagas.order", "orchestrator.sagas.returns")
EXTRA_MODULES_ENV = "SAGA_REGISTRY_MODULES"
ORCHESTRATOR = "orchestrator"
ORCHESTRATOR_QUEUE = "saga.orchestrator"
# The orchestrator's own tasks (participant replies, the periodic sweep, releasing held commands).
ORCHESTRATOR_TASKS = ("saga.reply", "saga.sweep", "saga.release")


class TimelineEvent(StrEnum):
    """The contract's timeline vocabulary: the only names a saga's timeline holds."""

    SAGA_STARTED = "saga.started"
    STEP_DISPATCHED = "step.dispatched"
    STEP_SUCCEEDED = "step.succeeded"
    STEP_FAILED = "step.failed"
    STEP_RETRIED = "step.retried"
    STEP_TIMED_OUT = "step.timed_out"
    STEP_DEAD_LETTERED = "step.dead_lettered"
    COMPENSATION_DISPATCHED = "compensation.dispatched"
    COMPENSATION_SUCCEEDED = "compensation.succeeded"
    COMPENSATION_FAILED = "compensation.failed"
    COMPENSATION_PARKED = "compensation.parked"
    SAGA_COMPLETED = "saga.completed"
    SAGA_COMPENSATED = "saga.compensated"
    SAGA_FAILED = "saga.failed"
    OPERATOR_RETRY = "operator.retry"
    OPERATOR_COMPENSATE = "operator.compensate"
    DEAD_LETTER_REPLAYED = "dead_letter.replayed"
    DEAD_LETTER_DISCARDED = "dead_letter.discarded"
    STEP_HELD = "step.held"
    STEP_RELEASED = "step.released"
    OPERATOR_BULK = "operator.bulk"

    @classmethod
    def saga_final(cls, state: SagaState) -> TimelineEvent:
        return cls(f"saga.{state.value}")


class UnknownName(LookupError):
    """A service, command or definition that the registry does not hold."""


class RegistryError(RuntimeError):
    """The registry does not hold together (a process built on it must not start)."""


@dataclass(frozen=True)
class Service:
    """A participant service: one queue (its name) and one worker process."""

    name: str
    module: str  # the worker's Celery app module (``celery -A <module> worker -Q <name>``)

    @property
    def queue(self) -> str:
        return self.name


@dataclass(frozen=True)
class Command:
    """A command a saga sends: ``<service>.<verb>``, with the payload model both ends validate."""

    name: str
    payload: type[BaseModel]

    @property
    def service(self) -> str:
        return self.name.split(".", 1)[0]


PayloadBuilder = Callable[[str, dict[str, Any], Any, Reason | None], "BaseModel"]
StateHook = Callable[["Session", "Saga", SagaState, SagaState], None]


@dataclass(frozen=True)
class Registered:
    """One version of a saga definition with what the kernel needs to run it.

    ``build_payload(command, context, retry, reason)``: a command's payload from the saga context.
    ``on_state(session, saga, new_state, old_state)``: the business side of a saga's state change, in the
    transition's transaction. ``outcomes``: the business status that goes with each final state
    (the audit's invariant 4). ``lock_file``: where this definition's released fingerprints live.
    """

    definition: SagaDefinition
    build_payload: PayloadBuilder
    lock_file: Path
    on_state: StateHook | None = None
    outcomes: dict[SagaState, tuple[str, ...]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def version(self) -> int:
        return self.definition.version


@dataclass
class Registry:
    services: dict[str, Service] = field(default_factory=dict)
    commands: dict[str, Command] = field(default_factory=dict)
    definitions: dict[tuple[str, int], Registered] = field(default_factory=dict)

    # ---------------------------------------------------------------- declaring

    def add_service(self, name: str, module: str) -> None:
        new = Service(name, module)
        if self.services.setdefault(name, new) != new:
            raise RegistryError(f"service {name!r} declared twice, differently")

    def add_saga(
        self,
        registered: Registered,
        payloads: Mapping[str, type[BaseModel]],
        default: type[BaseModel],
    ) -> None:
        """A definition version, and its commands (``payloads``, else ``default``)."""
        key = registered.definition.key
        if key in self.definitions:
            raise RegistryError(f"definition {key[0]} v{key[1]} registered twice")
        self.definitions[key] = registered
        for name in sorted(registered.definition.commands):
            command = Command(name, payloads.get(name, default))
            if self.commands.setdefault(name, command) != command:
                raise RegistryError(f"command {name!r} declared with two payload models")

    # ---------------------------------------------------------------- reading

    def service(self, name: str) -> Service:
        try:
            return self.services[name]
        except KeyError:
            known = ", ".join(self.services)
            raise UnknownName(f"unknown service {name!r} (known: {known})") from None

    def command(self, name: str) -> Command:
        try:
            return self.commands[name]
        except KeyError:
            raise UnknownName(f"unknown command {name!r}") from None

    def get(self, name: str, version: int) -> Registered:
        try:
            return self.definitions[(name, version)]
        except KeyError:
            raise UnknownName(
                f"definition {name} v{version} is not registered (sagas of it are in flight: "
                "keep that version registered until none is)"
            ) from None

    def latest(self, name: str) -> Registered:
        versions = [v for (n, v) in self.definitions if n == name]
        if not versions:
            raise UnknownName(f"unknown saga definition {name!r}")
        return self.definitions[(name, max(versions))]

    @property
    def names(self) -> list[str]:
        return sorted({n for n, _ in self.definitions})

    def queue_for(self, task: str) -> str:
        """The queue a task is sent to: its service's, or the orchestrator's for ``saga.*``."""
        if task in ORCHESTRATOR_TASKS:
            return ORCHESTRATOR_QUEUE
        return self.service(self.command(task).service).queue

    def commands_of(self, service: str) -> list[str]:
        return sorted(c.name for c in self.commands.values() if c.service == service)

    @property
    def worker_names(self) -> list[str]:
        """What ``sagactl worker <name>`` accepts: the orchestrator and every service."""
        return [ORCHESTRATOR, *self.services]

    def validate(self) -> None:
        for command in self.commands.values():
            if command.service not in self.services:
                raise RegistryError(
                    f"command {command.name!r} names service {command.service!r}, "
                    "which no registry module declares"
                )


def _modules() -> list[str]:
    from orchestrator.ops.config import settings

    extra = settings().registry_modules
    return [*BUILTIN, *(m for m in extra if m not in BUILTIN)]


def build(modules: Iterable[str] | None = None) -> Registry:
    """A registry from ``modules`` (default: the built-in ones and ``SAGA_REGISTRY_MODULES``)."""
    registry = Registry()
    for name in modules if modules is not None else _modules():
        module = importlib.import_module(name)
        register = getattr(module, "register", None)
        if register is None:
            raise RegistryError(f"registry module {name} has no register(registry) function")
        register(registry)
    registry.validate()
    return registry


_current: Registry | None = None


def load(*, check_lock: bool = True) -> Registry:
    """This process's registry, built once; a released definition that changed stops it here."""
    global _current
    if _current is None:
        registry = build()
        if check_lock:
            from orchestrator.kernel import versions

            versions.check(registry)
        _current = registry
    return _current


def current() -> Registry:
    return load()


def reset() -> None:
    """Forget the built registry (tests that change ``SAGA_REGISTRY_MODULES``)."""
    from orchestrator.ops.config import settings

    global _current
    _current = None
    settings.cache_clear()
