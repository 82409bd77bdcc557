"""Is this command held? The one answer every dispatch point asks for (docs/architecture.md).

A command is held while its service is paused by an operator, or by its circuit breaker
(``breaker_open``, ``half_open``), unless it is a compensation and the pause lets compensations
through. The engine asks when it dispatches (a held command becomes an outbox row marked held,
which the fast path, the batch publish, the relay and the sweeper never send), the web's
one-statement order asks through ``seen`` (its guard checks what the process last read), and the
participant asks when an attempt failed transiently (it answers "held" instead of retrying).

Imports only models and the session: the participants share it without importing the engine.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

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


Holding = Mapping[str, Hold]  # the services that are not running, by name


def service_of(command: str) -> str:
    """A command is ``<service>.<verb>`` (registry.Command.service)."""
    return command.split(".", 1)[0]


def kind_of(command_type: str, step: str) -> Kind:
    """What a participant can tell from an envelope: a step's action carries the step's name."""
    return "action" if command_type == step else "compensation"


_NOT_RUNNING = sa.select(
    ServiceState.service,
    ServiceState.state,
    ServiceState.by,
    ServiceState.note,
    ServiceState.hold_compensations,
).where(ServiceState.state != RUNNING)


def _read(conn: Any) -> dict[str, Hold]:
    return {row.service: Hold(*row) for row in conn.execute(_NOT_RUNNING)}


def not_running(session: Session) -> dict[str, Hold]:
    """Services that are not running, read once per transaction (a tiny table; no row: running).
    Every transaction of this project is a Session of its own (models/db.py), so the cache in
    ``session.info`` ends with it; a change of state in the transaction itself calls ``forget``."""
    cached: dict[str, Hold] | None = session.info.get(_CACHE_KEY)
    if cached is None:
        cached = _read(session.connection())  # no autoflush: the states are not the batch's rows
        session.info[_CACHE_KEY] = cached
    return cached


def forget(session: Session) -> None:
    """This transaction changed a state: its next dispatches read them again."""
    session.info.pop(_CACHE_KEY, None)


def hold_in(holding: Holding, command: str, kind: Kind) -> Hold | None:
    """The hold on ``command`` given the services not running, or None when it may be sent."""
    hold = holding.get(service_of(command))
    return hold if hold is not None and hold.holds(kind) else None


def held(session: Session, command: str, kind: Kind) -> Hold | None:
    """The hold on ``command`` now, or None when it may be sent."""
    return hold_in(not_running(session), command, kind)


# ---------------------------------------------------------------- the web's one statement

# The web's order is one statement with no read before it (orchestrator/sagas/placing.py): it
# dispatches by the states this process last read, and its guard checks, in the same statement,
# that they are still the table's; if not, it reads them again and writes again.
SEEN_GUARD = (
    "(SELECT coalesce(string_agg(service || ':' || state || ':' ||"
    " CAST(hold_compensations AS text), ',' ORDER BY service), '')"
    " FROM service_states WHERE state <> 'running') = :holds_seen"
)
_seen: dict[str, Any] = {"holding": None}
_seen_lock = threading.Lock()


def _fingerprint(holding: Holding) -> str:
    """``SEEN_GUARD``'s left side, computed from what was read."""
    return ",".join(
        f"{h.service}:{h.state}:{'true' if h.hold_compensations else 'false'}"
        for h in sorted(holding.values(), key=lambda h: h.service)
    )


def seen(conn: Any, fresh: bool = False) -> tuple[Holding, dict[str, str]]:
    """The services not running as this process last read them (``fresh``: read them now, on
    ``conn``), and the parameters of ``SEEN_GUARD`` that check them."""
    with _seen_lock:
        holding: dict[str, Hold] | None = _seen["holding"]
    if fresh or holding is None:
        holding = _read(conn)
        with _seen_lock:
            _seen["holding"] = holding
    return holding, {"holds_seen": _fingerprint(holding)}
