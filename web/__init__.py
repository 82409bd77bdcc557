"""The Flask front end: order form and API, admin console, health and metrics.

``create_app()`` refuses to start in production without its secrets (see orchestrator.ops.config).
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from flask import Flask, Response, g, request
from flask_wtf.csrf import generate_csrf

from orchestrator.ops import tracing
from orchestrator.ops.config import settings
from orchestrator.ops.logs import log_context, setup_logging
from web.reads import RerunsReads

MAX_BODY = 64 * 1024
# A client's X-Request-Id is kept only when it is a short visible token: it is written into every
# log line of the request, so anything else (spaces, brackets, controls) is replaced by a fresh id.
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    cfg = settings()
    if not logging.getLogger().handlers:
        setup_logging(cfg.process or "web")
    app = RerunsReads(__name__)
    app.config.update(
        SECRET_KEY=cfg.secret_key.get_secret_value(),
        MAX_CONTENT_LENGTH=MAX_BODY,
        MAX_FORM_MEMORY_SIZE=MAX_BODY,
        WTF_CSRF_TIME_LIMIT=None,
        ADMIN_USER=cfg.admin_user,
        ADMIN_PASSWORD=cfg.admin_password.get_secret_value(),
        FAULT_INJECTION=cfg.fault_injection,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=cfg.production,
        TRUSTED_HOSTS=list(cfg.trusted_hosts) or None,
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]  # JSON_SORT_KEYS left in Flask 2.3
    if test_config:
        app.config.update(test_config)
    # Wired first (the saga registry among it): a changed released definition stops the web here.
    from orchestrator.bootstrap import bootstrap

    bootstrap()

    from web import admin, errors, ops, orders, presenters, security, services

    errors.register(app)
    security.register(app)
    app.jinja_env.filters.update(explain=presenters.explain, money=presenters.money,
                               duration=presenters.duration,
                               attempt_chart=presenters.attempt_chart)
    # Forms embed csrf_token() (Flask-WTF's generate_csrf); CSRFProtect is not used because it
    # would demand a token on JSON posts too, which the contract exempts.
    app.jinja_env.globals.update(texts=presenters.page_texts(), csrf_token=generate_csrf)
    app.register_blueprint(orders.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(services.bp)
    app.register_blueprint(ops.bp)

    @app.before_request
    def _request_context() -> None:
        given = request.headers.get("X-Request-Id", "")
        g.request_id = given if REQUEST_ID.fullmatch(given) else str(uuid.uuid4())
        g.log_ctx = log_context(request_id=g.request_id)
        g.log_ctx.__enter__()

    @app.teardown_request
    def _end_request_context(_: BaseException | None) -> None:
        ctx = g.pop("log_ctx", None)
        if ctx is not None:
            ctx.__exit__(None, None, None)

    @app.after_request
    def _security_headers(response: Response) -> Response:
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        if "request_id" in g:
            response.headers["X-Request-Id"] = g.request_id
        return response

    tracing.instrument_flask(app)  # each request a span (when this process traces at all)
    return app
