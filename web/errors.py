"""Errors in the contract's shape: ``{"error": {"code", "message", "details"}}``, HTML for pages."""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, jsonify, render_template, request
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from web.schemas import Error, ErrorDetail, dump


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details
        self.headers = headers or {}


FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def wants_json() -> bool:
    """JSON for API clients: a JSON body, an Accept that prefers JSON over HTML, or a post that is
    not a form and does not ask for HTML outright (curl's ``*/*``, no Accept at all)."""
    if request.is_json:
        return True
    accept = request.accept_mimetypes
    if request.method in ("GET", "HEAD") or request.mimetype in FORM_TYPES:
        return accept.best_match(["text/html", "application/json"]) == "application/json"
    return accept.quality("application/json") >= accept.quality("text/html")


def error_response(status: int, code: str, message: str, details: Any = None,
                   headers: dict[str, str] | None = None) -> Response:
    if wants_json():
        error = Error(error=ErrorDetail(code=code, message=message, details=details))
        response = jsonify(dump(error))
    else:
        page = render_template("error.html", status=status, code=code, message=message)
        response = Response(page, mimetype="text/html")
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
          415: "unsupported_media_type", 422: "validation_failed", 503: "unavailable"}


def register(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        headers = dict(exc.get_headers()) if status in (401, 405) else {}
        headers.pop("Content-Type", None)
        return error_response(status, _CODES.get(status, "error"),
                              exc.description or exc.name, None, headers)

    @app.errorhandler(OperationalError)
    def _database_unavailable(exc: OperationalError) -> Response:
        # The database is down or out of connections: a passing condition, not a bug.
        app.logger.warning("database unavailable: %s", exc.orig)
        return error_response(503, "unavailable", "the database is unavailable; try again shortly",
                              headers={"Retry-After": "2"})

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        app.logger.exception("unhandled error")
        return error_response(500, "internal_error", "something went wrong on our side")
