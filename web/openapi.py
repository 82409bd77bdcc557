"""The OpenAPI 3.1 description of the HTTP API, served at GET /openapi.json.

Kept true by tests/web/test_openapi.py: every route of the app is described here, and real
responses are validated against these schemas (objects are closed: a new field must be added here).
"""

from __future__ import annotations

from typing import Any

from models.enums import OrderStatus
from orchestrator.registry import TimelineEvent

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"

SAGA_STATES = ["running", "compensating", "completed", "compensated", "failed"]
REASONS = ["out_of_stock", "payment_declined", "retries_exhausted", "timeout", "operator"]
EVENTS = [e.value for e in TimelineEvent]
ORDER_STATUSES = [s.value for s in OrderStatus]


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(
    required: dict[str, Any], optional: dict[str, Any] | None = None, description: str | None = None
) -> dict[str, Any]:
    """A closed object: ``required`` keys must be there, nothing outside both may be."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {**required, **(optional or {})},
        "required": list(required),
        "additionalProperties": False,
    }
    if description:
        schema["description"] = description
    return schema


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


STRING: dict[str, Any] = {"type": "string"}
INT: dict[str, Any] = {"type": "integer"}
UUID: dict[str, Any] = {"type": "string", "format": "uuid"}
TIME: dict[str, Any] = {"type": "string", "format": "date-time"}

SAGA_FIELDS: dict[str, Any] = {
    "saga_id": UUID,
    "state": {"enum": SAGA_STATES},
    "stuck": {"type": "boolean"},
    "definition": STRING,
    "definition_version": {"type": "integer", "minimum": 1},
    "steps": {"type": "array", "items": ref("Step")},
    "timeline": {"type": "array", "items": ref("Event"), "description": "oldest first"},
}

SCHEMAS: dict[str, Any] = {
    "Error": obj(
        {
            "error": obj(
                {
                    "code": {**STRING, "description": "machine-readable, e.g. validation_failed"},
                    "message": STRING,
                    "details": {
                        "description": "for 422: a list of {field, message}; otherwise usually null"
                    },
                }
            )
        },
        description="Every JSON error has this shape.",
    ),
    "OrderIn": obj(
        {
            "customer_id": {"type": "string", "minLength": 1, "maxLength": 64},
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 50,
                "items": obj(
                    {
                        "sku": STRING,
                        "quantity": {"type": "integer", "minimum": 1, "maximum": 1000},
                    }
                ),
            },
            "payment": obj(
                {"card_token": {"type": "string", "pattern": "^tok_[A-Za-z0-9_]{1,64}$"}}
            ),
        },
        {
            "faults": {
                "type": "object",
                "additionalProperties": STRING,
                "description": "only when SAGA_FAULT_INJECTION=1: step or compensation "
                "name -> transient:N | always | fail | crash | hang:S",
            }
        },
    ),
    "Placed": obj(
        {
            "order_id": UUID,
            "saga_id": UUID,
            "status": {"enum": ORDER_STATUSES},
        }
    ),
    "Compensation": obj(
        {
            "name": STRING,
            "status": {"enum": ["pending", "running", "succeeded", "failed", "parked"]},
            "attempts": INT,
            "error": nullable(STRING),
            "started_at": nullable(TIME),
            "finished_at": nullable(TIME),
        }
    ),
    "Step": obj(
        {
            "name": STRING,
            "status": {"enum": ["pending", "running", "succeeded", "failed", "skipped"]},
            "attempts": INT,
            "started_at": nullable(TIME),
            "finished_at": nullable(TIME),
            "error": nullable(STRING),
            "deadline_at": nullable(TIME),
            "compensation": nullable(ref("Compensation")),
        }
    ),
    "Event": obj(
        {
            "at": TIME,
            "event": {"enum": EVENTS},
            "step": nullable(STRING),
            "attempt": nullable(INT),
            "detail": nullable(STRING),
            "actor": nullable(STRING),
        }
    ),
    "Saga": obj(SAGA_FIELDS),
    "Order": obj(
        {
            "order_id": UUID,
            "customer_id": STRING,
            "status": {"enum": ORDER_STATUSES},
            "reason": nullable({"enum": REASONS}),
            "total_cents": INT,
            "card_last4": {"type": "string", "maxLength": 4},
            "created_at": TIME,
            "items": {
                "type": "array",
                "items": obj({"sku": STRING, "quantity": INT, "price_cents": INT}),
            },
            "saga": ref("Saga"),
            "returns": {"type": "array", "items": ref("Saga"), "description": "oldest first"},
        }
    ),
    "ReturnIn": obj(
        {},
        {
            "reason": {"type": "string", "minLength": 1, "maxLength": 200},
            "faults": {
                "type": "object",
                "additionalProperties": STRING,
                "description": "SAGA_FAULT_INJECTION=1 only: return step or compensation -> fault",
            },
        },
    ),
    "ReturnPlaced": obj(
        {"order_id": UUID, "saga_id": UUID, "status": {"enum": ORDER_STATUSES}}
    ),
    "Product": obj(
        {
            "sku": STRING,
            "name": STRING,
            "price_cents": INT,
            "available": INT,
            "reserved": INT,
            "sold": INT,
        }
    ),
    "SagaSummary": obj(
        {
            "saga_id": UUID,
            "order_id": {**STRING, "description": "the saga's business key (the order id)"},
            "definition": STRING,
            "definition_version": {"type": "integer", "minimum": 1},
            "state": {"enum": SAGA_STATES},
            "stuck": {"type": "boolean"},
            "current_step": STRING,
            "reason": nullable({"enum": REASONS}),
            "created_at": TIME,
            "updated_at": TIME,
        }
    ),
    "SagaList": obj(
        {
            "sagas": {"type": "array", "maxItems": 50, "items": ref("SagaSummary")},
            "counts": obj({s: INT for s in [*SAGA_STATES, "stuck"]}),
            "next": nullable({**STRING, "description": "the cursor of the next (older) page"}),
        }
    ),
    "SagaDetail": obj(
        {
            **SAGA_FIELDS,
            "order_id": STRING,
            "order_status": nullable({"enum": ORDER_STATUSES}),
            "customer_id": nullable(STRING),
            "reason": nullable({"enum": REASONS}),
            "created_at": TIME,
            "updated_at": TIME,
            "current_step": STRING,
        }
    ),
    "ActionIn": obj({}, {"note": {"type": "string", "maxLength": 500}}),
    "ActionResult": obj({"saga_id": UUID, "state": {"enum": SAGA_STATES}}),
    "BulkIn": obj(
        {
            "action": {"enum": ["retry", "compensate"]},
            "saga_ids": {"type": "array", "minItems": 1, "maxItems": 200, "items": STRING},
        },
        {"note": {"type": "string", "maxLength": 500}},
    ),
    "BulkResult": obj(
        {
            "results": {
                "type": "array",
                "items": obj({"saga_id": STRING, "status": {"enum": [202, 404, 409]}}),
            }
        }
    ),
    "DeadLetter": obj(
        {
            "id": INT,
            "saga_id": nullable(UUID),
            "step": nullable(STRING),
            "queue": STRING,
            "reason": STRING,
            "at": TIME,
            "state": {"enum": ["dead", "replayed", "discarded"]},
        },
        {"body": {**STRING, "description": "the message as text, card tokens masked"}},
    ),
    "DeadLetterList": obj({"dead_letters": {"type": "array", "items": ref("DeadLetter")}}),
    "LetterActionResult": obj({"id": INT, "state": {"enum": ["replayed", "discarded"]}}),
    "Health": obj({"database": {"enum": ["ok", "down"]}, "broker": {"enum": ["ok", "down"]}}),
}


def _json(schema: str, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {JSON: {"schema": ref(schema)}},
    }
    if headers:
        response["headers"] = headers
    return response


def _errors(*codes: int) -> dict[str, Any]:
    texts = {
        400: "bad request (malformed JSON, missing CSRF token, bad parameter)",
        401: "admin credentials missing or wrong (WWW-Authenticate: Basic)",
        404: "not found",
        409: "conflict (action does not apply now, idempotency)",
        413: "body over 64 KiB",
        415: "unsupported content type",
        422: "validation failed; details name the fields",
        503: "unavailable (outbox backlog over its limit: Retry-After)",
    }
    return {str(c): _json("Error", texts[c]) for c in codes}


def _html(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/html": {"schema": STRING}}}


def _path_param(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


BASIC: list[dict[str, list[str]]] = [{"basic": []}]
SEE_OTHER = {
    "description": "a form post: back to the page",
    "headers": {"Location": {"schema": STRING}},
}


def _action(summary: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "tags": ["admin"],
            "security": BASIC,
            "parameters": [_path_param("saga_id", UUID)],
            "requestBody": {
                "content": {
                    JSON: {"schema": ref("ActionIn")},
                    FORM: {
                        "schema": {
                            "type": "object",
                            "properties": {"csrf_token": STRING, "note": STRING},
                        }
                    },
                }
            },
            "responses": {
                "202": _json("ActionResult", "accepted; the saga's new state"),
                "303": SEE_OTHER,
                **_errors(400, 401, 404, 409, 415, 422),
            },
        }
    }


def _letter_action(summary: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "tags": ["admin"],
            "security": BASIC,
            "parameters": [_path_param("letter_id", INT)],
            "requestBody": {
                "required": False,
                "content": {
                    JSON: {"schema": {"type": "object"}},
                    FORM: {"schema": {"type": "object", "properties": {"csrf_token": STRING}}},
                },
            },
            "responses": {
                "202": _json("LetterActionResult", "done"),
                "303": SEE_OTHER,
                **_errors(400, 401, 404, 409, 415),
            },
        }
    }


PATHS: dict[str, Any] = {
    "/": {
        "get": {
            "summary": "The order form (HTML)",
            "tags": ["shop"],
            "responses": {"200": _html("the form")},
        }
    },
    "/orders": {
        "post": {
            "summary": "Place an order (starts its saga)",
            "tags": ["shop"],
            "parameters": [
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {
                    JSON: {"schema": ref("OrderIn")},
                    FORM: {
                        "schema": {
                            "type": "object",
                            "description": "the HTML form: customer_id, "
                            "qty_<sku>, card_token, csrf_token",
                        }
                    },
                },
            },
            "responses": {
                "202": _json("Placed", "accepted", {"Location": {"schema": STRING}}),
                "200": _json(
                    "Placed",
                    "the order an earlier request with this Idempotency-Key made",
                    {"Location": {"schema": STRING}},
                ),
                "303": {"description": "a form post: to the order page"},
                **_errors(400, 409, 413, 415, 422, 503),
            },
        }
    },
    "/orders/{order_id}": {
        "get": {
            "summary": "An order and its saga (JSON when Accept prefers it, else the live page)",
            "tags": ["shop"],
            "parameters": [_path_param("order_id", STRING)],
            "responses": {
                "200": {
                    "description": "the order",
                    "content": {JSON: {"schema": ref("Order")}, "text/html": {"schema": STRING}},
                },
                **_errors(404),
            },
        }
    },
    "/orders/{order_id}/return": {
        "post": {
            "summary": "Return a confirmed order (starts its return saga)",
            "tags": ["shop"],
            "parameters": [
                _path_param("order_id", STRING),
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                },
            ],
            "requestBody": {
                "required": False,
                "content": {
                    JSON: {"schema": ref("ReturnIn")},
                    FORM: {"schema": {"type": "object", "description": "reason, csrf_token"}},
                },
            },
            "responses": {
                "202": _json("ReturnPlaced", "accepted", {"Location": {"schema": STRING}}),
                "200": _json(
                    "ReturnPlaced",
                    "the return an earlier request with this Idempotency-Key started",
                    {"Location": {"schema": STRING}},
                ),
                "303": {"description": "a form post: to the order page"},
                **_errors(400, 404, 409, 413, 415, 422, 503),
            },
        }
    },
    "/products": {
        "get": {
            "summary": "The catalogue with stock",
            "tags": ["shop"],
            "responses": {
                "200": {
                    "description": "every product",
                    "content": {JSON: {"schema": {"type": "array", "items": ref("Product")}}},
                }
            },
        }
    },
    "/admin": {
        "get": {
            "summary": "Redirects to /admin/sagas",
            "tags": ["admin"],
            "security": BASIC,
            "responses": {"302": {"description": "redirect"}, **_errors(401)},
        }
    },
    "/admin/": {
        "get": {
            "summary": "Redirects to /admin/sagas",
            "tags": ["admin"],
            "security": BASIC,
            "responses": {"302": {"description": "redirect"}, **_errors(401)},
        }
    },
    "/admin/sagas": {
        "get": {
            "summary": "Sagas, newest first, 50 a page",
            "tags": ["admin"],
            "security": BASIC,
            "parameters": [
                {"name": "state", "in": "query", "schema": {"enum": ["stuck", *SAGA_STATES]}},
                {
                    "name": "q",
                    "in": "query",
                    "schema": STRING,
                    "description": "an order id or a saga id",
                },
                {
                    "name": "cursor",
                    "in": "query",
                    "schema": STRING,
                    "description": "`next` of the previous page",
                },
            ],
            "responses": {
                "200": {
                    "description": "a page of sagas and the counts per state",
                    "content": {JSON: {"schema": ref("SagaList")}, "text/html": {"schema": STRING}},
                },
                **_errors(400, 401),
            },
        }
    },
    "/admin/sagas/{saga_id}": {
        "get": {
            "summary": "One saga: steps, compensations, attempts, errors, timeline",
            "tags": ["admin"],
            "security": BASIC,
            "parameters": [_path_param("saga_id", STRING)],
            "responses": {
                "200": {
                    "description": "the saga",
                    "content": {
                        JSON: {"schema": ref("SagaDetail")},
                        "text/html": {"schema": STRING},
                    },
                },
                **_errors(401, 404),
            },
        }
    },
    "/admin/sagas/{saga_id}/retry": _action(
        "Resume a stuck or failed saga (a parked compensation gets a fresh budget)"
    ),
    "/admin/sagas/{saga_id}/compensate": _action("Abort a running saga and compensate it"),
    "/admin/sagas/bulk": {
        "post": {
            "summary": "Retry or compensate many sagas; each answers on its own",
            "tags": ["admin"],
            "security": BASIC,
            "requestBody": {
                "required": True,
                "content": {JSON: {"schema": ref("BulkIn")}, FORM: {"schema": {"type": "object"}}},
            },
            "responses": {
                "200": _json("BulkResult", "one result per saga, in order"),
                "303": SEE_OTHER,
                **_errors(400, 401, 415, 422),
            },
        }
    },
    "/admin/dead-letters": {
        "get": {
            "summary": "Dead letters drained from the dead-letter queues, newest first",
            "tags": ["admin"],
            "security": BASIC,
            "responses": {
                "200": {
                    "description": "the dead letters",
                    "content": {
                        JSON: {"schema": ref("DeadLetterList")},
                        "text/html": {"schema": STRING},
                    },
                },
                **_errors(401),
            },
        }
    },
    "/admin/dead-letters/{letter_id}/replay": _letter_action(
        "Publish the original message to its queue again"
    ),
    "/admin/dead-letters/{letter_id}/discard": _letter_action("Mark the dead letter discarded"),
    "/healthz": {
        "get": {
            "summary": "Database and broker reachability",
            "tags": ["operations"],
            "responses": {
                "200": _json("Health", "both ok"),
                "503": _json("Health", "at least one is down"),
            },
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics, computed from the database at scrape time",
            "tags": ["operations"],
            "responses": {
                "200": {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": STRING}},
                }
            },
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This description",
            "tags": ["operations"],
            "responses": {
                "200": {
                    "description": "OpenAPI 3.1",
                    "content": {JSON: {"schema": {"type": "object"}}},
                }
            },
        }
    },
}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Saga shop",
        "version": "1",
        "description": "Orders placed here run as sagas (inventory, payment, orders) driven by "
        'an orchestrator. Errors: {"error": {"code", "message", '
        '"details"}}. Admin routes need HTTP Basic; their form posts need a '
        "CSRF token, JSON posts do not.",
    },
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"basic": {"type": "http", "scheme": "basic"}},
    },
}


def spec() -> dict[str, Any]:
    return SPEC
