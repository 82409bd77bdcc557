"""Strict validation of an order request, with errors that name the offending field."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Collection
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from orchestrator.messaging.envelopes import FAULT
from orchestrator.sagas.order import ORDER_SAGA
from web.http import TooLongNumber
from web.schemas import OrderIn

# Matched with fullmatch: "$" alone would let a trailing newline through.
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


class Invalid(Exception):
    """A body or query that fails its model: ``details`` name each field and what is wrong."""

    def __init__(self, details: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{d['field']}: {d['message']}" for d in details))
        self.details = details


InvalidOrder = Invalid


def _field_name(loc: tuple[Any, ...]) -> str:
    name = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if i else str(part)
    return name if loc else "body"


def _message(err: Any) -> str:
    if isinstance(err.get("input"), TooLongNumber):
        return "a number far too long to be a valid value"
    return str(err["msg"])


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: Any) -> M:
    """``model`` from decoded JSON or form fields, or Invalid naming every wrong field."""
    if not isinstance(data, dict):
        raise Invalid([{"field": "body", "message": "must be a JSON object"}])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Invalid(
            [{"field": _field_name(err["loc"]), "message": _message(err)} for err in exc.errors()]
        ) from exc


SkuLookup = Callable[[list[str]], Collection[str]]


def parse_order(
    data: Any, *, fault_injection: bool, known_skus: Collection[str] | SkuLookup | None = None
) -> OrderIn:
    """Validate shape and values; ``known_skus`` (a set, or a lookup called with the validated
    skus only, so no unchecked text reaches the database) checks the catalogue too."""
    order = validate(OrderIn, data)
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
        if not fault_injection:
            problems.append({"field": "faults", "message": "fault injection is off"})
        else:
            for name, fault in (order.faults or {}).items():
                if name not in ORDER_SAGA.commands:
                    problems.append(
                        {"field": f"faults.{name}", "message": "not a step or compensation"}
                    )
                elif not FAULT.fullmatch(fault):  # not .match: "$" passes "crash\n"
                    problems.append({"field": f"faults.{name}", "message": "unknown fault"})
    if problems:
        raise Invalid(problems)
    return order


def fingerprint(data: Any) -> str:
    """The same JSON value gives the same fingerprint, whatever its key order or spacing."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()
