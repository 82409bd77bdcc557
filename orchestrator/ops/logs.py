"""Logging with the saga's ids on every line: text for people, one JSON object a line on request.

Ids come from a context (``log_context``) set by each task and request, or from ``extra=``.
``SAGA_LOG_JSON=1`` switches to JSON; ``SAGA_LOG_LEVEL`` sets the level (default INFO).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from orchestrator.ops.masking import mask_text

FIELDS = ("saga_id", "order_id", "step", "request_id")
_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "saga_log", default=None
)


@contextmanager
def log_context(**ids: Any) -> Iterator[None]:
    merged = {**(_context.get() or {}), **{k: str(v) for k, v in ids.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ids = _context.get() or {}
        for field in FIELDS:
            if getattr(record, field, None) is None:
                setattr(record, field, ids.get(field))
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__()
        self.process_name = process

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "at": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "process": self.process_name,
            "logger": record.name,
            "message": mask_text(record.getMessage()),
        }
        for field in FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                data[field] = value
        if record.exc_info:
            data["exc"] = mask_text(self.formatException(record.exc_info))
        return json.dumps(data)


class TextFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__("%(asctime)s %(levelname)s " + process + " %(ids)s%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        ids = " ".join(f"{f}={getattr(record, f)}" for f in FIELDS if getattr(record, f, None))
        record.ids = f"[{ids}] " if ids else ""
        return mask_text(super().format(record))


def setup_logging(process: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    as_json = os.environ.get("SAGA_LOG_JSON") == "1"
    handler.setFormatter(JsonFormatter(process) if as_json else TextFormatter(process))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("SAGA_LOG_LEVEL", "INFO").upper())
