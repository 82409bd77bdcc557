"""Versioned message envelopes that the orchestrator and the participants both validate.

A command goes orchestrator -> participant, a reply participant -> orchestrator. Adding a field is a
compatible change (readers ignore unknown fields); anything else is a new version, and readers keep
accepting the versions still in flight (``ACCEPTED_VERSIONS``).
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.enums import Reason
from orchestrator import registry
from orchestrator.ops.masking import TOKEN_PATTERN

# The contract's injectable faults: transient:N, always, fail, crash, hang:S.
FAULT = re.compile(
    r"^(transient:(?P<n>[1-9][0-9]{0,2})|always|fail|crash|hang:(?P<s>[0-9]{1,3}(\.[0-9]+)?))$"
)


def is_valid_fault(fault: str) -> bool:
    return bool(FAULT.fullmatch(fault))


# The line a participant logs each time an injected fault strikes (chaos counts what fired).
FAULT_FIRED = re.compile(
    r"injected fault fired: (?P<fault>\S+) step=(?P<step>\S+) saga=(?P<saga>\S+)"
)


def fault_fired_line(fault: str, step: str, saga_id: uuid.UUID | str, attempt: int) -> str:
    return f"injected fault fired: {fault} step={step} saga={saga_id} attempt={attempt}"


class PoisonMessage(Exception):
    """The message can never be processed: it goes to the dead-letter queue with this reason."""


class Line(BaseModel):
    sku: str
    quantity: int = Field(ge=1, le=1000)


class RetrySpec(BaseModel):
    """The step's retry policy, carried with the command so the participant can apply it."""

    attempts: int = Field(ge=1)
    base_s: float = Field(ge=0)
    max_s: float = Field(ge=0)


class CommandPayload(BaseModel):
    """What every command carries, whatever its saga."""

    retry: RetrySpec
    # An injected fault (``SAGA_FAULT_INJECTION=1`` only), e.g. "transient:2".
    fault: str | None = Field(default=None, pattern=FAULT.pattern)

    @property
    def business_key(self) -> str | None:
        """What the command is about, for logs and headers (the order id in the shop's sagas)."""
        return None


class OrderPayload(CommandPayload):
    """A command of the shop's sagas (order, return): it is about one order."""

    order_id: uuid.UUID

    @property
    def business_key(self) -> str | None:
        return str(self.order_id)


class ReservePayload(OrderPayload):
    items: list[Line] = Field(min_length=1)


class ChargePayload(OrderPayload):
    amount_cents: int = Field(gt=0)
    card_token: str = Field(pattern=f"^{TOKEN_PATTERN}$")


class CancelPayload(OrderPayload):
    reason: Reason


# The shop's commands whose payload is more than an OrderPayload (the registry reads this).
ORDER_PAYLOADS: dict[str, type[OrderPayload]] = {
    "inventory.reserve": ReservePayload,
    "payment.charge": ChargePayload,
    "orders.cancel": CancelPayload,
}
ACCEPTED_VERSIONS = {1}
CURRENT_VERSION = 1


class ReplyOutcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # a business refusal: no retry
    RETRYING = "retrying"  # a transient error; another attempt follows after retry_in_s


class ReplyPayload(BaseModel):
    outcome: ReplyOutcome
    reason: str | None = None
    error: str | None = None
    retry_in_s: float | None = None
    # With outcome "retrying": the attempt failed while its service is paused; the participant
    # does not retry it, the orchestrator holds it again (a compatible, added field).
    held: bool = False


class Envelope(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    type: str
    version: int
    saga_id: uuid.UUID
    request_id: uuid.UUID
    step: str
    attempt: int = Field(ge=1)
    sent_at: datetime
    payload: dict[str, Any]

    @property
    def command(self) -> str:
        return self.type.removesuffix(".reply")


class Command(Envelope):
    kind: Literal["command"] = "command"

    def typed_payload(self) -> CommandPayload:
        return self._typed_payload

    @cached_property
    def _typed_payload(self) -> CommandPayload:
        # Validated once per command: a batch's preparation, log context, handler and reply all
        # ask for it (the envelope is frozen, so the answer cannot change).
        model: type[CommandPayload] = registry.current().command(self.type).payload  # type: ignore[assignment]
        return model.model_validate(self.payload)


class Reply(Envelope):
    kind: Literal["reply"] = "reply"

    @property
    def body(self) -> ReplyPayload:
        return ReplyPayload.model_validate(self.payload)


def now() -> datetime:
    return datetime.now(UTC)


def make_command(
    command: str,
    *,
    saga_id: uuid.UUID,
    request_id: uuid.UUID,
    step: str,
    attempt: int,
    payload: CommandPayload,
) -> dict[str, Any]:
    """The wire form (a JSON-able dict) of a command."""
    return {
        "type": command,
        "version": CURRENT_VERSION,
        "saga_id": str(saga_id),
        "request_id": str(request_id),
        "step": step,
        "attempt": attempt,
        "sent_at": now().isoformat(),
        "payload": payload.model_dump(mode="json", exclude_none=True),
    }


def make_reply(command: Command, attempt: int, payload: ReplyPayload) -> dict[str, Any]:
    return {
        "type": f"{command.type}.reply",
        "version": CURRENT_VERSION,
        "saga_id": str(command.saga_id),
        "request_id": str(command.request_id),
        "step": command.step,
        "attempt": attempt,
        "sent_at": now().isoformat(),
        "payload": payload.model_dump(mode="json", exclude_none=True),
    }


def _check_version(envelope: Envelope) -> None:
    if envelope.version not in ACCEPTED_VERSIONS:
        raise PoisonMessage(f"unsupported version {envelope.version} of {envelope.type}")


def parse_command(raw: Any, expected_type: str | None = None) -> Command:
    """Validate a command envelope and its payload, or raise PoisonMessage saying why."""
    try:
        cmd = Command.model_validate(raw)
        _check_version(cmd)
        if cmd.type not in registry.current().commands:
            raise PoisonMessage(f"unknown command type {cmd.type!r}")
        if expected_type and cmd.type != expected_type:
            raise PoisonMessage(f"{cmd.type!r} delivered to the {expected_type!r} task")
        cmd.typed_payload()
    except ValidationError as exc:
        raise PoisonMessage(f"invalid command: {_short(exc)}") from exc
    return cmd


def parse_reply(raw: Any) -> Reply:
    try:
        reply = Reply.model_validate(raw)
        _check_version(reply)
        if not reply.type.endswith(".reply") or reply.command not in registry.current().commands:
            raise PoisonMessage(f"unknown reply type {reply.type!r}")
        _ = reply.body
    except ValidationError as exc:
        raise PoisonMessage(f"invalid reply: {_short(exc)}") from exc
    return reply


def _short(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()[:5]
    )


def trace_headers(envelope: dict[str, Any]) -> dict[str, str]:
    """Ids that travel as message headers too, for logs and tracing without decoding the body."""
    payload = envelope.get("payload") or {}
    headers = {"saga_id": str(envelope["saga_id"]), "request_id": str(envelope["request_id"])}
    if payload.get("order_id"):
        headers["order_id"] = str(payload["order_id"])
    return headers
