"""Every log line, text or JSON, has its control characters escaped and its card tokens masked."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from orchestrator.ops.logs import ContextFilter, JsonFormatter, TextFormatter, log_context

HOSTILE = "evil\r\n2026-01-01 00:00:00,000 INFO web [saga_id=x] web: forged\x1b[2J\x07\u2028end"


def record(message: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(HOSTILE)
        except ValueError:
            exc_info = sys.exc_info()
    made = logging.LogRecord("t", logging.WARNING, __file__, 1, message, None, exc_info)
    with log_context(step=HOSTILE, request_id="tok_visa_abcdef1234"):
        ContextFilter().filter(made)
    return made


@pytest.mark.parametrize("exc", [False, True], ids=["message", "traceback"])
def test_a_text_line_stays_one_line_with_its_controls_escaped(exc: bool) -> None:
    line = TextFormatter("web").format(record(HOSTILE, exc=exc))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\x07" not in line
    assert "\u2028" not in line
    assert "evil\\r\\n2026-01-01" in line and "\\x1b[2J\\x07\\u2028end" in line
    assert "step=evil\\r\\n" in line  # the fields too
    assert "tok_visa_abcdef1234" not in line and "••••1234" in line


def test_a_json_line_holds_escaped_text_in_every_field() -> None:
    line = JsonFormatter("web").format(record(HOSTILE, exc=True))
    data = json.loads(line)
    for key in ("message", "step", "exc"):
        assert "\n" not in data[key] and "\x1b" not in data[key], key
        assert "\\x1b[2J" in data[key], key
    assert data["request_id"] == "••••1234"
