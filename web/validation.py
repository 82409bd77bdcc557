"""Strict validation of an order request, with errors that name the offending field."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Collection
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, ValidationError

from orchestrator import registry
from orchestrator.messaging.envelopes import FAULT
from orchestrator.sagas.order import ORDER_SAGA
from orchestrator.sagas.returns import RETURN_SAGA

RETURN_SAGA_NAME = RETURN_SAGA.name

MAX_LINES = 50
TOKEN = re.compile(r"tok_[A-Za-z0-9_]{1,64}")
# Matched with fullmatch: "$" alone would let a trailing newline through.
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def _printable(value: str) -> str:
    """No control characters, no lone surrogates; format characters (RTL marks, ZWJ) are fine."""
    for ch in value:
        if unicodedata.category(ch) in ("Cc", "Cs"):
            raise ValueError("must not contain control characters or lone surrogates")
    return value


def _token(value: str) -> str:
    if not TOKEN.fullmatch(value):  # .match with "$" would let "tok_visa\n" through
        raise ValueError("must look like tok_ followed by 1 to 64 letters, digits or underscores")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ItemIn(_Strict):
    sku: Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_printable)]
    quantity: Annotated[StrictInt, Field(ge=1, le=1000)]


class PaymentIn(_Strict):
    card_token: Annotated[str, AfterValidator(_token)]


class OrderIn(_Strict):
    customer_id: Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_printable)]
    items: Annotated[list[ItemIn], Field(min_length=1, max_length=MAX_LINES)]
    payment: PaymentIn
    faults: dict[str, str] | None = None


class ReturnIn(_Strict):
    """POST /orders/<id>/return: an optional reason (the rule of customer_id, up to 200)."""

    reason: Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_printable)] | None = (
        None
    )
    faults: dict[str, str] | None = None


class InvalidOrder(Exception):
    def __init__(self, details: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{d['field']}: {d['message']}" for d in details))
        self.details = details


def _field_name(loc: tuple[Any, ...]) -> str:
    name = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if i else str(part)
    return name if loc else "body"


SkuLookup = Callable[[list[str]], Collection[str]]


def parse_order(
    data: Any, *, fault_injection: bool, known_skus: Collection[str] | SkuLookup | None = None
) -> OrderIn:
    """Validate shape and values; ``known_skus`` (a set, or a lookup called with the validated
    skus only, so no unchecked text reaches the database) checks the catalogue too."""
    if not isinstance(data, dict):
        raise InvalidOrder([{"field": "body", "message": "must be a JSON object"}])
    try:
        order = OrderIn.model_validate(data)
    except ValidationError as exc:
        raise InvalidOrder([
            {"field": _field_name(err["loc"]), "message": err["msg"]} for err in exc.errors()
        ]) from exc
    problems: list[dict[str, str]] = []
    if callable(known_skus):
        known_skus = known_skus([item.sku for item in order.items])
    seen: set[str] = set()
    for i, item in enumerate(order.items):
        if item.sku in seen:
            problems.append({"field": f"items[{i}].sku", "message": "appears more than once"})
        seen.add(item.sku)
        if known_skus is not None and item.sku not in known_skus:
            problems.append({"field": f"items[{i}].sku", "message": "unknown product"})
    if "faults" in data:
        problems += _fault_problems(order.faults, ORDER_SAGA.name, fault_injection)
    if problems:
        raise InvalidOrder(problems)
    return order


def _fault_problems(
    faults: dict[str, str] | None, definition: str, fault_injection: bool
) -> list[dict[str, str]]:
    """Faults name a step or compensation of the saga (its latest version), and a known fault."""
    if not fault_injection:
        return [{"field": "faults", "message": "fault injection is off"}]
    commands = registry.current().latest(definition).definition.commands
    problems = []
    for name, fault in (faults or {}).items():
        if name not in commands:
            problems.append({"field": f"faults.{name}", "message": "not a step or compensation"})
        elif not FAULT.fullmatch(fault):  # not .match: "$" passes "crash\n"
            problems.append({"field": f"faults.{name}", "message": "unknown fault"})
    return problems


def parse_return(data: Any, *, fault_injection: bool) -> ReturnIn:
    if not isinstance(data, dict):
        raise InvalidOrder([{"field": "body", "message": "must be a JSON object"}])
    try:
        wanted = ReturnIn.model_validate(data)
    except ValidationError as exc:
        raise InvalidOrder([
            {"field": _field_name(err["loc"]), "message": err["msg"]} for err in exc.errors()
        ]) from exc
    if "faults" in data:
        problems = _fault_problems(wanted.faults, RETURN_SAGA_NAME, fault_injection)
        if problems:
            raise InvalidOrder(problems)
    return wanted


def fingerprint(data: Any) -> str:
    """The same JSON value gives the same fingerprint, whatever its key order or spacing."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()
