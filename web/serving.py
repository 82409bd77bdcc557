"""How gunicorn serves the app (``sagactl web``): its own errors in the contract's JSON shape, and
its access and error logs masked and escaped like every other log line; each worker sets up its
own tracing once forked.

gunicorn answers some requests before the app sees them (a request line over
``limit_request_line``: 414; a header too large or too many: 431; a malformed request: 400) with an
HTML page. ``JsonErrorWorker`` lets gunicorn decide the status and log it as usual, then sends
``{"error": {"code", "message", "details"}}`` instead of the page.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from gunicorn import glogging, util
from gunicorn.workers.gthread import ThreadWorker

from orchestrator.ops import tracing
from orchestrator.ops.config import settings
from orchestrator.ops.logs import SafeFormatter, setup_logging

# status -> (code, message) for the answers gunicorn gives on its own.
SERVER_ERRORS: dict[int, tuple[str, str]] = {
    400: ("malformed_request", "the request line or a header could not be parsed"),
    403: ("forbidden", "the request is forbidden"),
    414: ("request_line_too_long", "the request line (method, path and query) is too long"),
    417: ("expectation_failed", "the Expect header cannot be met"),
    431: ("request_headers_too_large", "a request header is too large, or there are too many"),
    500: ("internal_error", "something went wrong on our side"),
    501: ("not_implemented", "the request's transfer coding is not supported"),
}


class _CapturedSocket:
    """Stands in for the client while gunicorn writes its HTML error page, to read its status."""

    def __init__(self) -> None:
        self.data = b""

    def gettimeout(self) -> float:
        return 0.0  # "non-blocking already": gunicorn's write_nonblock writes at once

    def sendall(self, data: bytes) -> None:
        self.data += data


def error_response(status: int) -> bytes:
    """A whole HTTP/1.1 response carrying the contract's error shape for ``status``."""
    code, message = SERVER_ERRORS.get(status, ("error", HTTPStatus(status).phrase.lower()))
    body = json.dumps({"error": {"code": code, "message": message, "details": None}}).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


class JsonErrorWorker(ThreadWorker):
    """gunicorn's gthread worker, answering its own errors in JSON; its tracing starts in it,
    after the fork and before it loads the app (gunicorn's master never traces)."""

    def init_process(self) -> None:
        process = settings().process or "web"
        setup_logging(process)  # what create_app would do, early enough to log tracing's start
        tracing.setup(process)
        super().init_process()  # loads the app and serves

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        captured = _CapturedSocket()
        super().handle_error(req, captured, addr, exc)  # status, warning and access log as usual
        try:
            status = int(captured.data.split(b" ", 2)[1])
        except (IndexError, ValueError):
            status = 500
        try:
            util.write_nonblock(client, error_response(status))
        except Exception:
            self.log.debug("Failed to send error message.")


class SafeLogger(glogging.Logger):
    """gunicorn's logger whose every line (access log included) is masked and escaped: a user
    name, path or User-Agent cannot forge a line or show a card token."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                if not isinstance(handler.formatter, SafeFormatter):
                    handler.setFormatter(SafeFormatter(handler.formatter))
