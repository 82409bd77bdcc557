"""Operations endpoints: health of the database and broker, Prometheus metrics, the OpenAPI file."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from orchestrator.ops import health, metrics
from web import openapi
from web.schemas import Health, dump

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    status = Health.model_validate(health.check())
    response = jsonify(dump(status))
    response.status_code = 200 if status.database == status.broker == "ok" else 503
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/metrics")
def prometheus() -> Response:
    response = Response(metrics.render(), content_type=metrics.CONTENT_TYPE)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return jsonify(openapi.spec())
