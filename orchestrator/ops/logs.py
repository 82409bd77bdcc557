"""Logging with the saga's ids on every line: text for people, one JSON object a line on request.

Ids come from a context (``log_context``) set by each task and request, or from ``extra=``; with
tracing on, each line also carries the current trace's id (``trace_id``,
orchestrator/ops/tracing.py).
``SAGA_LOG_JSON=1`` switches to JSON; ``SAGA_LOG_LEVEL`` sets the level (default INFO).
Every line is masked (card tokens) and has its control characters escaped, so text from outside
(a header, a note, an error message) can never start a forged line or move a terminal's cursor.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from orchestrator.ops import tracing
from orchestrator.ops.config import settings
from orchestrator.ops.masking import mask_text

FIELDS = ("saga_id", "order_id", "step", "request_id")  # set by log_context
LINE_FIELDS = (*FIELDS, "trace_id")  # what a line shows: those, and the current trace's id
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


def _escape_table() -> dict[int, str]:
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    table = {c: named.get(chr(c), f"\\x{c:02x}") for c in (*range(0x20), *range(0x7F, 0xA0))}
    table.update({0x2028: "\\u2028", 0x2029: "\\u2029"})  # line/paragraph separators
    return table


_ESCAPES = _escape_table()


def escape_controls(text: str) -> str:
    """C0/C1 controls (CR, LF, ESC, ...) and Unicode line separators as visible escapes."""
    return text.translate(_ESCAPES)


def safe_line(text: str) -> str:
    """What any log line must go through: tokens masked, control characters escaped."""
    return escape_controls(mask_text(text))


class SafeFormatter(logging.Formatter):
    """Wraps another process's formatter (gunicorn's) so its lines are masked and escaped too."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return safe_line(self.inner.format(record))


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ids = _context.get() or {}
        for field in FIELDS:
            if getattr(record, field, None) is None:
                setattr(record, field, ids.get(field))
        if getattr(record, "trace_id", None) is None:
            record.trace_id = tracing.current_trace_id()
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
            "message": safe_line(record.getMessage()),
        }
        for field in LINE_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                data[field] = safe_line(str(value))
        if record.exc_info:
            data["exc"] = safe_line(self.formatException(record.exc_info))
        return json.dumps(data)


class TextFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__("%(asctime)s %(levelname)s " + process + " %(ids)s%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        ids = " ".join(f"{f}={getattr(record, f)}" for f in LINE_FIELDS if getattr(record, f, None))
        record.ids = f"[{ids}] " if ids else ""
        # The whole line, traceback included: one record is one line, whatever its text holds.
        return safe_line(super().format(record))


def setup_logging(process: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    cfg = settings()
    handler.setFormatter(JsonFormatter(process) if cfg.log_json else TextFormatter(process))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.log_level)
    tracing.announce()  # set up earlier, by the bootstrap, before there was a handler
