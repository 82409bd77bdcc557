"""The HTTP contract as pydantic models: every request and response body, the source of
/openapi.json (web/openapi.py). Validation and the published schema carry the same limits.

Input models are strict (no coercion, no unknown field). Output models are closed too, so a
field added to a view and not here fails the tests instead of drifting from the description.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    Strict,
    StrictInt,
    WithJsonSchema,
    model_validator,
)

from models.enums import (
    CompensationStatus,
    DeadLetterState,
    OrderStatus,
    Reason,
    SagaState,
    StepStatus,
)
from orchestrator.ops.masking import TOKEN_PATTERN, mask_text
from orchestrator.registry import TimelineEvent

MAX_LINES = 50
MAX_QUANTITY = 1000
MAX_NOTE = 500
MAX_BULK = 200
PAGE_SIZE = 50
# A dead letter id is a PostgreSQL bigint: anything outside cannot exist (404, not a 500).
MAX_BIGINT = 2**63 - 1

# ---------------------------------------------------------------- text rules

# Format characters that real text needs: joiners (emoji ZWJ sequences, Indic scripts) and the
# directional marks (which, unlike overrides and isolates, cannot reorder the text around them).
_ALLOWED_FORMAT = frozenset("\u200c\u200d\u200e\u200f\u061c")
# Tag characters only inside an emoji tag sequence (a subdivision flag such as England's).
_EMOJI_TAG_SEQUENCE = re.compile("\U0001f3f4[\U000e0020-\U000e007e]+\U000e007f")
_REFUSED_CATEGORIES = {
    "Cc": "a control character",
    "Cs": "a lone surrogate",
    "Co": "a private-use character",
    "Cn": "an unassigned character or noncharacter",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
}
_BIDI_CONTROLS = frozenset(map(chr, [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]))
_VISIBLE_CATEGORIES = ("L", "N", "P", "S")  # letters, digits, punctuation, symbols


def _codepoint(ch: str) -> str:
    return f"U+{ord(ch):04X}"


def _format_character(ch: str) -> str:
    if ch in _BIDI_CONTROLS:
        return "a bidirectional override, embedding or isolate"
    if ch == "\ufeff":
        return "a byte order mark"
    return "an invisible format character"


def check_visible_text(value: str) -> str:
    """The contract's rule for text people read (customer ids, return reasons): at least one
    visible character; no control, surrogate, private-use, unassigned, line or paragraph
    separator, bidirectional control, BOM or other invisible format character, except the
    joiners and marks real text needs and tags inside an emoji tag sequence."""
    in_tag_sequence = {
        i for m in _EMOJI_TAG_SEQUENCE.finditer(value) for i in range(m.start(), m.end())
    }
    for i, ch in enumerate(value):
        category = unicodedata.category(ch)
        if category in _REFUSED_CATEGORIES:
            raise ValueError(f"must not contain {_REFUSED_CATEGORIES[category]} ({_codepoint(ch)})")
        if category == "Cf" and ch not in _ALLOWED_FORMAT and i not in in_tag_sequence:
            raise ValueError(f"must not contain {_format_character(ch)} ({_codepoint(ch)})")
    if not any(unicodedata.category(ch)[0] in _VISIBLE_CATEGORIES for ch in value):
        raise ValueError(
            "must contain at least one visible character (letter, digit, punctuation or symbol)"
        )
    return value


def check_no_controls(value: str) -> str:
    """No control characters (newline and tab included: a note is one line) and no lone
    surrogates (which no database or log can store)."""
    for ch in value:
        category = unicodedata.category(ch)
        if category in ("Cc", "Cs"):
            raise ValueError(f"must not contain {_REFUSED_CATEGORIES[category]} ({_codepoint(ch)})")
    return value


VISIBLE_RULE = (
    "at least one visible character (letter, digit, punctuation, symbol); no control, "
    "surrogate, private-use or unassigned character, no line or paragraph separator, no "
    "bidirectional override/embedding/isolate (U+202A-U+202E, U+2066-U+2069), no U+FEFF; "
    "U+200C, U+200D, U+200E, U+200F, U+061C and emoji sequences are accepted"
)

# Reusable: ``Annotated[VisibleText, Field(min_length=..., max_length=...)]`` (a return reason
# is ``Annotated[VisibleText, Field(max_length=200)]``).
VisibleText = Annotated[str, AfterValidator(check_visible_text), Field(description=VISIBLE_RULE)]
CustomerId = Annotated[VisibleText, Field(min_length=1, max_length=64)]
ReturnReason = Annotated[VisibleText, Field(min_length=1, max_length=200)]
Sku = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(check_no_controls)]
CardToken = Annotated[str, Field(pattern=f"^{TOKEN_PATTERN}$")]
Quantity = Annotated[StrictInt, Field(ge=1, le=MAX_QUANTITY)]


def _blank_is_none(value: Any) -> Any:
    return None if value == "" else value


Note = Annotated[
    str,
    Field(max_length=MAX_NOTE, description="one line: no control characters, no surrogates"),
    AfterValidator(check_no_controls),
]
OptionalNote = Annotated[Note | None, BeforeValidator(_blank_is_none)]

# ---------------------------------------------------------------- requests


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ItemIn(_In):
    sku: Sku
    quantity: Quantity


class PaymentIn(_In):
    card_token: CardToken


class OrderIn(_In):
    customer_id: CustomerId
    items: Annotated[list[ItemIn], Field(min_length=1, max_length=MAX_LINES)]
    payment: PaymentIn
    faults: (
        Annotated[
            dict[str, str],
            Field(
                description="only when SAGA_FAULT_INJECTION=1: step or compensation name -> "
                "transient:N | always | fail | crash | hang:S"
            ),
        ]
        | None
    ) = None


class ReturnIn(_In):
    """The body of POST /orders/<order_id>/return (it may be empty)."""

    reason: ReturnReason | None = None
    faults: (
        Annotated[
            dict[str, str],
            Field(
                description="only when SAGA_FAULT_INJECTION=1: a return step or compensation "
                "name -> transient:N | always | fail | crash | hang:S"
            ),
        ]
        | None
    ) = None


def _iso_time(value: Any) -> Any:
    """ISO 8601 text (a query string and JSON have no other date), UTC when it names no zone;
    not a number (pydantic's lax mode would read one as a Unix time)."""
    if value is None or isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 date-time, as text")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("must be an ISO 8601 date-time, e.g. 2026-12-01T10:02:00Z") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


SagaStateOrStuck = Literal["stuck", "running", "compensating", "completed", "compensated", "failed"]
FilterTime = Annotated[datetime, BeforeValidator(_iso_time)]
StepName = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(check_no_controls)]
DefinitionName = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(check_no_controls)]


class SagaFilterFields(_In):
    """What selects sagas, the same in the admin list's query and in a bulk filter."""

    state: Annotated[SagaStateOrStuck | None, BeforeValidator(_blank_is_none)] = None
    reason: Annotated[
        Reason | None,
        Strict(False),  # its value as text
        BeforeValidator(_blank_is_none),
        Field(description="why the saga turned back (the order's reason)"),
    ] = None
    step: Annotated[
        StepName | None,
        BeforeValidator(_blank_is_none),
        Field(description="the name of the saga's current step"),
    ] = None
    definition: Annotated[
        DefinitionName | None,
        BeforeValidator(_blank_is_none),
        Field(description="a saga definition's name (order, return, ...)"),
    ] = None
    created_after: Annotated[
        FilterTime | None,
        BeforeValidator(_blank_is_none),
        Field(description="created at or after (ISO 8601; without a zone: UTC)"),
    ] = None
    created_before: Annotated[
        FilterTime | None,
        BeforeValidator(_blank_is_none),
        Field(description="created before (ISO 8601; without a zone: UTC)"),
    ] = None

    @model_validator(mode="after")
    def _a_time_range(self) -> SagaFilterFields:
        after, before = self.created_after, self.created_before
        if after and before and after >= before:
            raise ValueError("created_after must be earlier than created_before")
        return self


class BulkFilter(SagaFilterFields):
    """Selects the sagas the admin list would show with the same fields; at least one."""

    @model_validator(mode="after")
    def _not_everything(self) -> BulkFilter:
        if not self.model_dump(exclude_none=True):
            raise ValueError("a filter needs at least one field (it would select every saga)")
        return self


class ActionIn(_In):
    """The body of POST /admin/sagas/<id>/retry and /compensate."""

    note: OptionalNote = None


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)  # null is no array: the description says "absent" instead


class BulkIn(_In):
    """POST /admin/sagas/bulk: the sagas by id (each answers at once), or by ``filter`` (a
    recorded operation that acts at a bounded rate, or with ``dry_run`` only counts them)."""

    action: Literal["retry", "compensate"]
    # Described as the array it is when sent (absent when a filter is): the limits stay visible.
    saga_ids: Annotated[
        Annotated[list[str], Field(min_length=1, max_length=MAX_BULK)] | None,
        WithJsonSchema(
            {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_BULK}
        ),
        Field(json_schema_extra=_no_default),
    ] = None
    filter: BulkFilter | None = None
    dry_run: Annotated[
        bool, Field(description="with a filter: count and sample the sagas, act on none")
    ] = False
    note: OptionalNote = None

    @model_validator(mode="after")
    def _ids_or_filter(self) -> BulkIn:
        if (self.saga_ids is None) == (self.filter is None):
            raise ValueError("send exactly one of saga_ids and filter")
        if self.dry_run and self.filter is None:
            raise ValueError("dry_run goes with a filter")
        return self


class ServicePauseIn(_In):
    """The body of POST /admin/services/<service>/pause."""

    note: OptionalNote = None
    hold_compensations: Annotated[
        bool, Field(description="false: compensations still go through while paused")
    ] = True


class ServiceResumeIn(_In):
    """The body of POST /admin/services/<service>/resume."""

    note: OptionalNote = None


class LetterActionIn(_In):
    """POST /admin/dead-letters/<id>/replay and /discard take no field."""


LetterId = Annotated[int, Field(ge=1, le=MAX_BIGINT)]


class SagaListQuery(SagaFilterFields):
    """GET /admin/sagas's query; ``q`` is free text (an id that matches nothing finds nothing)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    q: Annotated[str | None, Field(description="an order id or a saga id")] = None
    cursor: Annotated[
        str | None,
        BeforeValidator(_blank_is_none),
        Field(description="`next` of the previous page"),
    ] = None
    held: Annotated[
        Literal["true", "false"] | None,
        BeforeValidator(_blank_is_none),
        Field(description="true: only sagas held by a paused service; false: none of them"),
    ] = None


# ---------------------------------------------------------------- responses


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)


def _iso(value: datetime) -> str:
    return value.isoformat()


# Timestamps keep the exact text the read side writes (isoformat, "+00:00").
Timestamp = Annotated[
    datetime,
    PlainSerializer(_iso, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
# Text from the system or an operator: card tokens masked wherever it is shown.
Masked = Annotated[str, AfterValidator(mask_text)]

EVENT_NAMES = tuple(e.value for e in TimelineEvent)
EventName = Literal[EVENT_NAMES]  # type: ignore[valid-type]
# Events whose detail (an operator's note, a dead letter's story) is for the admin pages only.
PRIVATE_DETAIL = ("operator.", "dead_letter.", "step.held", "step.released")


class Placed(_Out):
    order_id: uuid.UUID
    saga_id: uuid.UUID
    status: OrderStatus


class CompensationOut(_Out):
    name: str
    status: CompensationStatus
    attempts: int
    error: Masked | None
    started_at: Timestamp | None
    finished_at: Timestamp | None


class StepOut(_Out):
    name: str
    status: StepStatus
    attempts: int
    started_at: Timestamp | None
    finished_at: Timestamp | None
    error: Masked | None
    deadline_at: Timestamp | None
    compensation: CompensationOut | None


class PublicEvent(_Out):
    """A timeline entry as the shop shows it: no actor, no operator or dead-letter detail."""

    at: Timestamp
    event: EventName
    step: str | None
    attempt: int | None
    detail: Masked | None

    @classmethod
    def of(cls, event: dict[str, Any]) -> PublicEvent:
        private = event["event"].startswith(PRIVATE_DETAIL)
        return cls(
            at=event["at"],
            event=event["event"],
            step=event["step"],
            attempt=event["attempt"],
            detail=None if private else event["detail"],
        )


class AdminEvent(_Out):
    at: Timestamp
    event: EventName
    step: str | None
    attempt: int | None
    detail: Masked | None
    actor: str | None


class PublicSaga(_Out):
    saga_id: uuid.UUID
    state: SagaState
    stuck: bool
    definition: str
    definition_version: Annotated[int, Field(ge=1)]
    steps: list[StepOut]
    timeline: Annotated[list[PublicEvent], Field(description="oldest first")]


class LineOut(_Out):
    sku: str
    quantity: int
    price_cents: int


class OrderOut(_Out):
    order_id: uuid.UUID
    customer_id: str
    status: OrderStatus
    reason: Reason | None
    total_cents: int
    card_last4: Annotated[str, Field(max_length=4)]
    created_at: Timestamp
    items: list[LineOut]
    saga: PublicSaga
    returns: Annotated[
        list[PublicSaga], Field(description="the order's return sagas, oldest first")
    ]

    @classmethod
    def of(cls, view: dict[str, Any]) -> OrderOut:
        """The read side's view of an order, as the public may see it."""

        def public(saga: dict[str, Any]) -> dict[str, Any]:
            return {**saga, "timeline": [PublicEvent.of(e) for e in saga["timeline"]]}

        return cls.model_validate(
            {**view, "saga": public(view["saga"]), "returns": [public(r) for r in view["returns"]]}
        )


class ProductOut(_Out):
    sku: str
    name: str
    price_cents: int
    available: int
    reserved: int
    sold: int


class SagaSummary(_Out):
    saga_id: uuid.UUID
    order_id: Annotated[str, Field(description="the saga's business key: the order id")]
    definition: str
    definition_version: Annotated[int, Field(ge=1)]
    state: SagaState
    stuck: bool
    held: Annotated[bool, Field(description="its command waits for a paused service")]
    current_step: str
    reason: Reason | None
    created_at: Timestamp
    updated_at: Timestamp


class Counts(_Out):
    running: int
    compensating: int
    completed: int
    compensated: int
    failed: int
    stuck: int


class SagaList(_Out):
    sagas: Annotated[list[SagaSummary], Field(max_length=PAGE_SIZE)]
    counts: Counts
    next: Annotated[str | None, Field(description="the cursor of the next (older) page")]


class SagaDetail(_Out):
    saga_id: uuid.UUID
    state: SagaState
    stuck: bool
    definition: str
    definition_version: Annotated[int, Field(ge=1)]
    steps: list[StepOut]
    timeline: Annotated[list[AdminEvent], Field(description="oldest first")]
    order_id: Annotated[str, Field(description="the saga's business key: the order id")]
    order_status: OrderStatus | None
    customer_id: str | None
    reason: Reason | None
    created_at: Timestamp
    updated_at: Timestamp
    current_step: str


class ActionResult(_Out):
    saga_id: uuid.UUID
    state: SagaState


ServiceStateName = Literal["running", "paused", "breaker_open", "half_open"]


class ServiceActionResult(_Out):
    service: str
    state: ServiceStateName


class ServiceOut(_Out):
    service: str
    state: ServiceStateName
    since: Annotated[Timestamp | None, Field(description="null: running since ever")]
    by: Annotated[str | None, Field(description="the operator, or `breaker`")]
    note: str | None
    hold_compensations: bool
    held: Annotated[int, Field(ge=0, description="commands held for the service")]
    calls: Annotated[int, Field(ge=0, description="replies within the breaker's window")]
    failure_rate: Annotated[
        float, Field(ge=0, le=1, description="share of transient failures in that window")
    ]
    consumers: Annotated[int | None, Field(description="on its queue; null: broker not reached")]


class ServiceList(_Out):
    services: list[ServiceOut]


class BulkItemResult(_Out):
    saga_id: Annotated[str, Field(description="as sent")]
    status: Literal[202, 404, 409]


class BulkResult(_Out):
    results: Annotated[list[BulkItemResult], Field(description="one per saga id, in order")]


SAMPLE_SIZE = 10


class BulkPreview(_Out):
    """A dry run by filter: how many sagas a real run would act on; nothing acted."""

    count: int
    sample: Annotated[
        list[uuid.UUID],
        Field(max_length=SAMPLE_SIZE, description="the first ids, newest first (as the list)"),
    ]


class OperationAccepted(_Out):
    operation_id: uuid.UUID


class OperationFilter(_Out):
    """The filter an operation ran with, as it was validated."""

    state: SagaStateOrStuck | None = None
    reason: Reason | None = None
    step: str | None = None
    definition: str | None = None
    created_after: Timestamp | None = None
    created_before: Timestamp | None = None


class OperationSummary(_Out):
    operation_id: uuid.UUID
    action: Literal["retry", "compensate"]
    actor: str
    note: Masked | None
    filter: OperationFilter
    state: Annotated[
        Literal["pending", "running", "done"],
        Field(description="pending: no saga acted on yet; done: every saga has its result"),
    ]
    total: Annotated[int, Field(description="sagas the filter matched when it was sent")]
    done: Annotated[int, Field(description="sagas acted on so far")]
    results: Annotated[
        dict[str, int], Field(description="sagas per result so far: '202', '404', '409'")
    ]
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None


class OperationList(_Out):
    operations: Annotated[list[OperationSummary], Field(description="newest first")]


class OperationItemOut(_Out):
    saga_id: uuid.UUID
    status: Annotated[
        Literal[202, 404, 409] | None,
        Field(description="as one by one (202 acted, 409 did not apply, 404 gone); null: pending"),
    ]
    state: Annotated[SagaState | None, Field(description="the saga's state after the action")]
    at: Annotated[Timestamp | None, Field(description="when the operation acted on it")]


class OperationDetail(OperationSummary):
    items: Annotated[list[OperationItemOut], Field(description="one per saga, in the order acted on")]


class DeadLetterOut(_Out):
    id: int
    saga_id: uuid.UUID | None
    step: str | None
    queue: str
    reason: Masked
    at: Timestamp
    state: DeadLetterState
    body: Annotated[Masked, Field(description="the message as text, card tokens masked")]


class DeadLetterList(_Out):
    dead_letters: list[DeadLetterOut]


class LetterActionResult(_Out):
    id: int
    state: Literal["replayed", "discarded"]


class Health(_Out):
    database: Literal["ok", "down"]
    broker: Literal["ok", "down"]


class FieldError(_Out):
    field: str
    message: str


class ErrorDetail(_Out):
    code: Annotated[str, Field(description="machine-readable, e.g. validation_failed")]
    message: str
    details: Annotated[
        Any, Field(description="for 422: a list of {field, message}; otherwise usually null")
    ]


class Error(_Out):
    """Every JSON error has this shape."""

    error: ErrorDetail


def dump(model: BaseModel) -> dict[str, Any]:
    """A response model as JSON-ready data (enums as values, timestamps as ISO text)."""
    return model.model_dump(mode="json")
