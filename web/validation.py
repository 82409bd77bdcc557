"""Strict validation of an order request, with errors that name the offending field."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Collection
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from orchestrator import queries, registry
from orchestrator.messaging.envelopes import FAULT
from orchestrator.sagas.order import ORDER_SAGA
from orchestrator.sagas.returns import RETURN_SAGA
from web.http import TooLongNumber
from web.schemas import BulkIn, OrderIn, ReturnIn, SagaFilterFields

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
        problems += _fault_problems(order.faults, ORDER_SAGA.name, fault_injection)
    if problems:
        raise Invalid(problems)
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
    """POST /orders/<id>/return: an optional reason; faults name the return saga's steps."""
    wanted = validate(ReturnIn, data)
    if "faults" in data:
        problems = _fault_problems(wanted.faults, RETURN_SAGA.name, fault_injection)
        if problems:
            raise Invalid(problems)
    return wanted


def fingerprint(data: Any) -> str:
    """The same JSON value gives the same fingerprint, whatever its key order or spacing."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


FILTER_FIELDS = (
    "state", "reason", "step", "definition", "created_after", "created_before"
)  # fmt: skip


def step_names() -> list[str]:
    """Every step name of every registered definition (what a saga's current step can be)."""
    reg = registry.current()
    return sorted({s.name for r in reg.definitions.values() for s in r.definition.steps})


def filter_problems(wanted: SagaFilterFields, prefix: str = "") -> list[dict[str, str]]:
    """What the registry knows and the model cannot: the definition and the step exist."""
    reg = registry.current()
    problems = []
    if wanted.definition is not None and wanted.definition not in reg.names:
        known = ", ".join(reg.names)
        problems.append(
            {"field": f"{prefix}definition", "message": f"unknown definition (known: {known})"}
        )
    if wanted.step is not None and wanted.step not in step_names():
        problems.append(
            {"field": f"{prefix}step", "message": "not a step of any saga definition"}
        )
    return problems


def parse_bulk(data: Any) -> BulkIn:
    """POST /admin/sagas/bulk's body; a filter's definition and step are checked as well."""
    body = validate(BulkIn, data)
    if body.filter is not None:
        problems = filter_problems(body.filter, "filter.")
        if problems:
            raise Invalid(problems)
    return body


def saga_filter(
    fields: SagaFilterFields, q: str | None = None, held: bool | None = None
) -> queries.SagaFilter:
    """The read side's filter from validated fields (the list's query or a bulk filter; the list
    alone has ``q`` and ``held``)."""
    fields_of = {name: getattr(fields, name) for name in FILTER_FIELDS}
    return queries.SagaFilter(**fields_of, q=q, held=held)
