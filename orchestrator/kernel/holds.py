"""Is this command held? The one answer every dispatch point asks for (docs/architecture.md).

A command is held while its service is paused by an operator, or by its circuit breaker
(``breaker_open``, ``half_open``), unless it is a compensation and the pause lets compensations
through. The engine asks when it dispatches (a held command becomes an outbox row marked held,
which the fast path, the relay and the sweeper never send) and the participant asks when an
attempt failed transiently (it answers "held" instead of retrying on its own).

Imports only models and the session: the participants share it without importing the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.orm import Session

from models.services import RUNNING, ServiceState

Kind = Literal["action", "compensation"]
_CACHE_KEY = "holds.states"


@dataclass(frozen=True)
class Hold:
    """Why a service's commands wait: its state and who put it there."""

    service: str
    state: str
    by: str | None
    note: str | None
    hold_compensations: bool

    def holds(self, kind: Kind) -> bool:
        """The rule itself."""
        return self.state != RUNNING and (kind == "action" or self.hold_compensations)

    def describe(self) -> str:
        who = f" by {self.by}" if self.by else ""
        note = f": {self.note}" if self.note else ""
        return f"{self.service} {self.state.replace('_', ' ')}{who}{note}"


def service_of(command: str) -> str:
    """A command is ``<service>.<verb>`` (registry.Command.service)."""
    return command.split(".", 1)[0]


def kind_of(command_type: str, step: str) -> Kind:
    """What a participant can tell from an envelope: a step's action carries the step's name."""
    return "action" if command_type == step else "compensation"


def not_running(session: Session) -> dict[str, Hold]:
    """Services that are not running, read once per transaction (a tiny table; no row: running)."""
    cached: dict[str, Hold] | None = session.info.get(_CACHE_KEY)
    if cached is None:
        rows = session.scalars(sa.select(ServiceState).where(ServiceState.state != RUNNING))
        cached = {
            row.service: Hold(row.service, row.state, row.by, row.note, row.hold_compensations)
            for row in rows
        }
        session.info[_CACHE_KEY] = cached
    return cached


def forget(session: Session) -> None:
    """A new transaction reads the states again (and a pause of this one is seen at once)."""
    session.info.pop(_CACHE_KEY, None)


def held(session: Session, command: str, kind: Kind) -> Hold | None:
    """The hold on ``command`` now, or None when it may be sent."""
    hold = not_running(session).get(service_of(command))
    return hold if hold is not None and hold.holds(kind) else None


@sa.event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    forget(session)


@sa.event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    forget(session)
