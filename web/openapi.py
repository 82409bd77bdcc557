"""The OpenAPI 3.1 description of the HTTP API, served at GET /openapi.json.

The bodies' schemas are generated from the models in web/schemas.py (the ones that validate
requests and shape responses); the paths are declared here. Kept true by
tests/web/test_openapi.py: every route is described and real responses are validated against it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from web import schemas as s

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
REF = "#/components/schemas/{model}"

REQUESTS: tuple[type[BaseModel], ...] = (
    s.OrderIn,
    s.ReturnIn,
    s.ActionIn,
    s.BulkIn,
    s.LetterActionIn,
    s.ServicePauseIn,
    s.ServiceResumeIn,
)
RESPONSES: tuple[type[BaseModel], ...] = (
    s.Error,
    s.Placed,
    s.OrderOut,
    s.ProductOut,
    s.SagaList,
    s.SagaDetail,
    s.ActionResult,
    s.BulkResult,
    s.BulkPreview,
    s.OperationAccepted,
    s.OperationList,
    s.OperationDetail,
    s.DeadLetterList,
    s.LetterActionResult,
    s.ServiceList,
    s.ServiceActionResult,
    s.Health,
)


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _components() -> dict[str, Any]:
    pairs: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        *((m, "validation") for m in REQUESTS),
        *((m, "serialization") for m in RESPONSES),
    ]
    _, defs = models_json_schema(pairs, ref_template=REF)
    schemas: dict[str, Any] = defs["$defs"]
    # The error's shape reads as one schema (clients and the contract show it whole).
    schemas["Error"]["properties"]["error"] = schemas.pop("ErrorDetail")
    return schemas


def _json(model: type[BaseModel], description: str, **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": ref(model)}}, **extra}


def _page_or_json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {JSON: {"schema": ref(model)}, "text/html": {"schema": {"type": "string"}}},
    }


ERRORS = {
    400: "bad request (malformed JSON, a duplicate key, nesting too deep, missing CSRF token, "
    "bad parameter)",
    401: "admin credentials missing or wrong (WWW-Authenticate: Basic)",
    404: "not found",
    409: "conflict (action does not apply now, idempotency)",
    413: "body over 64 KiB",
    415: "unsupported content type",
    422: "validation failed; details name the fields",
    503: "unavailable (outbox backlog over its limit: Retry-After)",
}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): _json(s.Error, ERRORS[c]) for c in codes}


def _path_param(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": schema,
        "description": description,
    }


def _query_params(model: type[BaseModel]) -> list[dict[str, Any]]:
    """A query model's fields as OpenAPI parameters (a parameter is absent, never null)."""
    params = []
    for name, prop in model.model_json_schema(ref_template=REF)["properties"].items():
        schema = next((o for o in prop.get("anyOf", [prop]) if o.get("type") != "null"), prop)
        schema = {k: v for k, v in schema.items() if k not in ("title", "description")}
        param = {"name": name, "in": "query", "required": False, "schema": schema}
        if "description" in prop:
            param["description"] = prop["description"]
        params.append(param)
    return params


LOCATION = {"Location": {"schema": {"type": "string"}, "description": "a relative URL"}}
BASIC: list[dict[str, list[str]]] = [{"basic": []}]
SEE_OTHER = {"description": "a form post: back to the page", "headers": LOCATION}
SAGA_ID = _path_param("saga_id", {"type": "string"}, "a saga id (anything else: 404)")
LETTER_ID = _path_param("letter_id", TypeAdapter(s.LetterId).json_schema(), "a dead letter id")
FORM_FIELDS = "the page's form: the body's fields and csrf_token"


def _admin(method: str, summary: str, **operation: Any) -> dict[str, Any]:
    return {method: {"summary": summary, "tags": ["admin"], "security": BASIC, **operation}}


def _post_body(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    form = {"type": "object", "description": FORM_FIELDS}
    return {"required": required, "content": {JSON: {"schema": ref(model)}, FORM: {"schema": form}}}


def _action(summary: str) -> dict[str, Any]:
    return _admin(
        "post",
        summary,
        parameters=[SAGA_ID],
        requestBody=_post_body(s.ActionIn),
        responses={
            "202": _json(s.ActionResult, "accepted; the saga's new state"),
            "303": SEE_OTHER,
            **_errors(400, 401, 404, 409, 413, 415, 422),
        },
    )


def _letter_action(summary: str) -> dict[str, Any]:
    return _admin(
        "post",
        summary,
        parameters=[LETTER_ID],
        requestBody=_post_body(s.LetterActionIn),
        responses={
            "202": _json(s.LetterActionResult, "done"),
            "303": SEE_OTHER,
            **_errors(400, 401, 404, 409, 413, 415, 422),
        },
    )


SERVICE = _path_param("service", {"type": "string"}, "a participant service (else 404)")


def _service_action(summary: str, body: type[BaseModel]) -> dict[str, Any]:
    return _admin(
        "post",
        summary,
        parameters=[SERVICE],
        requestBody=_post_body(body, required=False),
        responses={
            "202": _json(s.ServiceActionResult, "done; the service's new state"),
            "303": SEE_OTHER,
            **_errors(400, 401, 404, 409, 413, 415, 422),
        },
    )


def _redirect() -> dict[str, Any]:
    return _admin(
        "get",
        "Redirects to /admin/sagas",
        responses={"302": {"description": "redirect", "headers": LOCATION}, **_errors(401)},
    )


def _ops(summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"summary": summary, "tags": ["operations"], "responses": responses}}


IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
}

PATHS: dict[str, Any] = {
    "/": {
        "get": {
            "summary": "The order form (HTML)",
            "tags": ["shop"],
            "responses": {
                "200": {
                    "description": "the form",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/orders": {
        "post": {
            "summary": "Place an order (starts its saga)",
            "tags": ["shop"],
            "parameters": [IDEMPOTENCY_KEY],
            "requestBody": {
                "required": True,
                "content": {
                    JSON: {"schema": ref(s.OrderIn)},
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
                "202": _json(s.Placed, "accepted", headers=LOCATION),
                "200": _json(
                    s.Placed,
                    "the order an earlier request with this Idempotency-Key made",
                    headers=LOCATION,
                ),
                "303": {"description": "a form post: to the order page", "headers": LOCATION},
                **_errors(400, 409, 413, 415, 422, 503),
            },
        }
    },
    "/orders/{order_id}": {
        "get": {
            "summary": "An order and its saga (JSON when Accept prefers it, else the live page)",
            "tags": ["shop"],
            "parameters": [
                _path_param("order_id", {"type": "string"}, "an order id (anything else: 404)")
            ],
            "responses": {"200": _page_or_json(s.OrderOut, "the order"), **_errors(404)},
        }
    },
    "/orders/{order_id}/return": {
        "post": {
            "summary": "Return a confirmed order (starts its return saga)",
            "tags": ["shop"],
            "parameters": [
                _path_param("order_id", {"type": "string"}, "an order id (anything else: 404)"),
                IDEMPOTENCY_KEY,
            ],
            "requestBody": {
                "required": False,
                "content": {
                    JSON: {"schema": ref(s.ReturnIn)},
                    FORM: {"schema": {"type": "object", "description": "reason, csrf_token"}},
                },
            },
            "responses": {
                "202": _json(s.Placed, "accepted: the order is returning", headers=LOCATION),
                "200": _json(
                    s.Placed,
                    "the return an earlier request with this Idempotency-Key started",
                    headers=LOCATION,
                ),
                "303": {"description": "a form post: to the order page", "headers": LOCATION},
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
                    "content": {JSON: {"schema": {"type": "array", "items": ref(s.ProductOut)}}},
                }
            },
        }
    },
    "/admin": _redirect(),
    "/admin/": _redirect(),
    "/admin/sagas": _admin(
        "get",
        "Sagas, newest first, 50 a page",
        parameters=_query_params(s.SagaListQuery),
        responses={
            "200": _page_or_json(s.SagaList, "a page of sagas and the counts per state"),
            **_errors(400, 401),
        },
    ),
    "/admin/sagas/{saga_id}": _admin(
        "get",
        "One saga: steps, compensations, attempts, errors, timeline",
        parameters=[SAGA_ID],
        responses={"200": _page_or_json(s.SagaDetail, "the saga"), **_errors(401, 404)},
    ),
    "/admin/sagas/{saga_id}/retry": _action(
        "Resume a stuck or failed saga (a parked compensation gets a fresh budget)"
    ),
    "/admin/sagas/{saga_id}/compensate": _action("Abort a running saga and compensate it"),
    "/admin/sagas/bulk": _admin(
        "post",
        "Retry or compensate many sagas: by ids (each answers on its own, at once) or by filter "
        "(a dry run counts them; a real run is a recorded operation acting at SAGA_BULK_RATE)",
        requestBody=_post_body(s.BulkIn),
        responses={
            "200": {
                "description": "by ids: one result per saga, in order; a dry run by filter: the "
                "count and a sample (a form's dry run: the page with the confirm button)",
                "content": {
                    JSON: {"schema": {"oneOf": [ref(s.BulkResult), ref(s.BulkPreview)]}},
                    "text/html": {"schema": {"type": "string"}},
                },
            },
            "202": _json(s.OperationAccepted, "by filter: the operation is recorded and runs"),
            "303": {
                "description": "a form post: back to the list (by ids) or to the operation",
                "headers": LOCATION,
            },
            **_errors(400, 401, 413, 415, 422),
        },
    ),
    "/admin/operations": _admin(
        "get",
        "Bulk operations by filter, newest first, with their progress",
        responses={"200": _page_or_json(s.OperationList, "the operations"), **_errors(401)},
    ),
    "/admin/operations/{operation_id}": _admin(
        "get",
        "One bulk operation: who, when, note, filter, progress and each saga's result",
        parameters=[
            _path_param("operation_id", {"type": "string"}, "an operation id (else: 404)")
        ],
        responses={
            "200": _page_or_json(s.OperationDetail, "the operation"),
            **_errors(401, 404),
        },
    ),
    "/admin/services": _admin(
        "get",
        "Participant services: state, holds, failure rate, consumers",
        responses={"200": _page_or_json(s.ServiceList, "every service"), **_errors(401)},
    ),
    "/admin/services/{service}/pause": _service_action(
        "Pause a service: its commands are held until it resumes", s.ServicePauseIn
    ),
    "/admin/services/{service}/resume": _service_action(
        "Resume a service: held commands are released at SAGA_RESUME_RATE", s.ServiceResumeIn
    ),
    "/admin/dead-letters": _admin(
        "get",
        "Dead letters drained from the dead-letter queues, newest first",
        responses={"200": _page_or_json(s.DeadLetterList, "the dead letters"), **_errors(401)},
    ),
    "/admin/dead-letters/{letter_id}/replay": _letter_action(
        "Publish the original message to its queue again"
    ),
    "/admin/dead-letters/{letter_id}/discard": _letter_action("Mark the dead letter discarded"),
    "/healthz": _ops(
        "Database and broker reachability",
        {"200": _json(s.Health, "both ok"), "503": _json(s.Health, "at least one is down")},
    ),
    "/metrics": _ops(
        "Prometheus metrics, computed from the database at scrape time",
        {
            "200": {
                "description": "Prometheus text format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    ),
    "/openapi.json": _ops(
        "This description",
        {"200": {"description": "OpenAPI 3.1", "content": {JSON: {"schema": {"type": "object"}}}}},
    ),
}


@cache
def spec() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Saga shop",
            "version": "1",
            "description": "Orders placed here run as sagas (inventory, payment, orders) driven "
            'by an orchestrator. Errors: {"error": {"code", "message", "details"}}. Admin routes '
            "need HTTP Basic; their form posts need a CSRF token, JSON posts do not.",
        },
        "paths": PATHS,
        "components": {
            "schemas": _components(),
            "securitySchemes": {"basic": {"type": "http", "scheme": "basic"}},
        },
    }
